"""P2P transport for the expert-parallel dispatcher: ranks read each other's buffers over NVLink.

`AllToAllDispatcher(..., comm="p2p")` (one node, CUDA). Instead of building a send buffer, calling NCCL's all-to-all
and reducing what comes back, every EP rank publishes its rows in a symmetric buffer
(torch.distributed._symmetric_memory) and the other side pulls exactly the rows it needs with the
gather or the sum over a token's K rows fused into the same pass (moe.kernels.peer_rows):

    dispatch   sender: x -> X, token of each slot -> IDX, its gate -> GATE     receiver: pull rows and
               gates, grouped by local expert then source rank (what the grouped expert kernels want)
    experts    apply the gates; the Triton kernels write their output straight into Y (`out=`)
    combine    sender: pull K rows per token from the receivers' Y and sum them
    backward   the same moves the other way round: the receivers pull dout rows; the experts write the
               input gradient into Y and the gate gradient is pushed into the sender's DGATE.

Buffers are shared by every MoE layer (the ops run one after another on one stream) and grow
collectively: every rank derives the sizes from the all-gathered counts, so all ask for the same.
A barrier separates "published" from "pulled" and "pulled" from "may overwrite". The counts still
travel by NCCL with one host sync (the received row count sizes the expert input).

Chosen with `parallel.ep_comm=p2p`. Each process must see every GPU of its node under distinct device
indices (torch's symmetric memory refuses ranks that all call their GPU cuda:0): the launcher shows
each worker all of the job's GPUs on its node (launcher.topology.node_devices), as torchrun does.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from moe.kernels.peer_rows import pull_reduce, pull_rows, push_values


def receive_layout(counts_RE: torch.Tensor, me: int, local_experts: int, num_rows: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For receiver `me`: source rank and source slot of each received row, rows ordered by local expert
    then source rank (slots of one source keep their order), and the rows per local expert.

    `counts_RE[s, e]`: rows rank s sends to expert e; rank s's slots are sorted by expert, so expert e's
    rows are its slots [sum_{e'<e} counts_RE[s, e'], ...). `num_rows` is the host's total (sizes only).
    """
    R, E = counts_RE.shape
    El = local_experts
    dev = counts_RE.device
    block_RL = counts_RE[:, me * El:(me + 1) * El]
    seg_counts = block_RL.t().reshape(-1)  # (local expert, source)
    seg = torch.repeat_interleave(torch.arange(El * R, device=dev), seg_counts, output_size=num_rows)
    seg_start = torch.cumsum(seg_counts, 0) - seg_counts
    offset = torch.arange(num_rows, device=dev) - seg_start[seg]
    j, s = seg // R, seg % R
    slot_start_RE = torch.cumsum(counts_RE, 1) - counts_RE
    slot = slot_start_RE[s, me * El + j] + offset
    return s.to(torch.int32), slot, block_RL.sum(0)


def send_positions(counts_RE: torch.Tensor, me: int, local_experts: int, expert_S: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """For sender `me` with slots sorted by expert (`expert_S`): the rank each slot goes to and the row
    it lands on there (in that receiver's `receive_layout` order)."""
    R, E = counts_RE.shape
    El = local_experts
    dev = counts_RE.device
    # recv_start[p, j, s]: first row on receiver p of what source s sends to p's local expert j
    per_dst = counts_RE.view(R, R, El).permute(1, 2, 0).reshape(R, El * R)
    recv_start = (torch.cumsum(per_dst, 1) - per_dst).view(R, El, R)
    slot_start_E = torch.cumsum(counts_RE[me], 0) - counts_RE[me]
    p, j = expert_S // El, expert_S % El
    offset = torch.arange(expert_S.numel(), device=dev) - slot_start_E[expert_S]
    return p.to(torch.int32), recv_start[p, j, me] + offset


class PeerBuffers:
    """This rank's symmetric buffers for one EP group and row width, and every rank's address of them.

    One symmetric allocation carved into: X [t, D] rows published by senders (x, or dout in backward),
    IDX [s] int32 token of each slot, GATE [s] fp32, DGATE [s] fp32, Y [r, D] rows published by
    receivers (expert outputs, or the gradient of the expert inputs in backward).
    """

    ALIGN = 256

    def __init__(self, group: dist.ProcessGroup, dtype: torch.dtype, D: int, device: torch.device,
                 timeout_s: float = 600.0) -> None:
        self.group, self.dtype, self.D, self.device = group, dtype, D, device
        self.timeout_ms = int(timeout_s * 1000)
        """A barrier whose peer never arrives (stopped or dead) traps after this long instead of hanging:
        the process fails and the launcher restarts from the last checkpoint (parallel.timeout_s)."""
        self.caps = (0, 0, 0)
        self.handle = None

    def ensure(self, t_rows: int, slots: int, r_rows: int) -> None:
        """Grow to hold the given sizes. Collective: every rank must pass the same numbers."""
        if t_rows <= self.caps[0] and slots <= self.caps[1] and r_rows <= self.caps[2]:
            return
        import torch.distributed._symmetric_memory as symm_mem

        grow = lambda need, have: max(need, have, int(need * 1.25) + 64)  # noqa: E731 - headroom for noise
        caps = tuple(grow(n, h) for n, h in zip((t_rows, slots, r_rows), self.caps))
        esize = torch.empty((), dtype=self.dtype).element_size()
        parts = {"x": (caps[0] * self.D * esize, self.dtype, (caps[0], self.D)),
                 "idx": (caps[1] * 4, torch.int32, (caps[1],)),
                 "gate": (caps[1] * 4, torch.float32, (caps[1],)),
                 "dgate": (caps[1] * 4, torch.float32, (caps[1],)),
                 "y": (caps[2] * self.D * esize, self.dtype, (caps[2], self.D))}
        offsets, total = {}, 0
        for name, (nbytes, _, _) in parts.items():
            offsets[name] = total
            total += -(-nbytes // self.ALIGN) * self.ALIGN
        self.handle = None
        raw = symm_mem.empty(total, dtype=torch.uint8, device=self.device)
        try:
            self.handle = symm_mem.rendezvous(raw, self.group)
        except RuntimeError as e:
            raise RuntimeError(
                f"the P2P expert dispatcher could not share its buffers between EP ranks ({e}). It needs every "
                f"process to see all GPUs of the node (this one sees {torch.cuda.device_count()} and uses "
                f"{self.device}); use the NCCL transport (comm='nccl') otherwise") from e
        self.raw = raw
        bases = torch.tensor(self.handle.buffer_ptrs, dtype=torch.int64)
        for name, (nbytes, dt, shape) in parts.items():
            off = offsets[name]
            setattr(self, name, raw[off:off + nbytes].view(dt).view(shape))
            setattr(self, f"{name}_ptrs", (bases + off).to(self.device))
        self.caps = caps

    def barrier(self) -> None:
        self.handle.barrier(channel=0, timeout_ms=self.timeout_ms)


def _pull_token_rows(bufs: PeerBuffers, rows_TD: torch.Tensor, row_idx_S: torch.Tensor, src_N: torch.Tensor,
                     slot_N: torch.Tensor, gate_S: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Senders publish token rows (x, or dout in backward), the token of each slot and optionally its
    gate; receivers pull their rows in (local expert, source) order, and the gates [N] (fp32)."""
    S, N = row_idx_S.numel(), src_N.numel()
    bufs.x[:rows_TD.shape[0]].copy_(rows_TD)
    bufs.idx[:S].copy_(row_idx_S)
    gate_N = None
    if gate_S is not None:
        bufs.gate[:S].copy_(gate_S)
        gate_N = torch.empty(N, dtype=torch.float32, device=rows_TD.device)
    bufs.barrier()
    out_ND = pull_rows(bufs.x_ptrs, bufs.idx_ptrs, src_N, slot_N,
                       torch.empty(N, bufs.D, dtype=bufs.dtype, device=rows_TD.device),
                       gate_ptrs_R=bufs.gate_ptrs if gate_S is not None else None, gate_out_N=gate_N)
    bufs.barrier()  # peers have read our X, IDX and GATE: they may be overwritten
    return out_ND, gate_N


def _publish(buf_rows: torch.Tensor, rows_ND: torch.Tensor) -> None:
    """Put rows into a symmetric buffer, unless the kernel that made them already wrote them there."""
    n = rows_ND.shape[0]
    if n and rows_ND.data_ptr() != buf_rows.data_ptr():
        buf_rows[:n].copy_(rows_ND)


class PeerDispatch(torch.autograd.Function):
    """x rows [T, D] and gates [T, K] -> rows received by this rank [N, D] in (local expert, source)
    order, and their gates [N] (fp32): the experts apply the gates, so the combine is a plain sum."""

    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, gate_TK: torch.Tensor, bufs: PeerBuffers, row_idx_S: torch.Tensor,
                assign_S: torch.Tensor, src_N: torch.Tensor, slot_N: torch.Tensor, rank_TK: torch.Tensor,
                pos_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_ND, gate_N = _pull_token_rows(bufs, x_TD, row_idx_S, src_N, slot_N, gate_TK.reshape(-1)[assign_S])
        ctx.bufs, ctx.x_dtype, ctx.gate_dtype = bufs, x_TD.dtype, gate_TK.dtype
        ctx.save_for_backward(rank_TK, pos_TK, assign_S, src_N, slot_N)
        return out_ND, gate_N

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor, dgate_N: torch.Tensor | None):
        bufs = ctx.bufs
        rank_TK, pos_TK, assign_S, src_N, slot_N = ctx.saved_tensors
        T, K = rank_TK.shape
        dev = rank_TK.device
        # The Triton experts wrote the input gradient into Y already (grad_x_out); others are copied.
        _publish(bufs.y, g_ND)
        if dgate_N is not None:  # each gate's gradient goes back to the rank that owns the gate
            push_values(bufs.dgate_ptrs, src_N, slot_N, dgate_N)
        bufs.barrier()
        dx_TD = pull_reduce(bufs.y_ptrs, bufs.dtype, rank_TK, pos_TK,
                            torch.empty(T, bufs.D, dtype=ctx.x_dtype, device=dev))
        dgate_TK = None
        if dgate_N is not None:
            dgate_flat = torch.zeros(T * K, dtype=torch.float32, device=dev)  # dropped assignments: 0
            dgate_flat[assign_S] = bufs.dgate[:assign_S.numel()]
            dgate_TK = dgate_flat.view(T, K).to(ctx.gate_dtype)
        bufs.barrier()  # peers have read our Y and we our DGATE
        return dx_TD, dgate_TK, None, None, None, None, None, None, None


class PeerCombine(torch.autograd.Function):
    """Gate-weighted expert outputs [N, D] on the receivers -> sum over each token's K rows [T, D] on
    the senders."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, bufs: PeerBuffers, rank_TK: torch.Tensor, pos_TK: torch.Tensor,
                row_idx_S: torch.Tensor, src_N: torch.Tensor, slot_N: torch.Tensor, out_dtype: torch.dtype
                ) -> torch.Tensor:
        _publish(bufs.y, y_ND)  # the Triton experts wrote y into Y already (out=)
        bufs.barrier()
        out_TD = pull_reduce(bufs.y_ptrs, bufs.dtype, rank_TK, pos_TK,
                             torch.empty(rank_TK.shape[0], bufs.D, dtype=out_dtype, device=y_ND.device))
        bufs.barrier()
        ctx.bufs, ctx.y_dtype = bufs, y_ND.dtype
        ctx.save_for_backward(row_idx_S, src_N, slot_N)
        return out_TD

    @staticmethod
    def backward(ctx, dout_TD: torch.Tensor):
        bufs = ctx.bufs
        row_idx_S, src_N, slot_N = ctx.saved_tensors
        dy_ND, _ = _pull_token_rows(bufs, dout_TD, row_idx_S, src_N, slot_N)
        return dy_ND.to(ctx.y_dtype), None, None, None, None, None, None, None
