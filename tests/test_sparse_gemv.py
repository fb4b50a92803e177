"""sparse_gemv (Triton, run by the CPU interpreter here) against sparse_gemv_reference.

Every case draws fresh random inputs, poisons the output with NaN so an unwritten element fails,
and compares with an fp32 reference by relative error ||y - ref|| / ||ref||.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import math

import pytest
import torch

from actsparse.kernels import sparse_gemv as sg
from actsparse.kernels.sparse_gemv import (
    GemvConfig,
    pick_config,
    sparse_gemv,
    sparse_gemv_add_,
    sparse_gemv_add_reference,
    sparse_gemv_reference,
)

pytestmark = pytest.mark.interpreter  # Triton kernels on CPU tensors (skipped when TRITON_INTERPRET=0)

TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def make_case(K, N, B, sparsity, dtype, seed):
    """x: [B, K] with per-channel scales; per-channel thresholds giving ~`sparsity` zeroed inputs."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.5 * torch.randn(K, generator=gen))  # [K]
    x = (torch.randn(B, K, generator=gen) * scale).to(dtype)
    w_t = (torch.randn(K, N, generator=gen) / math.sqrt(K)).to(dtype)
    if sparsity >= 1.0:
        thresholds = x.float().abs().amax(dim=0)  # strict '>': nothing kept
    else:
        # per-row keep probability so that the union over the batch is ~(1 - sparsity)
        row_sparsity = sparsity ** (1.0 / B)
        q = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + row_sparsity / 2)).item()
        thresholds = (scale * q).float() if sparsity > 0 else torch.zeros(K)
    return x, w_t, thresholds.contiguous()


def exact(x, w_t, thresholds):
    """fp32 result without the final rounding (the kernel rounds once; so may the reference)."""
    x32 = x.float()
    thr = 0.0 if thresholds is None else thresholds
    return torch.where(x32.abs() > thr, x32, torch.zeros_like(x32)) @ w_t.float()


def rel_err(y, ref):
    return ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def run_poisoned(x, w_t, thresholds, **kw):
    B = x.shape[0] if x.dim() == 2 else 1
    out = torch.full((B, w_t.shape[1]), float("nan"), dtype=x.dtype)
    return sg._sparse_gemv_impl(x, w_t, thresholds, out=out, **kw)


CASES = [
    # (K, N, B, sparsity%, dtype): odd sizes everywhere; the large odd shape on fewer cases
    *[(193, 333, B, s, dt) for B in (1, 3, 8) for s in (0, 50, 99, 100) for dt in (torch.bfloat16, torch.float16)],
    *[(577, 1001, B, 50, dt) for B in (1, 3, 8) for dt in (torch.bfloat16, torch.float16)],
    (577, 1001, 1, 0, torch.float32),
    (577, 1001, 5, 90, torch.float32),
]


@pytest.mark.parametrize(
    "K,N,B,s,dtype", CASES, ids=[f"K{K}-N{N}-B{B}-s{s}-{DTYPE_NAME[dt]}" for K, N, B, s, dt in CASES]
)
def test_matches_reference(K, N, B, s, dtype):
    x, w_t, thresholds = make_case(K, N, B, s / 100, dtype, seed=hash((K, N, B, s)) % 2**31)
    kept_rows = (x.float().abs() > thresholds).any(dim=0).float().mean().item()
    if 0 < s < 100:  # the generated case has roughly the sparsity it claims
        assert abs((1 - kept_rows) - s / 100) < 0.12
    y = run_poisoned(x, w_t, thresholds)
    assert y.shape == (B, N) and y.dtype == dtype
    assert not torch.isnan(y).any(), "unwritten output elements"
    if s == 100:
        assert kept_rows == 0.0
        assert torch.equal(y, torch.zeros_like(y))
        return
    ref = exact(x, w_t, thresholds)
    assert rel_err(y, ref) < TOL[dtype]
    assert rel_err(sparse_gemv_reference(x, w_t, thresholds), ref) < TOL[dtype]


@pytest.mark.parametrize(
    "config",
    [
        GemvConfig(16, 64, num_stages=2, programs_per_sm=8),
        GemvConfig(32, 128, num_stages=1, num_warps=2),
        GemvConfig(32, 64, num_stages=3, programs_per_sm=2),
        GemvConfig(32, 64, use_dot=True),
        GemvConfig(32, 64, num_stages=3, use_dot=True),
        GemvConfig(512, 256),
        GemvConfig(512, 256, num_stages=2),
        GemvConfig(16, 64, programs_per_sm=8, compact=True),
        GemvConfig(32, 128, num_warps=2, compact=True),
        GemvConfig(32, 64, use_dot=True, compact=True),
        GemvConfig(512, 256, compact=True),
        GemvConfig(16, 64, programs_per_sm=1, compact=True, chunk=16),
        GemvConfig(16, 64, programs_per_sm=1, compact=True, chunk=16, prefetch=True),
        GemvConfig(32, 64, compact=True, chunk=32, prefetch=True, pdl=True),
        GemvConfig(128, 64, programs_per_sm=2, compact=True, chunk=64, prefetch=True, tile_sum=True),
    ],
    ids=["pipelined-many-splits", "register-2warps", "pipelined", "register-dot-b1", "pipelined-dot-b1",
         "register-single-split", "pipelined-single-split", "compact-many-splits", "compact-2warps",
         "compact-dot-b1", "compact-single-split", "compact-chunk16", "compact-chunk16-prefetch",
         "compact-chunk32-prefetch-pdl", "compact-tile-sum"],
)
@pytest.mark.parametrize("B", [1, 4])
def test_configs(config, B):
    """Both loop variants, many K splits, tl.dot for B == 1 and the single-split path agree."""
    x, w_t, thresholds = make_case(300, 200, B, 0.5, torch.bfloat16, seed=7 + B)
    y = run_poisoned(x, w_t, thresholds, config=config)
    assert rel_err(y, exact(x, w_t, thresholds)) < TOL[torch.bfloat16]


def test_thresholds_none_keeps_nonzeros():
    gen = torch.Generator().manual_seed(3)
    x = torch.relu(torch.randn(2, 257, generator=gen)).to(torch.float16)  # ~half exact zeros
    w_t = torch.randn(257, 99, generator=gen).to(torch.float16)
    y = run_poisoned(x, w_t, None)
    assert rel_err(y, exact(x, w_t, None)) < TOL[torch.float16]
    assert rel_err(sparse_gemv(x, w_t, None), exact(x, w_t, None)) < TOL[torch.float16]


def test_nan_inputs_are_never_kept():
    x, w_t, thresholds = make_case(160, 96, 2, 0.5, torch.float32, seed=11)
    x[0, 5] = float("nan")
    x[1, 17] = float("nan")
    y = run_poisoned(x, w_t, thresholds)
    ref = exact(x, w_t, thresholds)
    assert torch.isfinite(ref).all() and torch.isfinite(y).all()
    assert rel_err(y, ref) < TOL[torch.float32]


def test_workspace_is_left_zero_and_reused():
    x, w_t, thresholds = make_case(577, 1001, 3, 0.5, torch.bfloat16, seed=5)
    y1 = sg._sparse_gemv_impl(x, w_t, thresholds, persistent_workspace=True)
    acc, counts, _ = sg._WORKSPACES[sg._stream_key(x.device)]
    assert torch.count_nonzero(acc) == 0 and torch.count_nonzero(counts) == 0
    y2 = sg._sparse_gemv_impl(x, w_t, thresholds, persistent_workspace=True)
    torch.testing.assert_close(y1, y2, rtol=1e-2, atol=1e-3)
    # the functional path (what torch.compile traces) computes the same thing
    y3 = sg._sparse_gemv_impl(x, w_t, thresholds, persistent_workspace=False)
    torch.testing.assert_close(y1, y3, rtol=1e-2, atol=1e-3)


def test_vector_input_and_large_batch_fallback():
    x, w_t, thresholds = make_case(130, 70, 1, 0.5, torch.bfloat16, seed=13)
    y = sparse_gemv(x[0], w_t, thresholds)
    assert y.shape == (70,)
    assert rel_err(y, exact(x, w_t, thresholds)[0]) < TOL[torch.bfloat16]
    xb, w_t, thresholds = make_case(130, 70, 11, 0.5, torch.bfloat16, seed=17)  # B > 8
    yb = sparse_gemv(xb, w_t, thresholds)
    assert yb.shape == (11, 70)
    assert rel_err(yb, exact(xb, w_t, thresholds)) < TOL[torch.bfloat16]


def test_custom_op_registered():
    x, w_t, thresholds = make_case(200, 150, 2, 0.4, torch.float16, seed=19)
    y = torch.ops.actsparse.sparse_gemv(x, w_t, thresholds)
    assert rel_err(y, exact(x, w_t, thresholds)) < TOL[torch.float16]
    y_none = torch.ops.actsparse.sparse_gemv(x, w_t, None)
    assert rel_err(y_none, exact(x, w_t, None)) < TOL[torch.float16]


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda x, w, t: (x[:, :-1], w, t), ValueError, "K="),
        (lambda x, w, t: (x, w.float(), t), TypeError, "dtype"),
        (lambda x, w, t: (x.to(torch.int32), w, t), TypeError, "x.dtype"),
        (lambda x, w, t: (x, w.t().contiguous().t(), t), ValueError, "contiguous"),
        (lambda x, w, t: (x, w, t[:-1]), ValueError, "thresholds must be"),
        (lambda x, w, t: (x, w, t.half()), TypeError, "float32"),
        (lambda x, w, t: (x[None], w, t), ValueError, r"\[B, K\]"),
        (lambda x, w, t: (x, w[None], t), ValueError, r"\[K, N\]"),
    ],
    ids=["k-mismatch", "dtype-mismatch", "int-dtype", "strided-w", "thr-shape", "thr-dtype", "x-3d", "w-3d"],
)
def test_launcher_errors(make_args, error, match):
    x = torch.randn(2, 48, dtype=torch.bfloat16)
    w_t = torch.randn(48, 32, dtype=torch.bfloat16)
    thr = torch.zeros(48)
    with pytest.raises(error, match=match):
        sparse_gemv(*make_args(x, w_t, thr))


def test_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 32, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):
        sg._sparse_gemv_impl(x, torch.randn(32, 16, dtype=torch.bfloat16), None)


def test_config_validation_and_pick():
    with pytest.raises(ValueError, match="power of two"):
        GemvConfig(block_k=48, block_n=64)
    for K, N, B in [(1, 1, 1), (577, 1001, 3), (4096, 28672, 1), (14336, 4096, 8)]:
        cfg = pick_config(K, N, B)
        assert cfg.block_k >= 16 and cfg.block_n >= 16


@pytest.mark.parametrize("B", [1, 5])
def test_compact_ignores_stale_scratch(B):
    """The row-index scratch is never cleared: garbage left in it must not change the result."""
    cfg = GemvConfig(16, 64, programs_per_sm=8, compact=True)
    x, w_t, thresholds = make_case(333, 150, B, 0.7, torch.float32, seed=21 + B)
    y1 = run_poisoned(x, w_t, thresholds, config=cfg, persistent_workspace=True)
    _, _, idx = sg._WORKSPACES[sg._stream_key(x.device)]
    idx.fill_(123456)  # far out of range: a stale index would read garbage or fault
    y2 = run_poisoned(x, w_t, thresholds, config=cfg, persistent_workspace=True)
    ref = exact(x, w_t, thresholds)
    assert rel_err(y1, ref) < TOL[torch.float32] and rel_err(y2, ref) < TOL[torch.float32]


@pytest.mark.parametrize("K,N", [(4096, 28672), (14336, 4096), (4096, 4096), (300, 200)])
def test_compact_split_fits_one_wave(K, N):
    """The compacting variant floors its K splits: one wave of programs covers all of K."""
    cfg = GemvConfig(32, 128, programs_per_sm=6, compact=True)
    grid_n = -(-N // cfg.block_n)
    grid_k, steps = sg.split_k(K, grid_n, cfg, sm_count=132)
    assert grid_k * steps * cfg.block_k >= K > (grid_k - 1) * steps * cfg.block_k
    assert grid_n * grid_k <= max(grid_n, 6 * 132)


def test_tuned_configs(tmp_path):
    import json

    path = tmp_path / "tuned.json"
    path.write_text(json.dumps({"b1": {"block_k": 64, "block_n": 256, "num_warps": 8, "compact": True},
                                "batched": {"block_k": 16, "block_n": 128}}))
    try:
        sg.load_tuned_configs(str(path))
        pdl = sg.pdl_default()  # the launch form rides along (on by default, inert off Hopper)
        assert pick_config(4096, 4096, 1) == GemvConfig(64, 256, num_warps=8, compact=True, pdl=pdl)
        assert pick_config(4096, 4096, 4) == GemvConfig(16, 128, pdl=pdl)
        assert pick_config(20, 40, 1).block_k == 32  # still clamped to the problem
        x, w_t, thresholds = make_case(200, 300, 1, 0.5, torch.bfloat16, seed=5)
        assert rel_err(run_poisoned(x, w_t, thresholds), exact(x, w_t, thresholds)) < TOL[torch.bfloat16]
    finally:
        sg.set_tuned_configs()
    assert pick_config(4096, 4096, 1).compact


def test_pdl_default_rides_on_picked_configs(monkeypatch):
    """PDL is on by default (ACTSPARSE_GEMV_PDL=0 turns it off) and reaches every picked config."""
    assert sg.pdl_default() == (os.environ.get("ACTSPARSE_GEMV_PDL", "1") != "0")
    default = sg.pdl_default()
    try:
        sg.set_pdl_default(True)
        assert pick_config(4096, 4096, 1).pdl and pick_config(4096, 28672, 4).pdl
        sg.set_pdl_default(False)
        assert not pick_config(4096, 4096, 1).pdl and not pick_config(4096, 28672, 4).pdl
    finally:
        sg.set_pdl_default(default)


ADD_CASES = [  # (K, N, B, sparsity%, dtype, config): odd shapes, split-K and single-split programs
    (193, 333, 1, 50, torch.bfloat16, None),
    (577, 1001, 1, 90, torch.float16, None),
    (577, 1001, 3, 50, torch.bfloat16, None),
    (300, 200, 8, 70, torch.float32, None),
    (300, 200, 1, 0, torch.bfloat16, GemvConfig(512, 256, compact=True)),  # one split
    (300, 200, 4, 50, torch.float16, GemvConfig(32, 64, num_stages=2)),  # pipelined variant
    (300, 200, 1, 50, torch.bfloat16, GemvConfig(32, 128, num_warps=2)),  # register variant
    (300, 200, 1, 100, torch.bfloat16, None),  # nothing kept: out unchanged
    (577, 301, 1, 60, torch.float32, GemvConfig(16, 64, programs_per_sm=1, compact=True, chunk=16, prefetch=True)),
    (1100, 333, 1, 85, torch.bfloat16, GemvConfig(128, 128, programs_per_sm=1, compact=True, tile_sum=True)),
    (577, 301, 1, 60, torch.float16, GemvConfig(64, 64, programs_per_sm=1, compact=True, chunk=64, tile_sum=True)),
]


@pytest.mark.parametrize("K,N,B,s,dtype,config", ADD_CASES,
                         ids=[f"K{c[0]}-N{c[1]}-B{c[2]}-s{c[3]}-{DTYPE_NAME[c[4]]}-{c[5] or 'default'}"
                              for c in ADD_CASES])
def test_add_matches_reference(K, N, B, s, dtype, config):
    """sparse_gemv_add_: out (fp32) += masked(x) @ w_t, on top of what out already holds."""
    x, w_t, thresholds = make_case(K, N, B, s / 100, dtype, seed=hash((K, N, B, s, 1)) % 2**31)
    start = torch.randn(B, N, generator=torch.Generator().manual_seed(K + N + B))
    out = start.clone()
    sg._sparse_gemv_add_impl(out, x, w_t, thresholds, config=config)
    ref = start + exact(x, w_t, thresholds)
    # relative to the size of the product itself, not of start (which would hide a wrong product)
    err = ((out - ref).norm() / exact(x, w_t, thresholds).norm().clamp_min(1e-30)).item()
    if s == 100:
        assert torch.equal(out, start)
    else:
        assert err < (1e-5 if dtype == torch.float32 else 2e-3), err
    assert torch.allclose(sparse_gemv_add_reference(start.clone(), x, w_t, thresholds), ref, atol=1e-4)


def test_add_custom_op_vector_batch_fallback_and_errors():
    x, w_t, thresholds = make_case(130, 70, 1, 0.5, torch.bfloat16, seed=23)
    out = torch.ones(70)
    assert sparse_gemv_add_(out, x[0], w_t, thresholds) is out  # [K] input, [N] accumulator
    assert torch.allclose(out, 1 + exact(x, w_t, thresholds)[0], atol=1e-3)
    xb, w_t, thresholds = make_case(130, 70, 11, 0.5, torch.bfloat16, seed=29)  # B > 8: dense fallback
    outb = torch.zeros(11, 70)
    torch.ops.actsparse.sparse_gemv_add_(outb, xb, w_t, thresholds)
    assert torch.allclose(outb, exact(xb, w_t, thresholds), atol=1e-3)
    with pytest.raises(TypeError, match="float32"):
        sparse_gemv_add_(torch.zeros(1, 70, dtype=torch.bfloat16), x, w_t, thresholds)
    with pytest.raises(ValueError, match="shape"):
        sparse_gemv_add_(torch.zeros(2, 70), x, w_t, thresholds)
    with pytest.raises(ValueError, match="contiguous"):
        sparse_gemv_add_(torch.zeros(1, 140)[:, ::2], x, w_t, thresholds)


def test_pdl_flag_is_inert_off_hopper():
    """GemvConfig(pdl=True) only changes the launch on a Hopper-or-newer GPU; here (the CPU
    interpreter) it runs the plain kernel and gives the same result."""
    assert "pdl" in str(GemvConfig(64, 128, compact=True, pdl=True))
    assert not sg._pdl_supported(torch.device("cpu"))
    x, w_t, thresholds = make_case(300, 200, 1, 0.5, torch.bfloat16, seed=31)
    y = run_poisoned(x, w_t, thresholds, config=GemvConfig(64, 128, compact=True, pdl=True))
    assert rel_err(y, exact(x, w_t, thresholds)) < TOL[torch.bfloat16]


# ------------------------------------------------------------------ input prologues (RMSNorm, SiLU)
def prologue_case(K, N, B, sparsity, dtype, pre, seed):
    """(x, w_t, thresholds, kwargs): x is the RMSNorm's fp32 input or the [gate | up] output. Each
    threshold sits halfway between two of its column's |inputs| (after the prologue) at least 5%
    apart, so an ulp of difference in how the prologue rounds cannot flip a keep decision. A column drops all rows
    with probability `sparsity`, else keeps a random number of them."""
    gen = torch.Generator().manual_seed(seed)
    w_t = (torch.randn(K, N, generator=gen) / math.sqrt(K)).to(dtype)
    if pre == "rmsnorm":
        x = torch.randn(B, K, generator=gen) * 3 + 0.5
        kw = dict(norm_weight=(0.5 + torch.rand(K, generator=gen)).to(dtype), eps=1e-5)
    else:
        x = (torch.randn(B, 2 * K, generator=gen) * 2).to(dtype)
        kw = dict(act="silu")
    v = sg.apply_input_prologue(x, dtype, **kw).float().abs().sort(dim=0).values  # [B, K] ascending
    v = torch.cat([torch.zeros(1, K), v, 1.5 * v[-1:] + 1e-3])  # [B + 2, K]
    drop = torch.rand(K, generator=gen) < sparsity
    j = torch.where(drop, torch.full((K,), B), torch.randint(0, B, (K,), generator=gen))
    lo, hi = v.gather(0, j[None])[0], v.gather(0, j[None] + 1)[0]
    j = torch.where(hi - lo < 0.05 * hi, torch.zeros_like(j), j)  # a gap of < 5%: keep the column
    thresholds = 0.5 * (v.gather(0, j[None] + 0) + v.gather(0, j[None] + 1))[0]
    return x, w_t, thresholds.float().contiguous(), kw


PROLOGUE_CASES = [
    (pre, K, N, B, s, dt)
    for pre in ("rmsnorm", "silu")
    for (K, N, B, s, dt) in [(193, 333, 1, 0.5, torch.bfloat16), (577, 301, 3, 0.5, torch.float16),
                             (300, 200, 8, 0.3, torch.bfloat16), (577, 1001, 1, 0.9, torch.float32),
                             (130, 70, 2, 0.0, torch.float32)]
]


@pytest.mark.parametrize("pre,K,N,B,s,dtype", PROLOGUE_CASES,
                         ids=[f"{c[0]}-K{c[1]}-N{c[2]}-B{c[3]}-s{c[4]}-{DTYPE_NAME[c[5]]}" for c in PROLOGUE_CASES])
def test_input_prologue_matches_reference(pre, K, N, B, s, dtype):
    """sparse_gemv / sparse_gemv_add_ with the RMSNorm or SiLU-gate prologue computed in the kernel
    = the masked product of apply_input_prologue(x): fp32 to 1e-5, fp16 to 2e-3; bf16 to 2.5e-2,
    since the interpreter rounds fp32 -> bf16 by truncation (the GPU rounds to nearest), which
    biases each rounded input toward zero (measured 0.9%; a wrong scale or gate/up order is > 10%)."""
    x, w_t, thresholds, kw = prologue_case(K, N, B, s, dtype, pre, seed=hash((pre, K, N, B)) % 2**31)
    xin = sg.apply_input_prologue(x, dtype, **kw)
    ref = exact(xin, w_t, thresholds)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2.5e-2}[dtype]
    out = torch.full((B, N), float("nan"), dtype=dtype)
    y = sg._sparse_gemv_impl(x, w_t, thresholds, out=out, **kw)
    assert y.dtype == dtype and rel_err(y, ref) < tol
    assert rel_err(sparse_gemv_reference(x, w_t, thresholds, **kw), ref) < tol  # the reference itself
    start = torch.randn(B, N)
    acc = start.clone()
    sparse_gemv_add_(acc, x, w_t, thresholds, **kw)
    assert ((acc - start - ref).norm() / ref.norm()).item() < tol
    # the custom op (keyword arguments) and a [K] input
    y1 = sparse_gemv(x[0], w_t, thresholds, **kw)
    assert y1.shape == (N,) and rel_err(y1, exact(xin[:1], w_t, thresholds)[0]) < tol
    if s == 0.0:  # every threshold below every input: the dense product of the prologue's output
        assert rel_err(sparse_gemv(x, w_t, None, **kw), xin.float() @ w_t.float()) < tol


@pytest.mark.parametrize("pre", ["rmsnorm", "silu"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["chunk-by-chunk", "prefetch"])
def test_input_prologue_over_many_chunks(pre, prefetch):
    """B = 1 with the prologue over many compaction chunks, both load orders: the first chunk's
    loads go out before the RMSNorm scale is known, later ones either a chunk ahead (prefetch) or
    after the previous chunk is ranked. fp32, so any wrong scale, order or chunk is far off."""
    config = GemvConfig(16, 64, programs_per_sm=1, compact=True, chunk=16, prefetch=prefetch)
    x, w_t, thresholds, kw = prologue_case(577, 301, 1, 0.6, torch.float32, pre, seed=43)
    ref = exact(sg.apply_input_prologue(x, torch.float32, **kw), w_t, thresholds)
    y = sg._sparse_gemv_impl(x, w_t, thresholds, out=torch.full((1, 301), float("nan")), config=config, **kw)
    assert rel_err(y, ref) < 1e-5
    acc = torch.zeros(1, 301)
    sg._sparse_gemv_add_impl(acc, x, w_t, thresholds, config=config, **kw)
    assert rel_err(acc, ref) < 1e-5


def test_input_prologue_batch_fallback_and_errors():
    x, w_t, thresholds, kw = prologue_case(130, 70, 11, 0.5, torch.bfloat16, "rmsnorm", seed=41)  # B > 8
    ref = exact(sg.apply_input_prologue(x, torch.bfloat16, **kw), w_t, thresholds)
    assert rel_err(sparse_gemv(x, w_t, thresholds, **kw), ref) < 1e-2  # PyTorch ops: rounded to nearest
    acc = torch.zeros(11, 70)
    sparse_gemv_add_(acc, x, w_t, thresholds, **kw)
    assert rel_err(acc, ref) < 1e-4
    with pytest.raises(ValueError, match="2K"):
        sparse_gemv(torch.randn(1, 130, dtype=torch.bfloat16), w_t, thresholds, act="silu")
    with pytest.raises(ValueError, match="act"):
        sparse_gemv(torch.randn(1, 260, dtype=torch.bfloat16), w_t, thresholds, act="gelu")
    with pytest.raises(ValueError, match="one"):
        sparse_gemv(torch.randn(1, 260, dtype=torch.bfloat16), w_t, thresholds, act="silu", **kw)
    with pytest.raises(ValueError, match="norm_weight"):
        sparse_gemv(x[:1], w_t, thresholds, norm_weight=kw["norm_weight"][:-1])
    with pytest.raises(TypeError, match="norm_weight"):
        sparse_gemv(x[:1], w_t, thresholds, norm_weight=kw["norm_weight"].float())
    with pytest.raises(TypeError, match="must equal"):  # without a norm, x and w_t share a dtype
        sparse_gemv(x[:1], w_t, thresholds)
    with pytest.raises(ValueError, match="compacting"):
        sg._sparse_gemv_impl(x[:1], w_t, thresholds, config=GemvConfig(32, 64), **kw)


def test_maxnreg_config():
    """GemvConfig.maxnreg: validated, named, and inert under the interpreter (a launch option on
    the GPU; the result is the same function)."""
    cfg = GemvConfig(32, 256, compact=True, tile_sum=True, maxnreg=128)
    assert str(cfg).endswith("-ts-r128")
    with pytest.raises(ValueError, match="maxnreg"):
        GemvConfig(64, 128, compact=True, maxnreg=300)
    x, w_t, thresholds = make_case(300, 200, 1, 0.5, torch.bfloat16, seed=37)
    assert rel_err(run_poisoned(x, w_t, thresholds, config=cfg), exact(x, w_t, thresholds)) < TOL[torch.bfloat16]


def test_pdl_is_left_out_while_inductor_traces(monkeypatch):
    """PDL's inline PTX defeats Inductor's mutation analysis of user kernels, so a launch whose
    arguments are fake or functional tensors (Inductor tracing the custom op) is built without it;
    real launches on Hopper+ keep it."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(sg, "_interpreting", lambda: False)
    monkeypatch.setattr(sg, "_cuda_capability", lambda index: (9, 0))
    cuda = torch.device("cuda", 0)
    assert sg._pdl_supported(cuda, probe=torch.zeros(2))
    with FakeTensorMode():
        fake = torch.empty(2)
    assert not sg._pdl_supported(cuda, probe=fake)
    monkeypatch.setattr(sg, "_cuda_capability", lambda index: (8, 0))
    assert not sg._pdl_supported(cuda, probe=torch.zeros(2))
