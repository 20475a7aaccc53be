"""Fused routed-expert SwiGLU FFN: the `triton` backend of `moe.model.experts.routed_experts`.

Forward, two launches over all experts: gate+up with SwiGLU fused (x rows gathered in the loads), then
down with the gate weight and the scatter-add to token rows fused in the epilogue. Backward, five:
dy @ w_down^T (dy rows gathered), the SwiGLU/gate backward over whole rows, the two weight-gradient
GEMMs, and dx with its scatter-add. No permuted copy of x, y or dy is made; the saved state is the
two [S, F] pre-activations.

On Hopper, layers big enough to pay for it read their weight tiles and contiguous row tiles through
TMA tensor descriptors (`_tiles.TMA_MODE`): built on the device by the persistent row-tile kernels,
on the host for the weight-gradient kernels, which run one program per tile. On Hopper, layers with
many rows per expert take a warp-specialized down projection instead (`down_ws`, MOE_TRITON_WS):
rows stored through descriptors clipped at each expert's end, then (gather mode) summed per token in
a separate pass.

Shapes: x [X, D]; weights w_gate/w_up [E, D, F], w_down [E, F, D]; S routed rows sorted by expert.
Precision: operands in the compute dtype (bf16 on GPU; fp32/fp16 work too), fp32 accumulation. In
gather mode a token's k result rows (and, in backward, its k input-gradient rows) are added by
atomics in the GEMM epilogues (bf16 for bf16, else fp32), so results are not bitwise reproducible,
like index_add. MOE_TRITON_SCATTER=combine (or `torch.use_deterministic_algorithms`, which
train.deterministic turns on) makes them reproducible: the GEMMs store rows in sorted order and
`row_combine.segment_sum` adds each token's rows in fp32 in a fixed order. On an H200 that took
the same GPU time on the large benchmark layers, but adds host time (three small launches and
one more kernel per pass) and one [rows, D] buffer per pass (BENCHMARKS.md).
"""
from __future__ import annotations

from typing import Callable

import torch
import triton

from moe.config import kernel_env
from moe.kernels import down_ws
from moe.kernels._tiles import INTERPRET, device_tma, persistent_programs, tma_args, tma_enabled
from moe.kernels.row_combine import segment_sum, token_segments
from moe.kernels.swiglu_bwd import dh_bwd, dw_down_bwd, dw_gate_up_bwd, dx_bwd, swiglu_bwd_rows
from moe.kernels.swiglu_fwd import down_fwd, gate_up_fwd

# MOE_TRITON_SCATTER: how gather mode sums a token's rows. "bf16" (default): atomics in the epilogue, in
# bf16 for bf16 operands; "fp32": atomics into an fp32 buffer; "combine": rows stored, then summed in
# fp32 by a separate pass, bitwise reproducible. Read at each launch, so a benchmark can compare them.
SCATTER_MODE = kernel_env("MOE_TRITON_SCATTER")
# MOE_TRITON_WS: the warp-specialized down projection (`down_ws`). "auto": on Hopper (compute
# capability 9) in bf16 or fp16, when TMA is on and experts average at least WS_MIN_ROWS rows: in
# gather mode it measured 2-4% off the forward (qwen3_30b_a3b, 2048 rows), and with fewer rows its
# separate sum pass cost what it saved (dsv3_16b, 1536 rows); on pre-grouped rows (no sum pass) the
# kernel was 4% faster than `down_fwd`, within the layer's run-to-run noise (BENCHMARKS.md).
# "1": whenever TMA is on (the interpreter tests); "0": never.
WS_MODE = kernel_env("MOE_TRITON_WS")
WS_MIN_ROWS = 2048


def _use_ws(device: torch.device, dtype: torch.dtype, use_tma: bool, num_rows: int, num_experts: int) -> bool:
    if WS_MODE == "0" or not use_tma:
        return False
    if WS_MODE == "1":
        return True
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
            and dtype in (torch.bfloat16, torch.float16) and num_rows >= WS_MIN_ROWS * num_experts)


def scatter_mode() -> str:
    """The MOE_TRITON_SCATTER mode a launch uses: "combine" while `torch.use_deterministic_algorithms`
    is on, as PyTorch's own index_add turns deterministic under it (train.deterministic sets it)."""
    return "combine" if torch.are_deterministic_algorithms_enabled() else SCATTER_MODE


# Tests set this to fill every buffer a kernel must write with NaN, so an element no program wrote shows.
POISON_BUFFERS = False


# Mean rows per expert from which the weight-gradient kernels read pre-grouped rows through per-expert
# descriptors built on the device (`_rows_desc`). On an H200 that cut dw_gate_up_bwd by 13% and dw_down_bwd
# by 9% on qwen3_30b_a3b (2048 rows per expert) and by 4-9% on dsv3_16b (1536), but made them 7% and 5%
# slower on fine_grained (128): one program per output tile builds a descriptor, and a short K loop
# cannot hide that (BENCHMARKS.md). The benchmark's "triton_ptrrows" sets it out of reach.
ROWS_DESC_MIN_ROWS = 1024


# gate_up_fwd reads pre-grouped x rows through a descriptor (built once per program, so no threshold):
# 2.55 against 2.71-2.77 ms with pointer loads on qwen3_30b_a3b on an H200. A switch for the benchmark's
# "triton_ptrrows".
GROUPED_X_DESC = True


def _rows_desc(tma: bool, gather: bool, rows: torch.Tensor, min_rows: int) -> bool:
    """Whether a kernel reads its pre-grouped row operand `rows` through descriptors: TMA on, no row
    index, at least `min_rows` rows, and the tensor fits a descriptor."""
    return tma and not gather and rows.shape[0] >= min_rows and device_tma(True, rows)


def _empty(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.empty(*shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if POISON_BUFFERS else t


def _scatter_dtype(dt: torch.dtype) -> torch.dtype:
    """Dtype the gather-mode scatter-adds accumulate in.

    bf16 adds (Hopper's vector bf16 atomics) write half the bytes and skip the fp32 buffer's zero-fill
    and cast, at the rounding the torch backends' bf16 index_add also has; MOE_TRITON_SCATTER=fp32
    accumulates in fp32 instead. fp16 always goes through fp32.
    """
    if dt == torch.bfloat16 and scatter_mode() == "bf16":
        return torch.bfloat16
    return torch.float32


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands get true fp32 products (Triton's default would be tf32, ~1e-3 relative error).
    return "ieee" if dtype == torch.float32 else "tf32"


def _e_pow2(num_experts: int) -> int:
    """Width of the in-kernel per-expert vectors: one compiled kernel serves every E up to 256."""
    return max(256, triton.next_power_of_2(num_experts))


def _row_grid(num_rows: int, num_experts: int, n: int, progs: int):
    """Persistent grid: PPS programs per SM, never more than the upper bound of tiles.

    Each expert wastes at most one partial row block, so ceil(S / BM) + E row blocks bound the real count.
    """
    def grid(meta: dict) -> tuple[int]:
        upper = (triton.cdiv(num_rows, meta["BM"]) + num_experts) * triton.cdiv(n, meta["BN"])
        return (max(1, min(progs * meta["PPS"], upper)),)

    return grid


class GroupedSwiGLU(torch.autograd.Function):
    """Autograd wrapper; inputs are already in the compute dtype, contiguous, on one device."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        w_gate_EDF: torch.Tensor,
        w_up_EDF: torch.Tensor,
        w_down_EFD: torch.Tensor,
        counts_E: torch.Tensor,
        row_idx_S: torch.Tensor | None,
        gate_S: torch.Tensor | None,
        num_out_rows: int,
        out_buf: torch.Tensor | None,
        grad_x_buf: Callable[[int], torch.Tensor] | None,
    ) -> torch.Tensor:
        E, D, F = w_gate_EDF.shape
        gather = row_idx_S is not None
        S = row_idx_S.numel() if gather else x.shape[0]
        dev, dt = x.device, x.dtype
        progs = persistent_programs(dev)
        e_pow2 = _e_pow2(E)
        prec = _dot_precision(dt)
        # forward runs under no_grad; needs_input_grad says whether a backward can come.
        save = any(ctx.needs_input_grad[i] for i in (0, 1, 2, 3, 6))
        dummy = counts_E  # stands in for absent pointers; never read
        use_tma = tma_enabled(dev, S * D * F)

        h_SF = _empty(S, F, dtype=dt, device=dev)
        g_SF = _empty(S, F, dtype=dt, device=dev) if save else h_SF
        u_SF = _empty(S, F, dtype=dt, device=dev) if save else h_SF
        # The warp-specialized down projection writes rows, never adds them: pre-grouped inputs get
        # their rows in `out` directly, gather mode sums each token's rows afterwards.
        ws = _use_ws(dev, dt, use_tma, S, E) and device_tma(
            True, h_SF, w_down_EFD, *((out_buf,) if out_buf is not None and not gather else ()))
        tma = device_tma(use_tma, w_gate_EDF, w_up_EDF, h_SF)
        gate_up_fwd[_row_grid(S, E, F, progs)](
            x, row_idx_S if gather else dummy, w_gate_EDF, w_up_EDF, counts_E, h_SF, g_SF, u_SF,
            gate_S if ws and gate_S is not None else dummy, E, D, F, S,
            GATHER=gather, SAVE_GU=save, GATE_H=ws and gate_S is not None, E_POW2=e_pow2, DOT_PREC=prec, TMA=tma,
            X_DESC=GROUPED_X_DESC and _rows_desc(tma, gather, x, 0),
        )
        scatter = gather and not ws and scatter_mode() != "combine"
        segments = None
        if scatter:
            # Accumulator for the scatter-add (top-k rows meet in one token row).
            out = torch.zeros(num_out_rows, D, dtype=_scatter_dtype(dt), device=dev)
        elif gather:
            # Rows in sorted order; each token's rows are summed below. One segment list serves the
            # output and, in backward, the input gradient (x may have fewer rows than the output).
            out = _empty(S, D, dtype=dt, device=dev)
            segments = token_segments(row_idx_S, max(num_out_rows, x.shape[0]))
        else:
            out = out_buf if out_buf is not None else _empty(S, D, dtype=dt, device=dev)
        if ws:  # h carries the gate weights already
            down_ws.down_rows(h_SF, w_down_EFD, counts_E, out, e_pow2, prec)
        else:
            tma = device_tma(use_tma, h_SF, w_down_EFD, *(() if scatter else (out,)))
            down_fwd[_row_grid(S, E, D, progs)](
                h_SF, w_down_EFD, gate_S if gate_S is not None else dummy, row_idx_S if scatter else dummy,
                counts_E, out, E, D, F, S, out.shape[0],
                SCATTER=scatter, HAS_GATE=gate_S is not None, E_POW2=e_pow2, DOT_PREC=prec, TMA=tma,
            )
        if segments is not None:
            out = segment_sum(out, *segments, num_out_rows, dt)
            if scatter_mode() != "combine":  # the backward's dx keeps its atomics
                segments = None
        elif scatter and out.dtype != dt:
            out = out.to(dt)
        del h_SF
        if save:
            ctx.save_for_backward(x, w_gate_EDF, w_up_EDF, w_down_EFD, counts_E, row_idx_S, gate_S, g_SF, u_SF,
                                  *(segments or ()))
            ctx.grad_x_buf = grad_x_buf
            ctx.use_tma = use_tma
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, w_gate_EDF, w_up_EDF, w_down_EFD, counts_E, row_idx_S, gate_S, g_SF, u_SF, *segments = ctx.saved_tensors
        E, D, F = w_gate_EDF.shape
        gather = row_idx_S is not None
        scatter = gather and not segments
        has_gate = gate_S is not None
        S = g_SF.shape[0]
        dev, dt = x.device, x.dtype
        progs = persistent_programs(dev)
        e_pow2 = _e_pow2(E)
        prec = _dot_precision(dt)
        dummy = counts_E
        use_tma = ctx.use_tma  # the forward's choice: both passes take the same path
        dy = grad_out.to(dt).contiguous()

        a_SF = _empty(S, F, dtype=dt, device=dev)
        tma = device_tma(use_tma, w_down_EFD, a_SF)
        dh_bwd[_row_grid(S, E, F, progs)](
            dy, row_idx_S if gather else dummy, w_down_EFD, counts_E, a_SF, E, D, F, S,
            GATHER=gather, E_POW2=e_pow2, DOT_PREC=prec, TMA=tma,
        )
        dg_SF = _empty(S, F, dtype=dt, device=dev)
        du_SF = _empty(S, F, dtype=dt, device=dev)
        hc_SF = _empty(S, F, dtype=dt, device=dev)
        dgate32_S = _empty(S, dtype=torch.float32, device=dev) if has_gate else dummy
        swiglu_bwd_rows[lambda m: (triton.cdiv(S, m["BR"]),)](
            a_SF, g_SF, u_SF, gate_S if has_gate else dummy, counts_E, dg_SF, du_SF, hc_SF, dgate32_S, S, E, F,
            HAS_GATE=has_gate, E_POW2=e_pow2,
        )
        del a_SF

        d_wg = d_wu = d_wd = None
        need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        if need_w:
            counts64 = counts_E.to(torch.int64)
            starts_E = torch.cumsum(counts64, 0) - counts64
            # Longest experts first: their tiles run longest, so they must not start last.
            order_E = torch.argsort(counts_E, descending=True, stable=True)
            starts_R = starts_E[order_E].to(torch.int32)  # R: experts by rank in that order
            counts_R = counts_E[order_E]
            order_E = order_E.to(torch.int32)
            d_wd = _empty(E, F, D, dtype=dt, device=dev)
            tma, (hc, dwd) = tma_args(use_tma, hc_SF, d_wd)
            dw_down_bwd[lambda m: (E * triton.cdiv(F, m["BM"]) * triton.cdiv(D, m["BN"]),)](
                hc, dy, row_idx_S if gather else dummy, order_E, starts_R, counts_R, dwd, D, F,
                GATHER=gather, DOT_PREC=prec, TMA=tma,
                ROWS_DESC=_rows_desc(tma, gather, dy, ROWS_DESC_MIN_ROWS * E),
            )
            # hc's last reader has been queued: its S x F buffer goes back to the allocator before the
            # two weight gradients below take theirs (with dx's allocation, the backward's high point).
            hc = hc_SF = None
            d_wg = _empty(E, D, F, dtype=dt, device=dev)
            d_wu = _empty(E, D, F, dtype=dt, device=dev)
            tma, (dg, du, dwg, dwu) = tma_args(use_tma, dg_SF, du_SF, d_wg, d_wu)
            dw_gate_up_bwd[lambda m: (E * triton.cdiv(D, m["BM"]) * triton.cdiv(F, m["BN"]),)](
                x, dg, du, row_idx_S if gather else dummy, order_E, starts_R, counts_R, dwg, dwu, D, F,
                GATHER=gather, DOT_PREC=prec, TMA=tma,
                ROWS_DESC=_rows_desc(tma, gather, x, ROWS_DESC_MIN_ROWS * E),
            )
        del hc_SF

        dx = None
        if ctx.needs_input_grad[0]:
            if scatter:
                dx = torch.zeros(x.shape[0], D, dtype=_scatter_dtype(dt), device=dev)
            elif gather:
                dx = _empty(S, D, dtype=dt, device=dev)  # per sorted row; summed per token below
            else:
                dx = ctx.grad_x_buf(x.shape[0]) if ctx.grad_x_buf is not None else _empty(x.shape[0], D, dtype=dt, device=dev)
            tma = device_tma(use_tma, dg_SF, du_SF, w_gate_EDF, w_up_EDF, *(() if scatter else (dx,)))
            dx_bwd[_row_grid(S, E, D, progs)](
                dg_SF, du_SF, w_gate_EDF, w_up_EDF, row_idx_S if scatter else dummy, counts_E, dx, E, D, F, S,
                dx.shape[0],
                SCATTER=scatter, E_POW2=e_pow2, DOT_PREC=prec, TMA=tma,
            )
            if segments:
                dx = segment_sum(dx, *segments, x.shape[0], dt)
            elif scatter and dx.dtype != dt:
                dx = dx.to(dt)

        d_gate = None
        if has_gate and ctx.needs_input_grad[6]:
            d_gate = dgate32_S.to(gate_S.dtype)
        return dx, d_wg, d_wu, d_wd, None, None, d_gate, None, None, None


def triton_routed_experts(
    x: torch.Tensor,
    w_gate_EDF: torch.Tensor,
    w_up_EDF: torch.Tensor,
    w_down_EFD: torch.Tensor,
    tokens_per_expert_E: torch.Tensor,
    row_idx_S: torch.Tensor | None = None,
    gate_S: torch.Tensor | None = None,
    num_out_rows: int | None = None,
    out: torch.Tensor | None = None,
    grad_x_out: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Same contract and result as `routed_experts(..., backend="torch")`; see moe/model/experts.py.

    Without `row_idx_S` the result rows are written into `out` when it is given (contiguous [S, D] in
    the compute dtype), and the gradient of x into `grad_x_out(S)`: the P2P dispatcher passes its
    symmetric buffers, so peers read the rows where the kernels wrote them.
    """
    dev = x.device
    if dev.type != "cuda" and not INTERPRET:
        raise RuntimeError("the triton expert backend needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    # Under autocast the torch backend's matmuls run in the autocast dtype; match it.
    dt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else x.dtype
    x_c = x.to(dt).contiguous()
    wg, wu, wd = (w.to(dt).contiguous() for w in (w_gate_EDF, w_up_EDF, w_down_EFD))
    counts_E = tokens_per_expert_E.to(device=dev, dtype=torch.int32)
    gather = row_idx_S is not None
    S = row_idx_S.numel() if gather else x.shape[0]
    out_rows = (x.shape[0] if num_out_rows is None else num_out_rows) if gather else x.shape[0]
    if S == 0:
        # Nothing routed: zeros, with every input still in the graph so gradients are zeros, not None.
        keep = sum(t.sum() for t in (x_c, wg, wu, wd)) * 0.0
        if gate_S is not None:
            keep = keep + gate_S.sum().to(dt) * 0.0
        return torch.zeros(out_rows, x.shape[1], dtype=dt, device=dev) + keep
    idx = row_idx_S.to(torch.int32).contiguous() if gather else None
    gate = gate_S.contiguous() if gate_S is not None else None
    # Buffers are used only where the kernels write rows in place (no row index; the forward ignores
    # them otherwise): a wrong shape/dtype, or an x that was converted, means the caller copies.
    if out is not None and (out.shape != (S, x.shape[1]) or out.dtype != dt or not out.is_contiguous()):
        out = None
    return GroupedSwiGLU.apply(x_c, wg, wu, wd, counts_E, idx, gate, out_rows, out,
                               grad_x_out if x_c is x else None)
