"""sparse_gate_up (Triton, run by the interpreter on the CPU) against its pure-PyTorch reference.

Note on bf16 under TRITON_INTERPRET=1: the interpreter casts fp32 -> bf16 by truncation, not
round-to-nearest, so bf16 outputs differ from the reference by up to one ulp (relative error
~3e-3 to 6e-3, under the 1e-2 tolerance). fp16 and fp32 match to rounding.
"""
import os
import zlib

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (conftest does it too)

import pytest
import torch

from actsparse.kernels.sparse_mlp import (
    SparseGatedMLP,
    _activation_torch,
    _check_inputs,
    _launch_sparse_gate_up,
    default_config,
    sparse_gate_up,
    sparse_gate_up_reference,
)

pytestmark = pytest.mark.interpreter  # Triton kernels on CPU tensors

TOL = {torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float32: 1e-5}
DTYPE_NAME = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    denom = ref.norm().item()
    diff = (out.double() - ref).norm().item()
    return diff / denom if denom > 0 else diff


def make_inputs(batch, k, f, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, k, generator=g).to(dtype)  # [B, K]
    w_gate = (torch.randn(f, k, generator=g) / k**0.5).to(dtype)  # [F, K]
    w_up = (torch.randn(f, k, generator=g) / k**0.5).to(dtype)  # [F, K]
    return x, w_gate, w_up, g


def thresholds_for(x, w_gate, activation, sparsity, g):
    """Per-neuron thresholds [F] giving about `sparsity` zeros in h, kept away from ties.

    A threshold within 1e-3 (relative) of some |a| could flip between kernel and reference
    (different fp32 summation order), so such thresholds are nudged up.
    """
    f = w_gate.shape[0]
    a = _activation_torch(x.float() @ w_gate.float().T, activation).abs()  # [B, F]
    if sparsity == 0.0:
        return torch.zeros(f)
    if sparsity == 1.0:
        return torch.full((f,), 2.0 * a.max().item() + 1.0)
    base = torch.quantile(a.flatten(), sparsity).item()
    thr = base * (0.7 + 0.6 * torch.rand(f, generator=g))  # per-neuron values: indexing matters
    for _ in range(20):
        close = ((a - thr).abs() <= 1e-3 * thr.clamp_min(1e-6)).any(dim=0)
        if not close.any():
            break
        thr = torch.where(close, thr * 1.01 + 1e-4, thr)
    return thr.float()


def run_poisoned(x, w_gate, w_up, thr, activation, row_mask, config=None):
    """Launch into a NaN-filled output so an unwritten element fails the comparison."""
    _check_inputs(x, w_gate, w_up, thr, activation, row_mask)
    h = torch.full((x.shape[0], w_gate.shape[0]), float("nan"), dtype=x.dtype)
    _launch_sparse_gate_up(x, w_gate, w_up, thr, activation, row_mask, h, config=config)
    return h


CASES = []  # (dtype, activation, batch, sparsity, use_row_mask)
for _act in ("silu", "gelu_tanh", "relu"):
    for _s in (0.0, 0.5, 0.9, 1.0):  # every sparsity x row_mask at batch 3
        for _mask in (False, True):
            CASES.append((torch.bfloat16, _act, 3, _s, _mask))
    for _b, _s in ((1, 0.5), (1, 0.9), (8, 0.5), (8, 0.9)):  # batch 1 and 8
        for _mask in (False, True):
            CASES.append((torch.bfloat16, _act, _b, _s, _mask))
    for _mask in (False, True):  # fp16 and fp32 on a slice of the grid
        CASES.append((torch.float16, _act, 3, 0.5, _mask))
    CASES.append((torch.float16, _act, 1, 0.9, True))
    CASES.append((torch.float32, _act, 8, 0.9, True))
K_TEST, F_TEST = 203, 37  # odd on purpose: neither is a multiple of any block size


def case_id(case):
    dtype, act, b, s, mask = case
    return f"B{b}-K{K_TEST}-F{F_TEST}-{act}-s{int(s * 100)}-{'mask' if mask else 'nomask'}-{DTYPE_NAME[dtype]}"


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_matches_reference(case):
    dtype, activation, batch, sparsity, use_mask = case
    k, f = K_TEST, F_TEST
    seed = zlib.crc32(case_id(case).encode())  # stable across runs: a failure reproduces
    x, w_gate, w_up, g = make_inputs(batch, k, f, dtype, seed)
    thr = thresholds_for(x, w_gate, activation, sparsity, g)
    row_mask = (torch.rand(f, generator=g) < 0.7) if use_mask else None
    h = run_poisoned(x, w_gate, w_up, thr, activation, row_mask)
    ref = sparse_gate_up_reference(x, w_gate, w_up, thr, activation, row_mask)
    assert not torch.isnan(h).any(), "unwritten output elements"
    # zeros exactly where the reference has them (the threshold test agrees element-wise)
    assert torch.equal(h == 0, ref == 0)
    if row_mask is not None:
        assert (h[:, ~row_mask] == 0).all()
    if sparsity == 1.0:
        assert (h == 0).all()
    else:
        assert rel_err(h, ref) < TOL[dtype]
    if sparsity in (0.5, 0.9) and activation != "relu":
        zeros = (ref == 0).float().mean().item()
        keep_frac = row_mask.float().mean().item() if row_mask is not None else 1.0
        expected = 1 - (1 - sparsity) * keep_frac
        assert abs(zeros - expected) < 0.2, f"threshold helper gave {zeros:.2f} zeros, wanted ~{expected:.2f}"


TILES = [(1, 1, 64, 1), (1, 8, 32, 2), (1, 4, 256, 4), (3, 16, 16, 1), (3, 32, 64, 4)]


@pytest.mark.parametrize("batch,block_f,block_k,num_warps", TILES,
                         ids=[f"B{b}-F{f}x{k}-w{w}" for b, f, k, w in TILES])
def test_other_tiles(batch, block_f, block_k, num_warps):
    """Every tile shape computes the same function (the benchmark sweeps these)."""
    from actsparse.kernels.sparse_mlp import GateUpConfig

    x, w_gate, w_up, g = make_inputs(batch, 130, 45, torch.float16, 11)
    thr = thresholds_for(x, w_gate, "silu", 0.5, g)
    row_mask = torch.rand(45, generator=g) < 0.5
    h = run_poisoned(x, w_gate, w_up, thr, "silu", row_mask, GateUpConfig(block_f, block_k, num_warps))
    ref = sparse_gate_up_reference(x, w_gate, w_up, thr, "silu", row_mask)
    assert rel_err(h, ref) < 1e-2 and torch.equal(h == 0, ref == 0)


@pytest.mark.parametrize("batch", [1, 5])
def test_up_with_gate_same_result(batch):
    """Reading up rows with the gate rows (predicted neurons) changes bytes read, not h."""
    x, w_gate, w_up, g = make_inputs(batch, 150, 41, torch.bfloat16, 17 + batch)
    thr = thresholds_for(x, w_gate, "relu", 0.7, g)
    row_mask = torch.rand(41, generator=g) < 0.6
    h = sparse_gate_up(x, w_gate, w_up, thr, "relu", row_mask)
    h_spec = sparse_gate_up(x, w_gate, w_up, thr, "relu", row_mask, up_with_gate=True)
    assert torch.equal(h, h_spec)
    assert torch.equal(sparse_gate_up(x, w_gate, w_up, thr, "relu", None, up_with_gate=True),
                       sparse_gate_up(x, w_gate, w_up, thr, "relu", None))


def test_batched_tile_too_small_for_dot():
    from actsparse.kernels.sparse_mlp import GateUpConfig

    x, w_gate, w_up, _ = make_inputs(2, 32, 20, torch.float16, 1)
    with pytest.raises(ValueError, match="tl.dot"):
        run_poisoned(x, w_gate, w_up, torch.zeros(20), "silu", None, GateUpConfig(8, 32, 4))


def test_even_k_path():
    """K a multiple of BLOCK_K takes the unmasked-K branch."""
    x, w_gate, w_up, g = make_inputs(3, 256, 40, torch.float16, 5)
    assert 256 % default_config(3, 256, 40).block_k == 0
    thr = thresholds_for(x, w_gate, "gelu_tanh", 0.5, g)
    h = run_poisoned(x, w_gate, w_up, thr, "gelu_tanh", None)
    ref = sparse_gate_up_reference(x, w_gate, w_up, thr, "gelu_tanh")
    assert rel_err(h, ref) < 1e-2


def test_fatrelu_semantics():
    """relu with threshold T: zero at and below T, identity above (exact values, exact arithmetic)."""
    gates = torch.tensor([-1.0, 0.0, 0.25, 0.5, 0.5078125, 2.0, -0.5, 0.75])  # bf16-exact
    f, k = gates.numel(), 5
    w_gate = torch.zeros(f, k)
    w_gate[:, 0] = gates
    w_up = torch.zeros(f, k)
    w_up[:, 0] = 1.0
    x = torch.zeros(1, k)
    x[0, 0] = 1.0  # gate = w_gate[:, 0] exactly, up = 1
    for dtype in (torch.bfloat16, torch.float32):
        h = sparse_gate_up(x.to(dtype), w_gate.to(dtype), w_up.to(dtype), 0.5, "relu")
        expected = torch.where(gates > 0.5, gates, torch.zeros(()))
        assert torch.equal(h.float()[0], expected), (h, expected)
        assert torch.equal(sparse_gate_up_reference(x, w_gate, w_up, 0.5, "relu")[0], expected)
        # threshold 0 is plain ReLU
        h0 = sparse_gate_up(x.to(dtype), w_gate.to(dtype), w_up.to(dtype), 0.0, "relu")
        assert torch.equal(h0.float()[0], torch.relu(gates))


def test_batch_rows_independent():
    """Each batch row gets what it gets alone: same kept set, same values up to summation order
    (batch 1 runs the FMA path, batch >= 2 the tl.dot path)."""
    x, w_gate, w_up, g = make_inputs(4, 99, 60, torch.float16, 3)
    thr = thresholds_for(x, w_gate, "silu", 0.8, g)
    h = sparse_gate_up(x, w_gate, w_up, thr, "silu")
    for b in range(4):
        hb = sparse_gate_up(x[b], w_gate, w_up, thr, "silu")  # 1-D x -> 1-D h
        assert hb.shape == (60,)
        assert torch.equal(h[b] == 0, hb == 0)
        assert rel_err(hb, h[b]) < 1e-2


def test_public_api_float_threshold_and_op():
    x, w_gate, w_up, g = make_inputs(3, 70, 33, torch.bfloat16, 7)
    row_mask = torch.rand(33, generator=g) < 0.5
    h = sparse_gate_up(x, w_gate, w_up, 0.05, "silu", row_mask)
    ref = sparse_gate_up_reference(x, w_gate, w_up, 0.05, "silu", row_mask)
    assert h.shape == (3, 33) and h.dtype == torch.bfloat16
    assert rel_err(h, ref) < 1e-2
    thr = torch.full((33,), 0.05)
    h_op = torch.ops.actsparse.sparse_gate_up(x, w_gate, w_up, thr, "silu", row_mask)
    assert torch.equal(h_op, h)


def test_all_rows_masked_out_writes_zeros():
    x, w_gate, w_up, _ = make_inputs(2, 50, 20, torch.float16, 9)
    h = run_poisoned(x, w_gate, w_up, torch.zeros(20), "silu", torch.zeros(20, dtype=torch.bool))
    assert torch.equal(h, torch.zeros_like(h))


def test_opcheck():
    x, w_gate, w_up, g = make_inputs(2, 40, 24, torch.float16, 13)
    thr = torch.full((24,), 0.1)
    row_mask = torch.rand(24, generator=g) < 0.5
    torch.library.opcheck(
        torch.ops.actsparse.sparse_gate_up.default, (x, w_gate, w_up, thr, "relu", row_mask),
        # test_faketensor / test_aot_dispatch_* need the compiled-Triton path (the interpreter runs
        # the kernel on fake tensors): the GPU benchmark runs the full opcheck.
        test_utils=("test_schema", "test_autograd_registration"),
    )


def test_module_torch_backend_dense_at_threshold_zero():
    """Threshold 0, SiLU: no neuron is dropped, so the module equals the dense gated MLP exactly."""
    g = torch.Generator().manual_seed(21)
    d, f = 48, 80
    w_gate, w_up, w_down = (torch.randn(f, d, generator=g) / 7, torch.randn(f, d, generator=g) / 7,
                            torch.randn(d, f, generator=g) / 9)
    mlp = SparseGatedMLP(w_gate, w_up, w_down, 0.0, "silu", backend="torch")
    x = torch.randn(2, 5, d, generator=g)
    dense = (torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
    assert torch.allclose(mlp(x), dense, rtol=1e-5, atol=1e-6)
    assert "gate_threshold" in mlp.state_dict()


def test_module_triton_backend_matches_torch_backend():
    g = torch.Generator().manual_seed(22)
    d, f = 40, 72
    w = [(torch.randn(f, d, generator=g) / 6).half(), (torch.randn(f, d, generator=g) / 6).half(),
         (torch.randn(d, f, generator=g) / 8).half()]
    x = torch.randn(3, d, generator=g).half()
    out = {}
    for backend in ("torch", "triton"):
        out[backend] = SparseGatedMLP(*w, gate_threshold=0.05, activation="silu", backend=backend)(x)
    assert rel_err(out["triton"], out["torch"]) < 1e-2


def _bad_inputs():
    x, w_gate, w_up, _ = make_inputs(2, 16, 12, torch.float16, 1)
    thr = torch.zeros(12)
    good = dict(x=x, w_gate=w_gate, w_up=w_up, gate_threshold=thr, activation="silu", row_mask=None)
    bad = {
        "batch9": dict(x=torch.randn(9, 16).half()),
        "x3d": dict(x=x[None]),
        "x_int": dict(x=x.to(torch.int32)),
        "x_strided": dict(x=torch.randn(2, 32).half()[:, ::2]),
        "gate_wrong_k": dict(w_gate=torch.randn(12, 15).half()),
        "up_wrong_f": dict(w_up=torch.randn(11, 16).half()),
        "gate_dtype": dict(w_gate=w_gate.float()),
        "up_noncontig": dict(w_up=torch.randn(16, 12).half().T),
        "activation": dict(activation="gelu"),
        "thr_shape": dict(gate_threshold=torch.zeros(11)),
        "thr_dtype": dict(gate_threshold=torch.zeros(12, dtype=torch.float16)),
        "thr_nan": dict(gate_threshold=float("nan")),
        "mask_dtype": dict(row_mask=torch.ones(12, dtype=torch.uint8)),
        "mask_shape": dict(row_mask=torch.ones(13, dtype=torch.bool)),
    }
    return good, bad


@pytest.mark.parametrize("name", list(_bad_inputs()[1]))
def test_launcher_rejects(name):
    good, bad = _bad_inputs()
    args = {**good, **bad[name]}
    with pytest.raises((ValueError, TypeError)):
        sparse_gate_up(**args)


def test_launcher_accepts_good_inputs():
    good, _ = _bad_inputs()
    assert sparse_gate_up(**good).shape == (2, 12)


# ----------------------------------------------------------------------------------------------
# Kept list: step 2 lists its kept neurons, step 3 (sparse_down_kept_) reads only those rows
# ----------------------------------------------------------------------------------------------
from actsparse.kernels.sparse_mlp import (  # noqa: E402
    KeptDownConfig,
    _check_kept,
    _launch_sparse_down_kept,
    kept_list,
    sparse_down_kept_,
    sparse_down_kept_reference,
)

KEPT_CASES = [  # (dtype, batch, sparsity, use_mask, config)
    (torch.bfloat16, 1, 0.9, True, None),
    (torch.bfloat16, 1, 0.5, False, KeptDownConfig(block_k=16, block_n=32)),
    (torch.float16, 3, 0.7, True, None),
    (torch.float16, 8, 0.9, False, KeptDownConfig(block_k=32, block_n=16, programs_per_sm=16)),
    (torch.bfloat16, 1, 0.7, False, KeptDownConfig(block_k=16, block_n=32, programs_per_sm=8, min_rows=10)),
    (torch.float16, 3, 0.3, True, KeptDownConfig(block_k=16, block_n=16, min_rows=1000)),  # one program along k
    (torch.float32, 5, 0.0, False, KeptDownConfig(block_k=16, block_n=64, programs_per_sm=2)),
    (torch.bfloat16, 2, 1.0, False, None),  # nothing kept: out unchanged
]
N_DOWN = 45  # odd output width


@pytest.mark.parametrize("case", KEPT_CASES, ids=lambda c: f"{DTYPE_NAME[c[0]]}-B{c[1]}-s{int(c[2] * 100)}"
                         f"-{'mask' if c[3] else 'nomask'}-{c[4] or 'default'}")
def test_kept_list_steps_2_and_3(case):
    dtype, batch, sparsity, use_mask, config = case
    seed = zlib.crc32(repr(case).encode())
    x, w_gate, w_up, g = make_inputs(batch, K_TEST, F_TEST * 3, dtype, seed)  # F = 111
    f = w_gate.shape[0]
    w_down_t = (torch.randn(f, N_DOWN, generator=g) / f**0.5).to(dtype)
    thr = thresholds_for(x, w_gate, "relu", sparsity, g)
    row_mask = (torch.rand(f, generator=g) < 0.7) if use_mask else None
    kept = kept_list(batch, f, dtype, "cpu")
    kept.idx.fill_(-7)  # junk: only the listed slots may be read
    kept.h.fill_(float("nan"))
    for round_ in range(2):  # the second round reuses the buffers: step 3 left the count at zero
        h = sparse_gate_up(x, w_gate, w_up, thr, "relu", row_mask, kept=kept)
        # step 2 output is unchanged by the list, and the list holds exactly h's nonzero columns
        assert torch.equal(h, sparse_gate_up(x, w_gate, w_up, thr, "relu", row_mask))
        n = int(kept.count[0])
        cols = torch.nonzero((h != 0).any(0)).flatten()
        assert int(kept.count[1]) == 0 and n == cols.numel()
        assert sorted(kept.idx[:n].tolist()) == cols.tolist()
        assert torch.equal(kept.h[:, :n], h[:, kept.idx[:n].long()])
        out0 = torch.randn(batch, N_DOWN, generator=g)
        exact = out0.double() + h.double() @ w_down_t.double()
        out = out0.clone()
        if config is None:
            sparse_down_kept_(out, kept, w_down_t)
        else:
            _check_kept(out, kept, w_down_t)
            _launch_sparse_down_kept(out, kept, w_down_t, config)
        assert kept.count.tolist() == [0, 0], f"round {round_}: the list was not consumed"
        if n == 0:
            assert torch.equal(out, out0)
        else:
            assert rel_err(out - out0, exact - out0.double()) < 1e-5
        thr = thr * (0.8 if sparsity < 1.0 else 1.0)  # round 2: a different kept set


def test_kept_list_reference_and_unconsumed_list():
    x, w_gate, w_up, g = make_inputs(1, 64, 40, torch.float32, 31)
    w_down_t = torch.randn(40, 24, generator=g)
    kept = kept_list(1, 40, torch.float32, "cpu")
    h = sparse_gate_up(x, w_gate, w_up, 0.0, "relu", kept=kept)
    out = torch.zeros(1, 24)
    sparse_down_kept_reference(out, kept, w_down_t)
    assert rel_err(out, h.double() @ w_down_t.double()) < 1e-6 and kept.count.tolist() == [0, 0]
    # a list that no step 3 consumes fills up, but never writes past F
    for _ in range(5):
        sparse_gate_up(x, w_gate, w_up, 0.0, "relu", kept=kept)
    listed = int((h != 0).sum())
    assert int(kept.count[0]) == 5 * listed and kept.idx.numel() == 40
    assert set(kept.idx.tolist()) <= set(range(40))


def test_kept_list_without_reset_is_read_again():
    """RESET=False (the benchmark's step-3-alone timing): same result, and the list survives."""
    x, w_gate, w_up, g = make_inputs(2, 64, 90, torch.bfloat16, 41)
    w_down_t = (torch.randn(90, 30, generator=g) / 9).to(torch.bfloat16)
    kept = kept_list(2, 90, torch.bfloat16, "cpu")
    h = sparse_gate_up(x, w_gate, w_up, 0.05, "relu", kept=kept)
    listed = kept.count.tolist()
    exact = h.double() @ w_down_t.double()
    for _ in range(2):
        out = torch.zeros(2, 30)
        _launch_sparse_down_kept(out, kept, w_down_t, KeptDownConfig(block_k=16, block_n=16), reset=False)
        assert kept.count.tolist() == listed and listed[0] > 0 and listed[1] == 0
        assert rel_err(out, exact) < 1e-5


def test_kept_list_rejects_bad_buffers():
    w_down_t = torch.randn(40, 24, dtype=torch.bfloat16)
    good = kept_list(2, 40, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="fp32"):
        sparse_down_kept_(torch.zeros(2, 24, dtype=torch.bfloat16), good, w_down_t)
    with pytest.raises(ValueError, match="does not fit"):
        sparse_down_kept_(torch.zeros(2, 24), kept_list(2, 39, torch.bfloat16, "cpu"), w_down_t)
    with pytest.raises(TypeError):
        sparse_down_kept_(torch.zeros(2, 24), kept_list(2, 40, torch.float16, "cpu"), w_down_t)
    x, w_gate, w_up, _ = make_inputs(3, 64, 40, torch.bfloat16, 3)
    with pytest.raises(ValueError, match="kept list"):
        sparse_gate_up(x, w_gate, w_up, 0.0, "relu", kept=good)  # batch 3, list for 2
    with pytest.raises(ValueError):
        KeptDownConfig(block_k=48)


def test_kept_ops_opcheck():
    x, w_gate, w_up, g = make_inputs(2, 40, 24, torch.float16, 17)
    kept = kept_list(2, 24, torch.float16, "cpu")
    torch.library.opcheck(
        torch.ops.actsparse.sparse_gate_up_kept.default,
        (x, w_gate, w_up, torch.full((24,), 0.1), "relu", kept.idx, kept.h, kept.count),
        test_utils=("test_schema", "test_autograd_registration"),  # see test_opcheck
    )
    kept.count.zero_()
    sparse_gate_up(x, w_gate, w_up, 0.1, "relu", kept=kept)
    torch.library.opcheck(
        torch.ops.actsparse.sparse_down_kept_.default,
        (torch.zeros(2, 30), kept.idx, kept.h, kept.count, torch.randn(24, 30, generator=g).half()),
        test_utils=("test_schema", "test_autograd_registration"),
    )
