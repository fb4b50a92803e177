"""decode_attention (RoPE + KV-cache write + one-token attention, one Triton launch) against the
pure-PyTorch reference and against the engine's plain path, on odd shapes, under the interpreter."""

import math

import pytest
import torch

from actsparse.kernels.decode_attention import block_s_for, decode_attention, decode_attention_reference

pytestmark = pytest.mark.interpreter  # Triton kernels on CPU tensors (skipped when TRITON_INTERPRET=0)

BLOCK_S = block_s_for(3 * 64)  # the positions per program of the small caches below
assert BLOCK_S == 64

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def make_case(B, H, Hkv, D, S, pos, dtype, seed, window=None, cache_batch=None):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, (H + 2 * Hkv) * D, generator=gen).to(dtype)
    cache_shape = (cache_batch or B, Hkv, S, D)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    ang = torch.rand(D // 2, generator=gen) * 6.0
    emb = torch.cat([ang, ang])
    cos, sin = emb.cos()[None], emb.sin()[None]  # [1, D]
    p = torch.arange(S)
    mask = (p <= pos)
    if window is not None:
        mask &= p > pos - window
    return qkv, cos, sin, mask[None], torch.tensor([pos]), k_cache, v_cache


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


CASES = [  # B, H, Hkv, D, S, pos, dtype, window
    (1, 32, 8, 128, 384, 200, torch.bfloat16, None),  # Llama-3-8B heads, pos mid-block
    (1, 4, 4, 64, 130, 129, torch.float32, None),  # no GQA, last position, S not a block multiple
    (2, 6, 2, 48, 100, 0, torch.float32, None),  # first position, head_dim not a power of two
    (3, 9, 3, 32, 200, 150, torch.float16, 40),  # sliding window: whole early blocks masked out
    (1, 8, 1, 64, 64, 63, torch.float32, None),  # one kv head (MQA), one block
    (2, 4, 2, 16, 257, 190, torch.float32, None),  # caches with a larger batch than qkv
    (1, 6, 2, 32, 700, 650, torch.float32, None),  # 11 blocks: the merge takes two steps of 8
]


@pytest.mark.parametrize("B,H,Hkv,D,S,pos,dtype,window", CASES,
                         ids=[f"B{c[0]}-H{c[1]}-kv{c[2]}-D{c[3]}-S{c[4]}-p{c[5]}-{str(c[6])[6:]}"
                              + (f"-w{c[7]}" if c[7] else "") for c in CASES])
def test_matches_reference(B, H, Hkv, D, S, pos, dtype, window):
    cache_batch = B + 1 if D == 16 else None
    case = make_case(B, H, Hkv, D, S, pos, dtype, seed=hash((B, H, D, S, pos)) % 2**31, window=window,
                     cache_batch=cache_batch)
    qkv, cos, sin, mask, input_pos, k_cache, v_cache = case
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    y_ref = decode_attention_reference(qkv, cos, sin, mask, input_pos, k_ref, v_ref, H, Hkv, D)
    k_out, v_out = k_cache.clone(), v_cache.clone()
    counts = torch.zeros(B * Hkv + 3, dtype=torch.int32)
    y = decode_attention(qkv, cos, sin, mask, input_pos, k_out, v_out, H, Hkv, D, counts=counts)
    assert y.shape == (B, H * D) and y.dtype == dtype
    assert rel_err(y, y_ref) < TOL[dtype], rel_err(y, y_ref)
    assert not counts.any()  # the arrival counters are left zero for the next call
    # the cache rows at pos hold the RoPE'd key and the value; every other row is untouched
    assert torch.allclose(k_out.float(), k_ref.float(), atol=TOL[dtype], rtol=0)
    assert torch.equal(v_out, v_ref)
    others = torch.ones(S, dtype=torch.bool)
    others[pos] = False
    assert torch.equal(k_out[:, :, others], k_cache[:, :, others])
    assert not torch.equal(k_out[:B, :, pos], k_cache[:B, :, pos])


@pytest.mark.parametrize("block_s,warps", [(16, 2), (32, 8), (128, 4)])
def test_launch_shapes_match_reference(monkeypatch, block_s, warps):
    """Other positions per program and warps (the module knobs bench_decode_attention.py --sweep
    varies): the same result, a sliding window and a multi-step merge included."""
    import actsparse.kernels.decode_attention as da

    monkeypatch.setattr(da, "BLOCK_S", block_s)
    monkeypatch.setattr(da, "NUM_WARPS", warps)
    B, H, Hkv, D, S, pos = 1, 6, 2, 32, 300, 290
    qkv, cos, sin, mask, input_pos, k_cache, v_cache = make_case(B, H, Hkv, D, S, pos, torch.float32, seed=block_s,
                                                                 window=200)
    y_ref = decode_attention_reference(qkv, cos, sin, mask, input_pos, k_cache.clone(), v_cache.clone(), H, Hkv, D)
    counts = torch.zeros(B * Hkv, dtype=torch.int32)
    y = decode_attention(qkv, cos, sin, mask, input_pos, k_cache, v_cache, H, Hkv, D, counts=counts)
    assert rel_err(y, y_ref) < TOL[torch.float32], rel_err(y, y_ref)
    assert not counts.any()


def test_block_rule():
    """64 positions per program up to 1024 cached positions, 128 beyond (fewer merge steps)."""
    assert [block_s_for(n) for n in (1, 384, 1024, 1025, 4096)] == [64, 64, 64, 128, 128]


def test_reference_is_plain_attention():
    """The reference itself, against a direct formula: softmax(q k^T / sqrt(D)) v per head, GQA."""
    B, H, Hkv, D, S, pos = 1, 4, 2, 8, 10, 6
    qkv, cos, sin, mask, input_pos, k_cache, v_cache = make_case(B, H, Hkv, D, S, pos, torch.float64, seed=1)
    k0 = k_cache.clone()
    y = decode_attention_reference(qkv, cos, sin, mask, input_pos, k_cache, v_cache, H, Hkv, D)
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)

    def rope(x):
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return x * cos[0] + torch.cat([-x2, x1], -1) * sin[0]
    for hd in range(H):
        g = hd // (H // Hkv)
        keys = k0[0, g].clone()
        keys[pos] = rope(k[0, g * D:(g + 1) * D])
        vals = v_cache[0, g]
        s = (keys[: pos + 1] @ rope(q[0, hd * D:(hd + 1) * D])) / math.sqrt(D)
        expect = torch.softmax(s, 0) @ vals[: pos + 1]
        assert torch.allclose(y[0, hd * D:(hd + 1) * D], expect, atol=1e-10)


def test_blocks_beyond_position_are_never_read():
    """Positions after pos may hold anything (NaN here): the result does not change."""
    qkv, cos, sin, mask, input_pos, k_cache, v_cache = make_case(1, 4, 2, 32, 3 * BLOCK_S, BLOCK_S + 5,
                                                                 torch.float32, seed=3)
    y_ref = decode_attention(qkv, cos, sin, mask, input_pos, k_cache.clone(), v_cache.clone(), 4, 2, 32)
    k_cache[:, :, BLOCK_S + 6:] = float("nan")
    v_cache[:, :, BLOCK_S + 6:] = float("nan")
    y = decode_attention(qkv, cos, sin, mask, input_pos, k_cache, v_cache, 4, 2, 32)
    assert torch.equal(y, y_ref)


def test_rows_the_mask_drops_do_not_matter():
    """Rows before a sliding window are read with the block (one round trip) but must not count:
    NaN there leaves the result unchanged, also in the block that holds the window's start."""
    pos, window = 2 * BLOCK_S + 9, BLOCK_S + 20  # the window starts inside the second block
    qkv, cos, sin, mask, input_pos, k_cache, v_cache = make_case(1, 4, 2, 32, 3 * BLOCK_S, pos, torch.float32,
                                                                 seed=4, window=window)
    y_ref = decode_attention(qkv, cos, sin, mask, input_pos, k_cache.clone(), v_cache.clone(), 4, 2, 32)
    k_cache[:, :, : pos - window + 1] = float("nan")
    v_cache[:, :, : pos - window + 1] = float("nan")
    y = decode_attention(qkv, cos, sin, mask, input_pos, k_cache, v_cache, 4, 2, 32)
    assert torch.equal(y, y_ref)


def test_bad_inputs():
    qkv, cos, sin, mask, input_pos, k_cache, v_cache = make_case(1, 4, 2, 16, 32, 3, torch.float32, seed=2)
    with pytest.raises(ValueError, match="qkv"):
        decode_attention(qkv[:, :-1], cos, sin, mask, input_pos, k_cache, v_cache, 4, 2, 16)
    with pytest.raises(ValueError, match="caches"):
        decode_attention(qkv, cos, sin, mask, input_pos, k_cache[:, :1], v_cache[:, :1], 4, 2, 16)
    with pytest.raises(ValueError, match="one position"):
        decode_attention(qkv, cos, sin, mask, torch.tensor([3, 4]), k_cache, v_cache, 4, 2, 16)
    with pytest.raises(ValueError, match="counts"):
        decode_attention(qkv, cos, sin, mask, input_pos, k_cache, v_cache, 4, 2, 16, counts=torch.zeros(2))
    with pytest.raises(TypeError, match="dtype"):
        decode_attention(qkv, cos, sin, mask, input_pos, k_cache.double(), v_cache.double(), 4, 2, 16)
