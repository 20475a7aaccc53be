"""Expert parallelism: routed experts sharded whole over the `ep` group, tokens moved by all-to-all.

Dispatch: sort kept (token, expert) assignments by expert (so by destination rank), exchange the
per-expert counts, check them, all-to-all the token rows with uneven splits, regroup what arrived by
local expert. Combine runs the same path backwards and sums each token's gate-weighted results.

Copies of token rows, per direction: the gather into the send buffer and the combine read each row
once (moe.parallel.permute; single-pass Triton kernels on CUDA). The regroup by local expert after the
all-to-all is a copy only for backends that want contiguous expert-sorted rows; the Triton expert
kernel gathers by index in its loads and writes its results back in arrival order instead.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moe.model.dispatch import GroupedExperts, plan_local
from moe.parallel.compat import all_gather_flat
from moe.parallel.permute import combine_assignments, gather_assignments, inverse_permutation, permute_rows
from moe.parallel.inflight import autograd_collective, collective
from moe.train.timing import RegionTimer, run_timed


class DispatchCountError(RuntimeError):
    """Split sizes disagree between ranks; sending anyway would hang (NCCL) or read stale data (gloo)."""


@dataclass
class TrafficRecord:
    """Token rows moved by one layer's dispatch on this step's micro-batches (summed)."""

    matrix_RR: torch.Tensor
    """Token vectors sent from EP rank i (row) to EP rank j (column), int64 [ep, ep]."""
    bytes_per_row: int
    """Bytes of one token vector on the wire."""


def _wire_dtype(x_TD: torch.Tensor) -> torch.dtype:
    """Rows travel in the compute dtype: under autocast the residual stream is fp32, the experts run in bf16."""
    dev = x_TD.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x_TD.dtype


class AllToAllDispatcher:
    def __init__(self, group: dist.ProcessGroup, ep: int, ep_rank: int, num_experts: int, layer_id: int,
                 node_of_ep_rank: list[int] | None = None, comm: str = "nccl",
                 peer_buffers: dict | None = None, timeout_s: float = 600.0) -> None:
        self.group = group
        self.timeout_s = timeout_s
        """The P2P barriers' timeout (NCCL's comes with the process group)."""
        self.comm = comm
        """`nccl`: all_to_all_single; `p2p`: dispatch and combine read peers' symmetric buffers
        (moe.parallel.peer_dispatch; one node, CUDA)."""
        self.peer_buffers = {} if peer_buffers is None else peer_buffers
        """(dtype, D) -> PeerBuffers, shared by the layers of one EP group."""
        self.ep = ep
        self.ep_rank = ep_rank
        self.num_experts = num_experts
        self.local_experts = num_experts // ep
        self.layer_id = layer_id
        self.node_of_ep_rank = torch.tensor(node_of_ep_rank or [0] * ep)
        self.timer: RegionTimer | None = None
        """Set by the trainer when timing is on: spans around both all-to-alls and the experts."""
        self.reset_stats()

    def reset_stats(self) -> None:
        self.traffic: TrafficRecord | None = None
        # Per token: how many distinct EP ranks and nodes its kept experts live on.
        self.spread_sum = {"ranks": 0.0, "nodes": 0.0}
        self.spread_max = {"ranks": 0, "nodes": 0}
        self.spread_tokens = 0
        # Kept assignments whose expert lives on another node, counted from the router's choices alone
        # (not from the split sizes), so the split-based inter-node bytes can be checked against it.
        self.routed_inter_node_rows: torch.Tensor | int = 0

    def _record_spread(self, expert_idx_TK: torch.Tensor, keep_TK: torch.Tensor | None) -> None:
        """Accumulate on the device (no host sync in the hot path); read at log time."""
        rank_TK = expert_idx_TK // self.local_experts
        if rank_TK.numel() == 0:
            return
        self.node_of_ep_rank = self.node_of_ep_rank.to(rank_TK.device)
        remote_TK = self.node_of_ep_rank[rank_TK] != self.node_of_ep_rank[self.ep_rank]
        if keep_TK is not None:
            remote_TK = remote_TK & keep_TK
        self.routed_inter_node_rows = self.routed_inter_node_rows + remote_TK.sum()
        if keep_TK is not None:  # a dropped assignment repeats the token's first rank: no new destination
            rank_TK = torch.where(keep_TK, rank_TK, rank_TK[:, :1].expand_as(rank_TK))
        for key, v_TK in (("ranks", rank_TK), ("nodes", self.node_of_ep_rank[rank_TK])):
            distinct_T = (v_TK.sort(-1).values.diff(dim=-1) != 0).sum(-1) + 1
            self.spread_sum[key] = self.spread_sum[key] + distinct_T.sum()
            self.spread_max[key] = torch.clamp(distinct_T.max(), min=self.spread_max[key]) \
                if isinstance(self.spread_max[key], int) else torch.maximum(self.spread_max[key], distinct_T.max())
        self.spread_tokens += rank_TK.shape[0]

    def _exchange_counts(self, tokens_per_expert_E: torch.Tensor, meanwhile: Callable[[], torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's per-expert send counts, [ep, E], on the host: the dispatch's one host sync.
        `meanwhile()` (building the send buffer) runs while the counts travel, so the device is busy
        while the host waits. Checked, so a mismatch is an error naming layer, rank and counts rather
        than a hang. Returns (counts, what `meanwhile` returned)."""
        # Counts travel on the data device for NCCL, on the CPU for gloo.
        dev = tokens_per_expert_E.device if dist.get_backend(self.group) != "gloo" else torch.device("cpu")
        mine_E = tokens_per_expert_E.to(dev, torch.int64)
        E = mine_E.numel()
        gathered = torch.empty(self.ep * E, dtype=torch.int64, device=dev)
        what = f"dispatch counts, layer {self.layer_id}"
        with collective("ep", "all_gather", what):
            work = all_gather_flat(gathered, mine_E, group=self.group, async_op=True)
        result = meanwhile()
        with collective("ep", "all_gather", what):
            work.wait()
            both = torch.cat([gathered, mine_E]).cpu()
        all_counts_RE, counts_E = both[:-E].view(self.ep, E), both[-E:]
        if not torch.equal(all_counts_RE[self.ep_rank], counts_E):
            raise DispatchCountError(
                f"layer {self.layer_id}, EP rank {self.ep_rank}: the counts peers received from this rank "
                f"{all_counts_RE[self.ep_rank].tolist()} differ from what it will send {counts_E.tolist()}")
        return all_counts_RE, result

    def run(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor, gate_TK: torch.Tensor,
            keep_TK: torch.Tensor, experts: GroupedExperts,
            meanwhile: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """Routed output in x's dtype, plus `meanwhile()` ([T, D]: work that does not depend on the
        dispatch, the shared experts), which runs while this dispatch's communication is in flight:
        behind NCCL's all-to-all, or behind the count exchange's host sync for the P2P transport."""
        if self.comm == "p2p":
            return self._run_p2p(x_TD, expert_idx_TK, gate_TK, keep_TK, experts, meanwhile)
        plan = plan_local(expert_idx_TK, gate_TK, keep_TK, self.num_experts)
        wire_dtype = _wire_dtype(x_TD)
        dropless = keep_TK is None
        K = expert_idx_TK.shape[1]
        inv_S = inverse_permutation(plan.assign_S) if dropless else None

        def send_buffer() -> torch.Tensor:
            if dropless:  # every (token, slot) is sent: gathers both ways, no scatter-add (moe.parallel.permute)
                return gather_assignments(x_TD.to(wire_dtype), plan.assign_S, inv_S, K)
            return x_TD.index_select(0, plan.row_idx_S).to(wire_dtype)

        all_counts_RE, x_send_SD = self._exchange_counts(plan.tokens_per_expert_E, send_buffer)
        El = self.local_experts
        blocks_RRL = all_counts_RE.view(self.ep, self.ep, El)  # [src, dst, local expert]
        matrix_RR = blocks_RRL.sum(-1)
        send_splits = matrix_RR[self.ep_rank].tolist()
        recv_counts_RL = blocks_RRL[:, self.ep_rank]  # what each source sends to each of my experts
        recv_splits = recv_counts_RL.sum(-1).tolist()
        if sum(send_splits) != plan.row_idx_S.numel():
            raise DispatchCountError(
                f"layer {self.layer_id}, EP rank {self.ep_rank}: {plan.row_idx_S.numel()} rows to send but the "
                f"splits {send_splits} add up to {sum(send_splits)}")

        # Bookkeeping and the shared experts go between the launch and the wait: they run while the
        # all-to-all is in flight (the dispatch's timed region then spans the longer of the two).
        side: list[torch.Tensor] = []

        def alongside() -> None:
            self._record_spread(expert_idx_TK, keep_TK)
            if meanwhile is not None:
                side.append(meanwhile())

        x_recv = run_timed(self.timer, f"a2a_dispatch/layer_{self.layer_id}", x_send_SD,
                           lambda t: autograd_collective("ep", "all_to_all", f"dispatch, layer {self.layer_id}", t,
                               lambda u: all_to_all_single_autograd(u, recv_splits, send_splits, self.group),
                               alongside))
        side_TD = side[0] if side else None

        # Arrived rows are ordered (source, local expert); the experts want (local expert, source).
        dev = x_TD.device
        seg_of_row = torch.repeat_interleave(torch.arange(self.ep * El, device=dev),
                                             recv_counts_RL.flatten().to(dev), output_size=sum(recv_splits))
        src, le = seg_of_row // El, seg_of_row % El
        perm = torch.sort(le * self.ep + src, stable=True).indices
        tokens_per_local_expert = recv_counts_RL.sum(0).to(dev)
        if getattr(experts, "gathers_rows", False):
            # The kernel reads row perm[s] as its s-th (expert-sorted) row and writes its result back at
            # the same position: the results come out in arrival order with no permuted copy either way.
            y_back = run_timed(self.timer, f"experts/layer_{self.layer_id}", x_recv,
                               lambda t: experts(t, tokens_per_local_expert, perm, None, t.shape[0]))
        else:
            inv_perm = inverse_permutation(perm)
            y_grouped = run_timed(self.timer, f"experts/layer_{self.layer_id}", permute_rows(x_recv, perm, inv_perm),
                                  lambda t: experts(t, tokens_per_local_expert))
            y_back = permute_rows(y_grouped, inv_perm, perm)
        y_back = run_timed(self.timer, f"a2a_combine/layer_{self.layer_id}", y_back,
                           lambda t: autograd_collective("ep", "all_to_all", f"combine, layer {self.layer_id}", t,
                               lambda u: all_to_all_single_autograd(u, send_splits, recv_splits, self.group)))

        self._record_traffic(matrix_RR, x_TD.shape[-1] * x_send_SD.element_size())
        if dropless:
            out_TD = combine_assignments(y_back, plan.assign_S, inv_S, gate_TK, out_dtype=x_TD.dtype)
        else:
            y_SD = y_back.to(x_TD.dtype) * plan.gate_S.to(x_TD.dtype).unsqueeze(-1)
            out_TD = x_TD.new_zeros(x_TD.shape).index_add(0, plan.row_idx_S, y_SD)
        return out_TD if side_TD is None else out_TD + side_TD


    def _record_traffic(self, matrix_RR: torch.Tensor, bytes_per_row: int) -> None:
        rec = self.traffic
        self.traffic = TrafficRecord(matrix_RR if rec is None else rec.matrix_RR + matrix_RR, bytes_per_row)

    def _run_p2p(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor, gate_TK: torch.Tensor,
                 keep_TK: torch.Tensor | None, experts: GroupedExperts,
                 meanwhile: Callable[[], torch.Tensor] | None) -> torch.Tensor:
        """Dispatch and combine through symmetric buffers (moe.parallel.peer_dispatch); with a keep mask
        (capacity) only kept assignments travel and the dropped ones add nothing to the combine."""
        from moe.parallel.peer_dispatch import PeerBuffers, PeerCombine, PeerDispatch, receive_layout, send_positions

        plan = plan_local(expert_idx_TK, gate_TK, keep_TK, self.num_experts)
        wire_dtype = _wire_dtype(x_TD)
        T, K = expert_idx_TK.shape
        D = x_TD.shape[-1]
        El = self.local_experts
        # The token count rides along as one more column: with drops it is not slots / K, and every
        # rank must size the shared buffers from the same numbers (their growth is collective).
        counts_with_T = torch.cat([plan.tokens_per_expert_E, plan.tokens_per_expert_E.new_full((1,), T)])
        # The pulls are kernels on this stream, so the shared experts cannot hide behind them; they
        # keep the GPU busy while the host waits for the counts instead.
        all_counts_RE, side_TD = self._exchange_counts(counts_with_T, meanwhile or (lambda: None))
        tokens_R, all_counts_RE = all_counts_RE[:, -1], all_counts_RE[:, :-1].contiguous()
        matrix_RR = all_counts_RE.view(self.ep, self.ep, El).sum(-1)
        num_recv = int(matrix_RR[:, self.ep_rank].sum())
        key = (wire_dtype, D)
        if key not in self.peer_buffers:
            self.peer_buffers[key] = PeerBuffers(self.group, wire_dtype, D, x_TD.device, self.timeout_s)
        bufs = self.peer_buffers[key]
        bufs.ensure(int(tokens_R.max()), int(all_counts_RE.sum(1).max()), int(matrix_RR.sum(0).max()))

        counts_RE = all_counts_RE.to(x_TD.device)
        src_N, slot_N, tokens_per_local_expert = receive_layout(counts_RE, self.ep_rank, El, num_recv)
        rank_S, pos_S = send_positions(counts_RE, self.ep_rank, El, expert_idx_TK.reshape(-1)[plan.assign_S])
        if keep_TK is None:  # every (token, slot) is a slot: a gather
            inv_S = inverse_permutation(plan.assign_S)
            rank_TK, pos_TK = rank_S[inv_S].view(T, K), pos_S[inv_S].view(T, K)
        else:  # dropped assignments point nowhere (-1)
            rank_TK = torch.zeros(T * K, dtype=rank_S.dtype, device=x_TD.device).index_copy_(
                0, plan.assign_S, rank_S).view(T, K)
            pos_TK = torch.full((T * K,), -1, dtype=pos_S.dtype, device=x_TD.device).index_copy_(
                0, plan.assign_S, pos_S).view(T, K)

        x_recv, gate_N = run_timed(
            self.timer, f"a2a_dispatch/layer_{self.layer_id}", x_TD.to(wire_dtype),
            lambda t: PeerDispatch.apply(t, gate_TK, bufs, plan.row_idx_S, plan.assign_S, src_N, slot_N, rank_TK, pos_TK))
        self._record_spread(expert_idx_TK, keep_TK)
        # Rows arrive grouped by local expert: the experts take them as they are, apply the gates, and
        # (Triton) write their output, and in backward the input gradient, into the Y buffer peers read.
        y = run_timed(self.timer, f"experts/layer_{self.layer_id}", x_recv,
                      lambda t: experts(t, tokens_per_local_expert, None, gate_N, None,
                                        out=bufs.y[:num_recv], grad_x_out=lambda n: bufs.y[:n]))
        out = run_timed(self.timer, f"a2a_combine/layer_{self.layer_id}", y,
                        lambda t: PeerCombine.apply(t, bufs, rank_TK, pos_TK, plan.row_idx_S, src_N, slot_N, x_TD.dtype))
        self._record_traffic(matrix_RR, D * torch.empty((), dtype=wire_dtype).element_size())
        return out if side_TD is None else out + side_TD


def apply_expert_parallel(model: torch.nn.Module, group: dist.ProcessGroup, ep: int, ep_rank: int,
                          node_of_rank: list[int], ep_group_ranks: list[int], comm: str = "nccl",
                          timeout_s: float = 600.0) -> None:
    """Keep this rank's slice of every MoE layer's experts and route tokens through all-to-all."""
    node_of_ep_rank = [node_of_rank[r] for r in ep_group_ranks]
    if comm == "p2p":  # checked before the first step: an error now, not a hang later
        if dist.get_backend(group) != "nccl" or len(set(node_of_ep_rank)) > 1:
            raise ValueError(f"comm='p2p' needs an NCCL EP group inside one node; this one spans nodes "
                             f"{sorted(set(node_of_ep_rank))} on backend {dist.get_backend(group)}. Use comm='nccl'")
    peer_buffers: dict = {}  # one set of symmetric buffers for all layers
    for layer_id, moe in model.moe_layers().items():
        E = moe.num_experts
        El = E // ep
        ex = moe.experts
        for name in ("w_gate_EDF", "w_up_EDF", "w_down_EFD"):
            full = getattr(ex, name)
            setattr(ex, name, torch.nn.Parameter(full.detach()[ep_rank * El:(ep_rank + 1) * El].clone()))
        ex.num_experts = El
        moe.dispatcher = AllToAllDispatcher(group, ep, ep_rank, E, layer_id, node_of_ep_rank, comm, peer_buffers,
                                            timeout_s)


def tie_router_groups_to_topology(model: torch.nn.Module, group_by: str, ep: int, node_of_ep_rank: list[int]) -> int | None:
    """With `group_by` = `ep_ranks` or `nodes`, make each router group the experts of one EP rank or one
    node, so `topk_group` bounds how many ranks/nodes a token's experts span. Returns the group count."""
    import dataclasses

    from moe.model.router import validate_router_config

    if group_by == "experts":
        return None
    n_group = ep if group_by == "ep_ranks" else len(set(node_of_ep_rank))
    for moe in model.moe_layers().values():
        cfg = dataclasses.replace(moe.router.cfg, n_group=n_group)
        try:
            validate_router_config(cfg, moe.num_experts, moe.top_k)
        except ValueError as e:
            raise ValueError(f"model.moe.router.group_by={group_by!r} makes n_group={n_group} on this layout: {e}") from e
        moe.router.cfg = cfg
    return n_group
