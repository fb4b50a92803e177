"""One-token (decode) attention with RoPE and the KV-cache write fused in: one launch per layer.

At batch 1 the attention of a decode step moves little data (the cached keys and values of one
layer, ~1.5 MB for Llama-3-8B at 384 positions), but the plain path spends six kernels on it:
RoPE of q, RoPE of k with its cache write, the v cache write, q.K^T, softmax and P.V. Each costs a
launch and a round trip, which at decode sizes is most of its time. Here:

- ``_decode_attn_kernel``, grid (batch x kv heads, position blocks): the program of a block reads
  q (its G query heads) and the new k and v straight from the qkv projection's output, applies
  RoPE in fp32 (cast back to the model dtype, as the plain path does), scores its block of cached
  keys with ``tl.dot`` (the block holding the current position takes the new key and value from
  registers and writes them to the cache), and stores its softmax partials (max, sum, P.V).
- The last block of a (sequence, kv head) to finish (an arrival counter) merges the partials of
  the blocks up to the current position (flash-decoding's second pass, ``_combine``) and writes
  y [B, H * D] in the model dtype. One launch per layer.

``decode_attention()`` registers it as the custom op ``actsparse::decode_attention`` (it mutates
the caches and the counters), so torch.compile and CUDA graphs see through it; ``decode_attention_reference``
is the pure-PyTorch semantics (the engine's plain path). Layers: this file, the engine's
``Attention`` (``Transformer.set_decode_attention_("fused")``), ``tests/test_decode_attention.py``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .sparse_gemv import _PDL_DEFAULT, _interpreting, _launcher, _pdl_prologue, _pdl_supported

BLOCK_S = None  # cached positions per program; None: block_s_for(cache length)
NUM_WARPS = 4  # per program (both read at each launch: bench_decode_attention.py --sweep varies them)


def block_s_for(cache_len: int) -> int:
    """Cached positions per program: 64 up to 1024 positions, 128 beyond, where the merge of the
    blocks' partials would otherwise take more steps (H100 sweep, docs/RESULTS.md)."""
    return 64 if cache_len <= 1024 else 128


@triton.jit
def _rope(x_ptr, xp_ptr, sign, cos, sin, mask):
    """x * cos + rotate_half(x) * sin in fp32 (x: the head; xp: its partner half, sign -1 / +1)."""
    x = tl.load(x_ptr, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(xp_ptr, mask=mask, other=0.0).to(tl.float32)
    return x * cos + sign * xp * sin


@triton.jit
def _decode_attn_kernel(
    qkv_ptr,  # [B, (H + 2 Hkv) * D]: q heads, k heads, v heads of the current token
    cos_ptr, sin_ptr,  # [D] fp32 at the current position
    mask_ptr,  # [S] bool: positions the token attends to (causal, sliding window)
    pos_ptr,  # [1] int64: the current position (its cache row is written here)
    k_ptr, v_ptr,  # caches [Bc, Hkv, S, D] (Bc >= B), contiguous
    m_ptr, l_ptr,  # [B, Hkv, NSPLIT, G_PAD] fp32: block max and sum of exp
    acc_ptr,  # [B, Hkv, NSPLIT, G_PAD, D_PAD] fp32: block P.V
    count_ptr,  # [>= B * Hkv] int32 arrival counters: zero on entry, left zero on exit
    y_ptr,  # [B, H * D] in the model dtype
    Hkv, S, stride_qkv, stride_kb, stride_kh, stride_yb, scale,
    NSPLIT: tl.constexpr,  # position blocks (cdiv(S, BLOCK_S))
    G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr, BLOCK_S: tl.constexpr,
    IEEE: tl.constexpr,
    GC: tl.constexpr,  # G rounded up to a power of two (the merge's rows)
    CH: tl.constexpr,  # blocks merged per step
    STATIC_LOOP: tl.constexpr,  # the merge runs over all NSPLIT blocks, not the used ones (CPU interpreter)
    USE_PDL: tl.constexpr,  # programmatic dependent launch (sparse_gemv.set_pdl_default); always passed:
    # Inductor's wrapper of user kernels does not fill in constexpr defaults
):
    _pdl_prologue(USE_PDL)  # with PDL: wait for the qkv GEMV, then let the o GEMV's launch start
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // Hkv
    h = pid_bh % Hkv
    pos = tl.load(pos_ptr).to(tl.int32)
    start = split * BLOCK_S
    if start <= pos:
        offs_g = tl.arange(0, G_PAD)
        offs_d = tl.arange(0, D_PAD)
        HALF: tl.constexpr = D // 2
        d_mask = offs_d < D
        partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
        sign = tl.where(offs_d < HALF, -1.0, 1.0)
        cos = tl.load(cos_ptr + offs_d, mask=d_mask, other=0.0)
        sin = tl.load(sin_ptr + offs_d, mask=d_mask, other=0.0)
        row = qkv_ptr + b * stride_qkv
        # q: [G_PAD, D_PAD], RoPE'd, rounded to the model dtype like the plain path
        q_off = (h * G + offs_g)[:, None] * D
        gd_mask = (offs_g < G)[:, None] & d_mask[None, :]
        q = _rope(row + q_off + offs_d[None, :], row + q_off + partner[None, :], sign[None, :], cos[None, :],
                  sin[None, :], gd_mask).to(qkv_ptr.dtype.element_ty)
        k_off = (Hkv * G + h) * D
        v_off = (Hkv * G + Hkv + h) * D
        k_new = _rope(row + k_off + offs_d, row + k_off + partner, sign, cos, sin, d_mask).to(qkv_ptr.dtype.element_ty)
        v_new = tl.load(row + v_off + offs_d, mask=d_mask, other=0.0)

        offs_s = start + tl.arange(0, BLOCK_S)
        s_mask = offs_s < S
        is_new = offs_s == pos
        # The cache rows are read under the causal bound alone, not the mask, so that their loads
        # go out together with the mask's, q's and the new row's (one round trip, not two); rows past
        # the position are never read. Rows the mask drops (a sliding window) are read, scored
        # -inf and zeroed.
        attend = (tl.load(mask_ptr + offs_s, mask=s_mask, other=0) != 0) & s_mask & (offs_s <= pos)
        cache = b * stride_kb + h * stride_kh + offs_s[:, None] * D + offs_d[None, :]
        sd_mask = (s_mask & (offs_s < pos))[:, None] & d_mask[None, :]
        k = tl.load(k_ptr + cache, mask=sd_mask, other=0.0)
        v = tl.load(v_ptr + cache, mask=sd_mask, other=0.0)
        k = tl.where(is_new[:, None], k_new[None, :], k)  # [BLOCK_S, D_PAD]
        v = tl.where(is_new[:, None], v_new[None, :], tl.where(attend[:, None], v, 0.0))
        if pos < start + BLOCK_S:  # this block holds the current position: write its cache row
            tl.store(k_ptr + b * stride_kb + h * stride_kh + pos * D + offs_d, k_new, mask=d_mask)
            tl.store(v_ptr + b * stride_kb + h * stride_kh + pos * D + offs_d, v_new, mask=d_mask)

        if IEEE:  # fp32 models (exact fp32 products, not TF32), and the CPU interpreter
            scores = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
        else:
            scores = tl.dot(q, tl.trans(k)) * scale
        scores = tl.where(attend[None, :], scores, float("-inf"))
        m = tl.max(scores, axis=1)  # [G_PAD]
        m_safe = tl.where(m == float("-inf"), 0.0, m)  # a block the window masks out entirely
        p = tl.exp(scores - m_safe[:, None])
        l_sum = tl.sum(p, axis=1)
        if IEEE:
            acc = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")  # [G_PAD, D_PAD]
        else:
            acc = tl.dot(p.to(v.dtype), v)
        ws = (pid_bh * NSPLIT + split) * G_PAD + offs_g
        tl.store(m_ptr + ws, m)
        tl.store(l_ptr + ws, l_sum)
        tl.store(acc_ptr + ws[:, None] * D_PAD + offs_d[None, :], acc)
        # The last block of this (sequence, kv head) to finish merges all of them (flash-decoding's
        # second pass without a second launch); it re-zeroes the counter for the next call.
        tl.debug_barrier()  # every thread's stores happen before the (release) arrival below
        used = pos // BLOCK_S + 1  # blocks that hold positions <= pos
        arrived = tl.atomic_add(count_ptr + pid_bh, 1, sem="acq_rel")
        if arrived == used - 1:
            _combine(m_ptr, l_ptr, acc_ptr, y_ptr, pid_bh, b, h, used, stride_yb, NSPLIT, G, D, G_PAD, D_PAD, GC, CH,
                     STATIC_LOOP)
            tl.atomic_xchg(count_ptr + pid_bh, 0)


@triton.jit
def _merge_step(c, m_all, l_all, y, m_ptr, l_ptr, acc_ptr, pid_bh, used, offs_c, offs_g, offs_d,
                NSPLIT: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr):
    """Blocks [c, c + CH) of the merge: their partials (max, sum, P.V) loaded at once, folded into
    the running (m_all, l_all, y) with online rescaling."""
    blk = c + offs_c
    valid = (blk < used)[:, None] & (offs_g < G)[None, :]  # [CH, GC]
    ws = (pid_bh * NSPLIT + blk)[:, None] * G_PAD + offs_g[None, :]
    m_c = tl.load(m_ptr + ws, mask=valid, other=float("-inf"), cache_modifier=".cg")
    l_c = tl.load(l_ptr + ws, mask=valid, other=0.0, cache_modifier=".cg")
    a = tl.load(acc_ptr + ws[:, :, None] * D_PAD + offs_d[None, None, :], mask=valid[:, :, None], other=0.0,
                cache_modifier=".cg")  # [CH, GC, D_PAD]
    m_new = tl.maximum(m_all, tl.max(m_c, axis=0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet (or padding)
    alpha = tl.exp(m_all - m_ref)  # exp(-inf) = 0 on the first step
    w = tl.exp(m_c - m_ref[None, :])
    l_all = l_all * alpha + tl.sum(w * l_c, axis=0)
    y = y * alpha[:, None] + tl.sum(w[:, :, None] * a, axis=0)
    return m_new, l_all, y


@triton.jit
def _combine(m_ptr, l_ptr, acc_ptr, y_ptr, pid_bh, b, h, used, stride_yb,
             NSPLIT: tl.constexpr, G: tl.constexpr, D: tl.constexpr, G_PAD: tl.constexpr, D_PAD: tl.constexpr,
             GC: tl.constexpr, CH: tl.constexpr, STATIC_LOOP: tl.constexpr):
    """Merge the softmax partials of blocks [0, used) of one (sequence, kv head) into y, CH blocks
    per step (their loads in flight together), in one pass with online rescaling: caches of up to
    CH used blocks cost one round trip. The steps stop at `used`, not at the cache's end (the CPU
    interpreter takes no tensor loop bound: with STATIC_LOOP it steps over all NSPLIT blocks, the
    unused ones masked). The partials come from other programs of this launch: read through L2
    (".cg"), never L1. GC: G rounded up to a power of two."""
    offs_c = tl.arange(0, CH)
    offs_g = tl.arange(0, GC)
    offs_d = tl.arange(0, D_PAD)
    m_all = tl.full([GC], float("-inf"), tl.float32)
    l_all = tl.zeros([GC], dtype=tl.float32)
    y = tl.zeros([GC, D_PAD], dtype=tl.float32)
    if STATIC_LOOP:
        for c in range(0, NSPLIT, CH):
            m_all, l_all, y = _merge_step(c, m_all, l_all, y, m_ptr, l_ptr, acc_ptr, pid_bh, used, offs_c, offs_g,
                                          offs_d, NSPLIT, G, G_PAD, D_PAD)
    else:
        for c in range(0, used, CH):
            m_all, l_all, y = _merge_step(c, m_all, l_all, y, m_ptr, l_ptr, acc_ptr, pid_bh, used, offs_c, offs_g,
                                          offs_d, NSPLIT, G, G_PAD, D_PAD)
    y = y / tl.where(l_all > 0, l_all, 1.0)[:, None]  # l_all = 0 only on padding rows (g >= G)
    out = y_ptr + b * stride_yb + (h * G + offs_g)[:, None] * D + offs_d[None, :]
    tl.store(out, y.to(y_ptr.dtype.element_ty), mask=(offs_g < G)[:, None] & (offs_d < D)[None, :])


def _check(qkv, cos, sin, mask, input_pos, k_cache, v_cache, n_head, n_kv_head, head_dim):
    B = qkv.shape[0]
    if qkv.dim() != 2 or qkv.shape[1] != (n_head + 2 * n_kv_head) * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"decode_attention: qkv must be [B, (H + 2 Hkv) * D] with unit column stride, "
                         f"got {tuple(qkv.shape)}")
    if n_head % n_kv_head or head_dim % 2:
        raise ValueError("decode_attention: n_head must be a multiple of n_kv_head, head_dim even")
    shape = k_cache.shape
    if (k_cache.dim() != 4 or shape[0] < B or shape[1] != n_kv_head or shape[3] != head_dim
            or v_cache.shape != shape or not (k_cache.is_contiguous() and v_cache.is_contiguous())):
        raise ValueError(f"decode_attention: caches must be contiguous [>= {B}, {n_kv_head}, S, {head_dim}], "
                         f"got {tuple(shape)} and {tuple(v_cache.shape)}")
    if cos.shape[-1] != head_dim or sin.shape[-1] != head_dim or mask.shape[-1] != shape[2]:
        raise ValueError("decode_attention: cos/sin must end in head_dim, mask in the cache length")
    if input_pos.numel() != 1:
        raise ValueError("decode_attention: one position (input_pos [1]) per call")
    if qkv.dtype != k_cache.dtype or v_cache.dtype != k_cache.dtype:
        raise TypeError("decode_attention: qkv and the caches must share a dtype")


def _decode_attention_impl(qkv, cos, sin, mask, input_pos, k_cache, v_cache, counts, n_head: int, n_kv_head: int,
                           head_dim: int) -> torch.Tensor:
    _check(qkv, cos, sin, mask, input_pos, k_cache, v_cache, n_head, n_kv_head, head_dim)
    if counts.dtype != torch.int32 or counts.numel() < qkv.shape[0] * n_kv_head or not counts.is_contiguous():
        raise ValueError(f"decode_attention: counts must be a contiguous int32 tensor of >= B * n_kv_head zeros")
    B, S = qkv.shape[0], k_cache.shape[2]
    G = n_head // n_kv_head
    g_pad, d_pad = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(head_dim))
    block_s = BLOCK_S if BLOCK_S is not None else block_s_for(k_cache.shape[2])
    nsplit = triton.cdiv(S, block_s)
    dev = qkv.device
    m = torch.empty(B * n_kv_head * nsplit * g_pad, dtype=torch.float32, device=dev)
    l_sum = torch.empty_like(m)
    acc = torch.empty(B * n_kv_head * nsplit * g_pad * d_pad, dtype=torch.float32, device=dev)
    y = torch.empty(B, n_head * head_dim, dtype=qkv.dtype, device=dev)
    cos = cos.reshape(-1, head_dim)[-1].float().contiguous()
    sin = sin.reshape(-1, head_dim)[-1].float().contiguous()
    mask = mask.reshape(-1, S)[-1].contiguous()
    consts = dict(G=G, D=head_dim, G_PAD=g_pad, D_PAD=d_pad, BLOCK_S=block_s, USE_PDL=False)
    # PDL as the sparse GEMVs have it (set_pdl_default); not while Inductor traces the op (see
    # _pdl_supported: the inline PTX would defeat its mutation analysis)
    if _PDL_DEFAULT[0] and _pdl_supported(dev, probe=qkv):
        consts.update(USE_PDL=True, launch_pdl=True)
    _launcher(_decode_attn_kernel)[(B * n_kv_head, nsplit)](
        qkv, cos, sin, mask, input_pos, k_cache, v_cache, m, l_sum, acc, counts, y,
        n_kv_head, S, qkv.stride(0), k_cache.stride(0), k_cache.stride(1), y.stride(0), 1.0 / math.sqrt(head_dim),
        NSPLIT=nsplit, IEEE=qkv.dtype == torch.float32 or _interpreting(), GC=triton.next_power_of_2(G),
        CH=min(8, triton.next_power_of_2(nsplit)), STATIC_LOOP=_interpreting(), **consts, num_warps=NUM_WARPS)
    return y


@triton_op("actsparse::decode_attention", mutates_args=("k_cache", "v_cache", "counts"))
def _decode_attention_op(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                         input_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, counts: torch.Tensor,
                         n_head: int, n_kv_head: int, head_dim: int) -> torch.Tensor:
    return _decode_attention_impl(qkv, cos, sin, mask, input_pos, k_cache, v_cache, counts, n_head, n_kv_head,
                                  head_dim)


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                     input_pos: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_head: int,
                     n_kv_head: int, head_dim: int, counts: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of one new token per sequence: -> y [B, n_head * head_dim] in qkv's dtype.

    qkv: [B, (n_head + 2 n_kv_head) * head_dim] (q heads, then k heads, then v heads, before RoPE);
    cos, sin: [..., head_dim] at the token's position; mask: [..., S] bool (True = attend; positions
    past input_pos are never attended, whatever the mask says);
    input_pos: [1] int64; k_cache, v_cache: [>= B, n_kv_head, S, head_dim], updated in place at
    input_pos with the RoPE'd key and the value. counts: int32 zeros [>= B * n_kv_head], the
    launch's arrival counters, left zero again (pass a persistent one, e.g. the engine's KV cache
    holds it, to spare a memset per call; None allocates one). Runs as
    ``torch.ops.actsparse.decode_attention``: one launch.
    """
    if qkv.device.type != "cuda" and not _interpreting():
        raise ValueError("decode_attention: the Triton kernels need CUDA (or TRITON_INTERPRET=1); "
                         "use decode_attention_reference on the CPU")
    if counts is None:
        counts = torch.zeros(qkv.shape[0] * n_kv_head, dtype=torch.int32, device=qkv.device)
    return torch.ops.actsparse.decode_attention(qkv, cos, sin, mask, input_pos, k_cache, v_cache, counts,
                                                n_head, n_kv_head, head_dim)


def decode_attention_reference(qkv, cos, sin, mask, input_pos, k_cache, v_cache, n_head: int, n_kv_head: int,
                               head_dim: int) -> torch.Tensor:
    """Pure-PyTorch semantics: RoPE in fp32 (rounded to the model dtype), cache write, masked
    softmax attention in fp32."""
    from ..engine.model import apply_rope  # noqa: PLC0415 (the engine's RoPE: the same rounding)

    _check(qkv, cos, sin, mask, input_pos, k_cache, v_cache, n_head, n_kv_head, head_dim)
    B, D, H, Hkv = qkv.shape[0], head_dim, n_head, n_kv_head
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    cos, sin = cos.reshape(-1, D)[-1].float(), sin.reshape(-1, D)[-1].float()
    q = apply_rope(q.view(B, H, D), cos, sin)  # [B, heads, D]
    k_cache[:B, :, input_pos] = apply_rope(k.view(B, Hkv, D), cos, sin).unsqueeze(2)
    v_cache[:B, :, input_pos] = v.view(B, Hkv, 1, D)
    keys = k_cache[:B].float().repeat_interleave(H // Hkv, dim=1)  # [B, H, S, D]
    values = v_cache[:B].float().repeat_interleave(H // Hkv, dim=1)
    scores = torch.einsum("bhd,bhsd->bhs", q.float(), keys) / math.sqrt(D)
    scores = scores.masked_fill(~mask.reshape(-1, mask.shape[-1])[-1].bool(), float("-inf"))
    y = torch.einsum("bhs,bhsd->bhd", torch.softmax(scores, dim=-1), values)
    return y.reshape(B, H * D).to(qkv.dtype)
