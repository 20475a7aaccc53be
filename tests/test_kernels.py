"""The Triton routed-expert kernel against the torch reference backend.

On a machine without a GPU the kernels run in Triton's interpreter (fp32, fp16) on tiny shapes with
16-wide tiles, so every tile, expert and padding border is crossed; with a GPU they run compiled, in bf16
(and fp32), against the torch backend in fp32 on the same values. Every buffer the kernels must write is
poisoned with NaN first, so an element no program wrote shows up.
"""
from __future__ import annotations

import os

import pytest
import torch

_ON_GPU = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
if not _ON_GPU:
    # Must be set before triton (and the kernels' @triton.jit) are imported.
    os.environ["TRITON_INTERPRET"] = "1"
# One config per kernel: the many tiny test shapes would each autotune (compile every config) on a GPU.
os.environ.setdefault("MOE_TRITON_AUTOTUNE", "0")

pytest.importorskip("triton")

import moe.kernels._tiles as tiles  # noqa: E402
import moe.kernels.grouped_swiglu as gs  # noqa: E402
from moe.model.experts import routed_experts  # noqa: E402
from moe.train.determinism import deterministic_mode  # noqa: E402

DEVICE = "cuda" if _ON_GPU else "cpu"
# (name, E, D, F, tokens per expert, tokens T)
CASES = [
    ("odd", 5, 33, 17, [0, 1, 7, 0, 19], 24),
    ("one_expert_all", 4, 33, 17, [0, 0, 37, 0], 37),
    ("single_expert", 1, 16, 32, [9], 12),
    ("multi_tile", 3, 48, 40, [33, 16, 17], 40),
]
if _ON_GPU:  # compiled kernels are fast: add shapes where the Hopper tiles (128 wide) are crossed too
    CASES += [
        ("gpu_mid", 8, 512, 384, [300, 0, 1, 129, 255, 77, 0, 513], 600),
        ("gpu_skew", 16, 256, 192, [700] + [0] * 7 + [1, 3, 5, 7, 9, 11, 13, 127], 800),
    ]
DTYPES = [torch.bfloat16, torch.float32] if _ON_GPU else [torch.float32, torch.float16]
# The second dtype runs on two shapes only: fp16 is slow in the interpreter, fp32 adds compiles on a GPU.
SECOND_DTYPE_CASES = ("odd", "multi_tile")
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(gs, "POISON_BUFFERS", True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    nb = b.norm().item()
    return (a - b).norm().item() / nb if nb > 0 else (0.0 if a.abs().max().item() == 0 else float("inf"))


def _inputs(E: int, D: int, F: int, counts: list[int], T: int, mode: str, with_gate: bool, dtype, seed: int):
    """Random inputs; in gather mode each expert reads distinct tokens, as top-k routing gives."""
    g = torch.Generator().manual_seed(seed)
    S = sum(counts)
    pad = 0 if mode == "gather" else 2  # pre-grouped inputs may carry padding rows past the counted ones
    rows_X = T if mode == "gather" else S + pad
    x = torch.randn(rows_X, D, generator=g)
    w_gate = torch.randn(E, D, F, generator=g) / D**0.5
    w_up = torch.randn(E, D, F, generator=g) / D**0.5
    w_down = torch.randn(E, F, D, generator=g) / F**0.5
    row_idx = None
    if mode == "gather":
        picks = [torch.randperm(T, generator=g)[:c] for c in counts]
        row_idx = torch.cat(picks) if S else torch.zeros(0, dtype=torch.long)
    n_gate = S if mode == "gather" else rows_X
    gate = torch.rand(n_gate, generator=g) if with_gate else None
    cast = [t.to(dtype) for t in (x, w_gate, w_up, w_down)]
    return cast, torch.tensor(counts), row_idx, (gate.to(dtype) if gate is not None else None)


def _run(backend: str, tensors, counts, row_idx, gate, num_out_rows, device, dtype, seed: int):
    """Output and the gradients of x, the three weights and the gate under a random output gradient."""
    leaves = [t.to(device=device, dtype=dtype, copy=True).requires_grad_() for t in tensors]
    gate_l = gate.to(device=device, dtype=dtype, copy=True).requires_grad_() if gate is not None else None
    out = routed_experts(
        leaves[0], *leaves[1:], counts.to(device), row_idx.to(device) if row_idx is not None else None,
        gate_l, num_out_rows, backend=backend,
    )
    r = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    (out * r).sum().backward()
    grads = [t.grad for t in leaves] + ([gate_l.grad] if gate_l is not None else [])
    return out.detach(), grads


def _tma_launches(monkeypatch, tma: bool) -> list[bool]:
    """Select the TMA or the pointer path and record, per launch, whether descriptors were passed."""
    monkeypatch.setattr(tiles, "TMA_MODE", "1" if tma else "0")
    monkeypatch.setattr(gs, "ROWS_DESC_MIN_ROWS", 0)  # the per-expert row descriptors, on short experts too
    used: list[bool] = []
    host, device = gs.tma_args, gs.device_tma

    def spy_host(use_tma: bool, *tensors):
        flag, args = host(use_tma, *tensors)
        used.append(flag)
        return flag, args

    def spy_device(use_tma: bool, *tensors):
        used.append(device(use_tma, *tensors))
        return used[-1]

    monkeypatch.setattr(gs, "tma_args", spy_host)
    monkeypatch.setattr(gs, "device_tma", spy_device)
    return used


def _tma_fits(D: int, F: int, dtype: torch.dtype) -> bool:
    """Whether every descriptor operand's rows are 16-byte multiples (else the launch falls back)."""
    es = torch.tensor([], dtype=dtype).element_size()
    return D * es % 16 == 0 and F * es % 16 == 0


@pytest.mark.parametrize("path", ["tma", "pointers"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_gate", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("mode", ["gather", "grouped"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_torch_backend(case, mode, with_gate, dtype, path, monkeypatch):
    name, E, D, F, counts, T = case
    if dtype == DTYPES[1] and name not in SECOND_DTYPE_CASES:
        pytest.skip(f"{dtype} runs on {SECOND_DTYPE_CASES} only")
    if path == "tma" and _ON_GPU and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability 9 or later")
    used = _tma_launches(monkeypatch, path == "tma")
    _check_against_torch(case, mode, with_gate, dtype)
    # Every one of the six GEMM launches took the path asked for (TMA only where the layout allows); on
    # pre-grouped rows gate_up_fwd and the two weight-gradient kernels also read their row operand
    # through descriptors.
    fits = path == "tma" and _tma_fits(D, F, dtype)
    launches = [fits] * 6
    if mode == "grouped" and fits:
        launches[5:5] = [True]  # after dw_gate_up_bwd's launch flag
        launches[4:4] = [True]  # after dw_down_bwd's
        launches[1:1] = [True]  # after gate_up_fwd's
    assert used == launches, used


@pytest.mark.parametrize("path", ["tma", "pointers"])
@pytest.mark.parametrize("scatter", ["combine", "fp32", "deterministic"])
@pytest.mark.parametrize("case", [c for c in CASES if c[0] in SECOND_DTYPE_CASES], ids=SECOND_DTYPE_CASES)
def test_scatter_modes(case, scatter, path, monkeypatch):
    """MOE_TRITON_SCATTER=combine (store rows, then one sum per token) and =fp32 (atomics into an fp32
    buffer) against the torch backend, as the default bf16 atomics are in the test above.
    "deterministic": the default mode under `torch.use_deterministic_algorithms` takes the combine
    (and PyTorch fills every new buffer with NaN, so an unwritten element shows)."""
    monkeypatch.setattr(gs, "SCATTER_MODE", "bf16" if scatter == "deterministic" else scatter)
    _tma_launches(monkeypatch, path == "tma")
    combines = []
    real = gs.segment_sum
    monkeypatch.setattr(gs, "segment_sum", lambda *a: combines.append(len(a)) or real(*a))
    with deterministic_mode(scatter == "deterministic"):
        _check_against_torch(case, "gather", True, DTYPES[0])
    assert len(combines) == (0 if scatter == "fp32" else 2)  # forward and backward, or never


@pytest.mark.skipif(not _ON_GPU, reason="the interpreter runs one program at a time, so atomics are ordered "
                    "there too: only a GPU can tell")
@pytest.mark.parametrize("how", ["env", "deterministic"])
def test_combine_is_bitwise_reproducible(how, monkeypatch):
    """MOE_TRITON_SCATTER=combine, or the default under train.deterministic, gives the same bits on
    every call: output and every gradient."""
    monkeypatch.setattr(gs, "SCATTER_MODE", "combine" if how == "env" else "bf16")
    name, E, D, F, counts, T = CASES[-1]
    tensors, counts_E, row_idx, gate = _inputs(E, D, F, counts, T, "gather", True, torch.bfloat16, 11)
    with deterministic_mode(how == "deterministic"):
        first = _run("triton", tensors, counts_E, row_idx, gate, T, DEVICE, torch.bfloat16, 11)
        for _ in range(3):
            again = _run("triton", tensors, counts_E, row_idx, gate, T, DEVICE, torch.bfloat16, 11)
            for a, b in zip([first[0], *first[1]], [again[0], *again[1]]):
                assert torch.equal(a, b)


WS_CASES = [("multi_tile", 3, 48, 40, [33, 16, 17], 40), ("ws_idle", 6, 32, 24, [0, 17, 1, 40, 0, 16], 50)]


@pytest.mark.parametrize("scatter", ["bf16", "combine"])
@pytest.mark.parametrize("with_gate", [True, False], ids=["gate", "nogate"])
@pytest.mark.parametrize("mode", ["gather", "grouped"])
@pytest.mark.parametrize("case", WS_CASES, ids=[c[0] for c in WS_CASES])
def test_warp_specialized_down(case, mode, with_gate, scatter, monkeypatch):
    """MOE_TRITON_WS=1: the down projection through `down_ws` (tile table, stores clipped at each
    expert's end; gather mode then sums per token) against the torch backend, including idle experts,
    one-row experts, partial row blocks and, pre-grouped, padding rows that must read zero."""
    if _ON_GPU and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialized down projection is for Hopper")
    if mode == "grouped" and scatter == "combine":
        pytest.skip("pre-grouped rows are never summed")
    import moe.kernels.down_ws as dws

    monkeypatch.setattr(tiles, "TMA_MODE", "1")
    monkeypatch.setattr(gs, "WS_MODE", "1")
    monkeypatch.setattr(gs, "SCATTER_MODE", scatter)
    calls = []
    real = dws.down_rows
    monkeypatch.setattr(dws, "down_rows", lambda *a: calls.append(1) or real(*a))
    _check_against_torch(case, mode, with_gate, DTYPES[0])
    assert calls == [1]


def test_row_blocks_table():
    """The tile table of `down_ws` against a plain loop over the experts, and the zeroed tail rows."""
    import moe.kernels.down_ws as dws

    counts = [0, 3 * dws.BM, 1, 0, 45 * dws.BM + 3, 2 * dws.BM - 1]  # more blocks than one program takes
    S, D = sum(counts), 8
    max_blocks = -(-S // dws.BM) + len(counts)
    table = torch.full((1 + 3 * max_blocks,), -1, dtype=torch.int32, device=DEVICE)
    out = torch.full((S + 5, D), float("nan"), device=DEVICE)
    dws._row_blocks[(-(-max_blocks // dws._CH),)](
        torch.tensor(counts, dtype=torch.int32, device=DEVICE), table, out, len(counts), max_blocks, S + 5, D,
        E_POW2=256, BM=dws.BM, CH=dws._CH)
    want, row = [], 0
    for e, c in enumerate(counts):
        want += [[e, row + m, row + c] for m in range(0, c, dws.BM)]
        row += c
    n = table[0].item()
    assert n == len(want)
    assert table[1:1 + 3 * n].view(n, 3).tolist() == want
    assert torch.count_nonzero(out[S:]) == 0 and out[:S].isnan().all()


def _check_against_torch(case, mode: str, with_gate: bool, dtype) -> None:
    """Triton output and gradients against the torch backend in fp32, and idle experts' exact zeros."""
    name, E, D, F, counts, T = case
    seed = 1000 + len(name) * 7 + E
    tensors, counts_E, row_idx, gate = _inputs(E, D, F, counts, T, mode, with_gate, dtype, seed)
    num_out_rows = T + 3 if mode == "gather" else None  # more output rows than x has: must read zero
    out, grads = _run("triton", tensors, counts_E, row_idx, gate, num_out_rows, DEVICE, dtype, seed)
    # Reference: the per-expert torch loop in fp32 on the same (already rounded) values; on the CPU
    # in fp32 this is the very backend the kernel replaces.
    ref_dtype = torch.float32
    ref_out, ref_grads = _run("torch", tensors, counts_E, row_idx, gate, num_out_rows, DEVICE, ref_dtype, seed)

    assert out.dtype == dtype and out.shape == ref_out.shape
    names = ["out", "dx", "dw_gate", "dw_up", "dw_down"] + (["dgate"] if with_gate else [])
    for n, a, b in zip(names, [out] + grads, [ref_out] + ref_grads):
        assert a is not None, f"{n} is None"
        assert a.shape == b.shape and a.dtype == dtype, n
        assert torch.isfinite(a).all(), f"{n} has unwritten (NaN) or non-finite elements"
        err = _rel(a.float(), b.float())
        assert err < TOL[dtype], f"{name}/{mode}/{n}: relative error {err:.2e}"
    # Idle experts: an exact zero gradient, not None and not rounding noise.
    for e, c in enumerate(counts):
        if c == 0:
            for n, gw in zip(["dw_gate", "dw_up", "dw_down"], grads[1:4]):
                assert torch.count_nonzero(gw[e]) == 0, f"idle expert {e} has a nonzero {n}"


@pytest.mark.parametrize("mode", ["gather", "grouped"])
def test_no_tokens(mode):
    """All experts idle: zero output and exact zero gradients (pre-grouped: only padding rows)."""
    E, D, F, T = 3, 33, 17, 5
    dtype = DTYPES[0]
    tensors, counts_E, row_idx, gate = _inputs(E, D, F, [0, 0, 0], T, mode, True, dtype, 7)
    out, grads = _run("triton", tensors, counts_E, row_idx, gate, T if mode == "gather" else None, DEVICE, dtype, 7)
    assert out.shape == (T if mode == "gather" else 2, D)
    assert torch.count_nonzero(out) == 0
    for gr in grads:
        assert gr is not None and torch.count_nonzero(gr) == 0


@pytest.mark.parametrize("mode", ["gather", "grouped"])
def test_backward_frees_hc_before_the_weight_gradients(mode, monkeypatch):
    """From the weight gradients' allocation on (with dx's, the backward's high points), of the S x F
    buffers only the saved g and u and the dg and du that dx still needs may be alive: not hc (nor a, nor
    the forward's h), also where a descriptor built over it outlives the launch."""
    import weakref

    name, E, D, F, counts, T = CASES[3]  # D != F, so dw_gate's [E, D, F] shape is its own
    dtype = DTYPES[0]
    tensors, counts_E, row_idx, gate = _inputs(E, D, F, counts, T, mode, True, dtype, 5)
    S = sum(counts) if mode == "gather" else tensors[0].shape[0]  # pre-grouped: the padding rows too
    live: list[weakref.ref] = []
    after_dw: list[tuple[int, ...]] = []  # (shape..., live S x F buffers) of each allocation from dw_gate's on
    real = gs._empty

    def spy(*shape: int, dtype: torch.dtype, device) -> torch.Tensor:
        if shape == (E, D, F) or after_dw:
            after_dw.append((*shape, sum(r() is not None for r in live)))
        t = real(*shape, dtype=dtype, device=device)
        if shape == (S, F):
            live.append(weakref.ref(t))
        return t

    monkeypatch.setattr(gs, "_empty", spy)
    _run("triton", tensors, counts_E, row_idx, gate, T if mode == "gather" else None, DEVICE, dtype, 5)
    assert len(live) == 7  # h, g, u in the forward; a, dg, du, hc in the backward
    expected = [(E, D, F, 4), (E, D, F, 4)]  # dw_gate, dw_up
    if mode == "grouped":
        expected.append((S, D, 4))  # dx, one row per input row
    assert after_dw == expected


def test_inference_matches_training_forward():
    """Under no_grad the pre-activations are not stored; the output must not change."""
    name, E, D, F, counts, T = CASES[0]
    dtype = DTYPES[0]
    tensors, counts_E, row_idx, gate = _inputs(E, D, F, counts, T, "gather", True, dtype, 3)
    args = [t.to(DEVICE) for t in tensors]
    extra = (counts_E.to(DEVICE), row_idx.to(DEVICE), gate.to(DEVICE), T)
    with torch.no_grad():
        y = routed_experts(*args, *extra, backend="triton")
    ref, _ = _run("torch", tensors, counts_E, row_idx, gate, T, DEVICE, torch.float32, 3)
    assert torch.isfinite(y).all()
    assert _rel(y.float(), ref) < TOL[dtype]


@pytest.mark.skipif(not _ON_GPU, reason="autocast bf16 needs the compiled kernels (the interpreter's bf16 is wrong)")
def test_autocast_bf16_on_gpu():
    """fp32 parameters under bf16 autocast: the kernel computes in bf16 and grads come back fp32."""
    name, E, D, F, counts, T = CASES[-1]
    tensors, counts_E, row_idx, gate = _inputs(E, D, F, counts, T, "gather", True, torch.float32, 5)
    leaves = [t.to(DEVICE, copy=True).requires_grad_() for t in tensors]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = routed_experts(*leaves, counts_E.to(DEVICE), row_idx.to(DEVICE), gate.to(DEVICE), T, backend="triton")
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in leaves)
    ref, _ = _run("torch", tensors, counts_E, row_idx, gate, T, DEVICE, torch.float32, 5)
    assert _rel(y.float(), ref) < 1e-2


def test_tma_policy(monkeypatch):
    """"auto" takes TMA only on compute capability 9+ and for layers of at least TMA_MIN_WORK."""
    monkeypatch.setattr(tiles, "INTERPRET", False)
    cap = {"v": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["v"])
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(tiles, "TMA_MODE", "auto")
    assert not tiles.tma_enabled(gpu, tiles.TMA_MIN_WORK - 1)
    assert tiles.tma_enabled(gpu, tiles.TMA_MIN_WORK)
    assert not tiles.tma_enabled(torch.device("cpu"), tiles.TMA_MIN_WORK)
    cap["v"] = (8, 0)
    assert not tiles.tma_enabled(gpu, tiles.TMA_MIN_WORK)
    cap["v"] = (9, 0)
    monkeypatch.setattr(tiles, "TMA_MODE", "1")
    assert tiles.tma_enabled(gpu, 1)
    monkeypatch.setattr(tiles, "TMA_MODE", "0")
    assert not tiles.tma_enabled(gpu, tiles.TMA_MIN_WORK)


def test_bad_scatter_mode_is_refused():
    """A mistyped MOE_TRITON_SCATTER fails at import, naming the value and the allowed ones."""
    import subprocess
    import sys

    env = {**os.environ, "MOE_TRITON_SCATTER": "atomic"}
    r = subprocess.run([sys.executable, "-c", "import moe.kernels"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "MOE_TRITON_SCATTER='atomic' is not one of ('bf16', 'fp32', 'combine'); unset it for 'bf16'" in r.stderr


def test_bad_tma_mode_is_refused():
    """A mistyped MOE_TRITON_TMA fails at import, naming the value and the allowed ones."""
    import subprocess
    import sys

    env = {**os.environ, "MOE_TRITON_TMA": "yes"}
    r = subprocess.run([sys.executable, "-c", "import moe.kernels._tiles"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "MOE_TRITON_TMA='yes' is not one of ('auto', '0', '1'); unset it for 'auto'" in r.stderr


def test_bad_ws_mode_is_refused():
    """A mistyped MOE_TRITON_WS fails at import, naming the value and the allowed ones."""
    import subprocess
    import sys

    env = {**os.environ, "MOE_TRITON_WS": "on"}
    r = subprocess.run([sys.executable, "-c", "import moe.kernels.grouped_swiglu"], env=env, capture_output=True,
                       text=True)
    assert r.returncode != 0
    assert "MOE_TRITON_WS='on' is not one of ('auto', '0', '1'); unset it for 'auto'" in r.stderr


def test_descriptor_store_configs_only_where_stores_can_use_them(monkeypatch):
    """ST=1 configs are timed only where the launch stores through descriptors, and pay their store tile."""
    import triton

    monkeypatch.setattr(tiles, "AUTOTUNE", True)
    cfgs = [triton.Config({"BM": 128, "BN": 256, "BK": 64, "ST": st}, num_warps=8, num_stages=stages)
            for stages in (3, 4) for st in (1, 0)]
    prune = tiles.smem_prune("a", 1, stores_on=tiles.tma_on_without_scatter)
    a = torch.empty(1, dtype=torch.bfloat16)
    kept = lambda **launch: [(c.num_stages, c.kwargs["ST"]) for c in prune(cfgs, {"a": a}, **launch)]  # noqa: E731
    # Stage buffers: 48 KiB each; the store tile adds 64 KiB, so 4 stages + store (256 KiB) do not fit.
    assert kept(TMA=True, SCATTER=False) == [(3, 1), (3, 0), (4, 0)]
    assert kept(TMA=True, SCATTER=True) == [(3, 0), (4, 0)]
    assert kept(TMA=False, SCATTER=False) == [(3, 0), (4, 0)]
