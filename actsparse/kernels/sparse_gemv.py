"""Input-sparse GEMV: y = (x * (|x| > thresholds)) @ w_t, reading only the weight rows it needs.

Batch-1 (and small-batch) decode is bound by memory bandwidth: every weight byte is read once per
token and used for one multiply-add. When an input element x[:, k] is zeroed by its threshold in
every batch row, weight row k (``w_t[k, :]``, contiguous in this [K, N] layout) contributes
nothing, so the kernel does not load it. Time then falls with the fraction of rows kept.

Three layers (one file stem shared with ``tests/test_sparse_gemv.py`` and
``benchmarks/bench_sparse_gemv.py``):

- The Triton kernels. Split-K over a grid of (column tile, K range) programs, about one wave in
  total. ``_sparse_gemv_compact_kernel`` (the default, ``GemvConfig(compact=True)``): each program
  first lists the kept rows of its K range (threshold test fused, prefix sum, row indices stored to
  a scratch slice of the workspace), then streams only those rows in full ``BLOCK_K``-row tiles,
  so the bytes in flight per step do not shrink with sparsity. ``_sparse_gemv_kernel`` keeps the
  earlier designs for comparison in the benchmark sweeps: masked row loads over every step of the
  range, with a register loop (``num_stages=1``) or a cp.async pipeline (``num_stages>1``); both
  lose to the compacting kernel at s >= 0.5 (docs/notes/sparse_gemv.md).
  Partial sums meet in an fp32 workspace through atomics; the last program to finish a column
  tile (an arrival counter per tile) casts the sum into ``y`` and zeroes the workspace and its
  counter again. One launch: no memset, no cast kernel.
- ``sparse_gemv()``: checks shapes/dtypes/devices, picks a config from (K, N, B), and runs the
  custom op ``torch.ops.actsparse.sparse_gemv`` (``torch.library.triton_op`` + ``wrap_triton``)
  so ``torch.compile`` and CUDA graphs see through it. ``sparse_gemv_add_(out, x, w_t, thr)``
  (``torch.ops.actsparse.sparse_gemv_add_``) is the fused-residual form: ``out`` (fp32) += the
  product, each program adding its partial sum straight into ``out`` (no workspace, no counter,
  no final pass: 1.5-2 us less per call on an H100). ``GemvConfig(pdl=True)`` launches with
  programmatic dependent launch on Hopper+ (on by default: ``set_pdl_default`` / ``ACTSPARSE_GEMV_PDL=0``).
- Modules (``actsparse.sparsify.SparseLinear``, the engine) call ``sparse_gemv``.

Workspace. In eager mode (also inside a manual ``torch.cuda.graph`` capture) the workspace is
cached per (device, stream) and left zeroed by each launch, so a call is a single kernel. While
``torch.compile`` traces the op (fake/functional tensors) the body instead allocates a fresh
zeroed workspace, which keeps the traced graph functional at the cost of one small memset.
Warm up once per dtype and shape on the capture stream before capturing a CUDA graph, so that
Triton compiles and the workspace is allocated outside the capture.

Input prologues (``norm_weight=`` / ``act="silu"``; compacting kernel only): the op before the
GEMV runs inside it. With an RMSNorm every program first reduces the whole input row to its scale,
then normalizes the inputs it tests and the rows it keeps; with ``act="silu"`` x is the gate/up
output ``[gate | up]`` and each input is ``silu(gate) * up``. Both round as the eager PyTorch ops do
(``apply_input_prologue``), and the thresholds apply to the result.

Batch > 8 falls back to ``_masked_dense_gemv`` (threshold mask + cuBLAS matmul): with more than
8 independent rows the union of kept inputs is nearly dense, and a GEMM is the right tool.

Numerics: products and sums in fp32, one rounding to x.dtype at the end. The order in which
split-K partial sums land is not fixed, so results can differ from run to run in the last bits.
An input is kept iff ``|x| > thr`` (strict); NaN inputs are never kept.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

MAX_KERNEL_BATCH = 8  # rows handled by the kernel; larger batches use _masked_dense_gemv
_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _mask_and(mask, cond):
    """``mask & cond`` for a scalar ``cond`` (a select, the same code on the GPU). Triton 3.9's CPU
    interpreter gives ``block & scalar`` int32 data under an int1 type, which load, store and atomic
    masks then refuse ("mask has unsupported dtype")."""
    return tl.where(cond, mask, False)


@triton.jit
def _dot_kept(x_tile, keep, w_tile, acc, DOT_FP32: tl.constexpr):
    """acc += (x_tile where keep) @ w_tile; x_tile: [B_PAD, BLOCK_K], w_tile: [BLOCK_K, BLOCK_N]."""
    if DOT_FP32:
        x_kept = tl.where(keep, x_tile.to(tl.float32), 0.0)
        return tl.dot(x_kept, w_tile.to(tl.float32), acc, input_precision="ieee")
    else:
        # 16-bit operands, fp32 accumulation: products of 16-bit values are exact
        x_kept = tl.where(keep, x_tile, tl.zeros_like(x_tile))
        return tl.dot(x_kept, w_tile, acc)


@triton.jit
def _sparse_gemv_kernel(
    x_ptr,  # x: [B, K], unit column stride, row stride stride_xb
    w_ptr,  # w_t: [K, N] contiguous; row k = weights fed by input k
    thr_ptr,  # thresholds: [K] fp32 (not read when HAS_THRESHOLDS is False)
    y_ptr,  # y: [B, N] contiguous, x.dtype
    acc_ptr,  # workspace: [>= B * N] fp32, all zero on entry, left all zero on exit
    count_ptr,  # arrival counters: [>= cdiv(N, BLOCK_N)] int32, zero on entry and exit
    B,
    K,
    N,
    stride_xb,
    HAS_THRESHOLDS: tl.constexpr,
    USE_DOT: tl.constexpr,  # False: B == 1, FMA path; True: B <= X_ROWS rows through tl.dot
    X_ROWS: tl.constexpr,  # power of two >= B (<= 8): batch rows scanned for the row mask
    B_PAD: tl.constexpr,  # rows of the dot operand (16, tl.dot's minimum); 1 for the FMA path
    DOT_FP32: tl.constexpr,  # dot in fp32 ("ieee"): fp32 inputs, and the CPU interpreter
    SINGLE_SPLIT: tl.constexpr,  # one program along K: store y directly, no workspace
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STEPS: tl.constexpr,  # power of two: program (n, k) owns rows [k, k + 1) * STEPS * BLOCK_K
    NUM_STAGES: tl.constexpr,  # 1: register variant; > 1: cp.async pipeline this deep
    ACCUMULATE: tl.constexpr,  # y (fp32) += the product (sparse_gemv_add_)
    USE_PDL: tl.constexpr,  # programmatic dependent launch (see _pdl_prologue)
):
    _pdl_prologue(USE_PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_lo = pid_k * (STEPS * BLOCK_K)
    offs_b = tl.arange(0, B_PAD)
    b_mask = offs_b < B
    offs_j = tl.arange(0, BLOCK_K)
    steps = tl.arange(0, STEPS)

    if NUM_STAGES > 1:
        # Pipelined variant. The row mask of the whole range is computed up front (one round
        # trip) so that inside the loop the weight copies depend only on registers and the
        # cp.async pipeline can issue them NUM_STAGES - 1 steps ahead. rows_2d: [STEPS, BLOCK_K];
        # rows >= K (last program) are masked.
        rows_2d = k_lo + steps[:, None] * BLOCK_K + offs_j[None, :]
        in_range_2d = rows_2d < K
        if HAS_THRESHOLDS:
            thr_2d = tl.load(thr_ptr + rows_2d, mask=in_range_2d, other=0.0)
        else:
            thr_2d = tl.zeros([STEPS, BLOCK_K], dtype=tl.float32)
        if USE_DOT:
            # active_2d: a weight row is read iff any batch row keeps its input
            active_2d = tl.zeros([STEPS, BLOCK_K], dtype=tl.int32)
            for b in tl.static_range(X_ROWS):
                x_b = tl.load(x_ptr + b * stride_xb + rows_2d, mask=_mask_and(in_range_2d, b < B), other=0.0)
                keep_b = _mask_and((tl.abs(x_b.to(tl.float32)) > thr_2d) & in_range_2d, b < B)
                active_2d = tl.maximum(active_2d, keep_b.to(tl.int32))
            acc = tl.zeros([B_PAD, BLOCK_N], dtype=tl.float32)
            for i in tl.range(0, STEPS, num_stages=NUM_STAGES):
                row_active = tl.max(tl.where(steps[:, None] == i, active_2d, 0), axis=0) > 0
                offs_k = k_lo + i * BLOCK_K + offs_j
                k_mask = offs_k < K
                x_tile = tl.load(  # [B_PAD, BLOCK_K]
                    x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :],
                    mask=b_mask[:, None] & k_mask[None, :],
                    other=0.0,
                )
                if HAS_THRESHOLDS:
                    thr = tl.load(thr_ptr + offs_k, mask=k_mask, other=0.0)
                else:
                    thr = tl.zeros([BLOCK_K], dtype=tl.float32)
                keep = tl.abs(x_tile.to(tl.float32)) > thr[None, :]
                w_tile = tl.load(  # [BLOCK_K, BLOCK_N]; masked rows issue no memory traffic
                    w_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :],
                    mask=row_active[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc = _dot_kept(x_tile, keep, w_tile, acc, DOT_FP32)
        else:
            x_2d = tl.load(x_ptr + rows_2d, mask=in_range_2d, other=0.0).to(tl.float32)
            x_kept_2d = tl.where((tl.abs(x_2d) > thr_2d) & in_range_2d, x_2d, 0.0)
            acc_2d = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
            for i in tl.range(0, STEPS, num_stages=NUM_STAGES):
                x_step = tl.sum(tl.where(steps[:, None] == i, x_kept_2d, 0.0), axis=0)  # [BLOCK_K]
                offs_k = k_lo + i * BLOCK_K + offs_j
                # a kept input equal to zero (negative threshold) contributes nothing: skip it
                w_tile = tl.load(
                    w_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :],
                    mask=(x_step != 0.0)[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc_2d += x_step[:, None] * w_tile.to(tl.float32)
            acc = tl.sum(acc_2d, axis=0)[None, :]  # [1, BLOCK_N]
    else:
        # Register variant: plain loads, no shared memory or barriers inside the loop. Step i
        # reads x for step i + 1 ahead of its weight rows, so a step costs one round trip;
        # several programs per SM keep the memory system busy.
        offs_k = k_lo + offs_j
        if USE_DOT:
            acc = tl.zeros([B_PAD, BLOCK_N], dtype=tl.float32)
            x_next = tl.load(
                x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :],
                mask=b_mask[:, None] & (offs_k < K)[None, :],
                other=0.0,
            )
        else:
            acc_2d = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
            x_next = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0)
        if HAS_THRESHOLDS:
            thr_next = tl.load(thr_ptr + offs_k, mask=offs_k < K, other=0.0)
        else:
            thr_next = tl.zeros([BLOCK_K], dtype=tl.float32)
        for i in tl.range(0, STEPS, num_stages=1):
            offs_k = k_lo + i * BLOCK_K + offs_j
            k_mask = offs_k < K
            x_cur = x_next
            thr = thr_next
            offs_p = offs_k + BLOCK_K  # prefetch the next step's x and thresholds
            p_mask = _mask_and(offs_p < K, i + 1 < STEPS)
            if USE_DOT:
                x_next = tl.load(
                    x_ptr + offs_b[:, None] * stride_xb + offs_p[None, :],
                    mask=b_mask[:, None] & p_mask[None, :],
                    other=0.0,
                )
            else:
                x_next = tl.load(x_ptr + offs_p, mask=p_mask, other=0.0)
            if HAS_THRESHOLDS:
                thr_next = tl.load(thr_ptr + offs_p, mask=p_mask, other=0.0)
            if USE_DOT:
                keep = (tl.abs(x_cur.to(tl.float32)) > thr[None, :]) & b_mask[:, None] & k_mask[None, :]
                row_active = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_K]
                w_tile = tl.load(
                    w_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :],
                    mask=row_active[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc = _dot_kept(x_cur, keep, w_tile, acc, DOT_FP32)
            else:
                x_f32 = x_cur.to(tl.float32)
                keep = (tl.abs(x_f32) > thr) & k_mask
                w_tile = tl.load(
                    w_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :],
                    mask=keep[:, None] & n_mask[None, :],
                    other=0.0,
                )
                acc_2d += tl.where(keep, x_f32, 0.0)[:, None] * w_tile.to(tl.float32)
        if not USE_DOT:
            acc = tl.sum(acc_2d, axis=0)[None, :]  # [1, BLOCK_N]

    _publish(acc, y_ptr, acc_ptr, count_ptr, pid_n, offs_b, offs_n, b_mask, n_mask, N, SINGLE_SPLIT, ACCUMULATE)


@triton.jit
def _pdl_prologue(USE_PDL: tl.constexpr):
    """Programmatic dependent launch (Hopper+): the launch may start this grid while the previous
    kernel of the stream is still running, to hide the launch latency. Every memory access of
    this kernel comes after the wait (x may be that kernel's output; the workspace, counters
    and index scratch are shared between calls); once it returns, the next PDL launch may start."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _publish(acc, y_ptr, acc_ptr, count_ptr, pid_n, offs_b, offs_n, b_mask, n_mask, N,
             SINGLE_SPLIT: tl.constexpr, ACCUMULATE: tl.constexpr):
    """Epilogue shared by both kernels: store acc [B_PAD, BLOCK_N] into y (one split), or add it
    into the fp32 workspace; the last program of a column tile publishes the sum and re-zeroes.
    ACCUMULATE (``sparse_gemv_add_``): y is fp32 and every program adds its partial sum into it
    directly: no workspace, no arrival counter, no last-program pass."""
    out_offs = offs_b[:, None] * N + offs_n[None, :]
    out_mask = b_mask[:, None] & n_mask[None, :]
    if ACCUMULATE:
        tl.atomic_add(y_ptr + out_offs, acc, mask=out_mask, sem="relaxed")
    elif SINGLE_SPLIT:
        tl.store(y_ptr + out_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.atomic_add(acc_ptr + out_offs, acc, mask=out_mask, sem="relaxed")
        tl.debug_barrier()  # every thread's adds happen before the (release) arrival below
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == tl.num_programs(1) - 1:
            total = tl.atomic_add(acc_ptr + out_offs, tl.zeros_like(acc), mask=out_mask, sem="acq_rel")
            total = tl.where(out_mask, total, 0.0)  # masked lanes of an atomic return junk
            tl.store(y_ptr + out_offs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.store(acc_ptr + out_offs, tl.zeros_like(acc), mask=out_mask)
            tl.atomic_xchg(count_ptr + pid_n, 0)


@triton.jit
def _list_kept(active, rows, scratch, cnt):
    """Append the rows with active > 0 to scratch[cnt:], in order; returns the new count."""
    rank = tl.cumsum(active, axis=0) - 1
    tl.store(scratch + cnt + rank, rows, mask=active > 0)
    return cnt + tl.sum(active, axis=0)


PRE_NONE, PRE_RMSNORM, PRE_SILU_MUL = 0, 1, 2  # input prologues of the compacting kernel
_PRE_CODES = {None: PRE_NONE, "rmsnorm": PRE_RMSNORM, "silu": PRE_SILU_MUL}


@triton.jit
def _rms_scale(x_ptr, stride_xb, K, eps, offs_b, b_mask, B_PAD: tl.constexpr, R_BLOCK: tl.constexpr,
               R_STEPS: tl.constexpr):
    """RMSNorm prologue: rsqrt(mean(x[b]^2) + eps) for every batch row, [B_PAD] fp32.
    R_STEPS * R_BLOCK >= K (a constexpr bound: the CPU interpreter takes no tensor bounds)."""
    offs_r = tl.arange(0, R_BLOCK)
    ss = tl.zeros([B_PAD], dtype=tl.float32)
    for k0 in range(0, R_STEPS * R_BLOCK, R_BLOCK):
        v = tl.load(x_ptr + offs_b[:, None] * stride_xb + k0 + offs_r[None, :],
                    mask=b_mask[:, None] & ((k0 + offs_r) < K)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(v * v, axis=1)
    return 1.0 / tl.sqrt(ss / K + eps)


@triton.jit
def _x_raw(x_ptr, row_off, cols, mask, nw_ptr, K, PRE: tl.constexpr):
    """The loads behind _x_vals, issued apart from its arithmetic (so that they can go out before
    the RMSNorm scale is known): PRE_RMSNORM (x, norm weight), PRE_SILU_MUL (gate, up), else (x, x)."""
    if PRE == 1:  # PRE_RMSNORM (Triton kernels read no plain module globals, hence the literals)
        a = tl.load(x_ptr + row_off + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(nw_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    elif PRE == 2:  # PRE_SILU_MUL
        a = tl.load(x_ptr + row_off + cols, mask=mask, other=0.0).to(tl.float32)
        b = tl.load(x_ptr + row_off + K + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        a = tl.load(x_ptr + row_off + cols, mask=mask, other=0.0)
        b = a
    return a, b


@triton.jit
def _x_finish(a, b, rs, PRE: tl.constexpr, XT: tl.constexpr):
    """_x_vals' arithmetic on _x_raw's loads."""
    if PRE == 1:
        return (b * (a * rs).to(XT).to(tl.float32)).to(XT)
    elif PRE == 2:
        act = (a / (1.0 + tl.exp(-a))).to(XT).to(tl.float32)
        return (act * b).to(XT)
    else:
        return a


@triton.jit
def _x_vals(x_ptr, row_off, cols, mask, rs, nw_ptr, K, PRE: tl.constexpr, XT: tl.constexpr):
    """The GEMV input at x_ptr + row_off + cols, after the input prologue, in the weights' dtype XT
    (rounded as the eager PyTorch ops round it):
    PRE_NONE: x itself. PRE_RMSNORM: nw * (x * rs).to(XT) (x: the norm's input, any float dtype;
    rs: the row's rsqrt scale). PRE_SILU_MUL: silu(gate) * up with gate = x[k], up = x[K + k]."""
    a, b = _x_raw(x_ptr, row_off, cols, mask, nw_ptr, K, PRE)
    return _x_finish(a, b, rs, PRE, XT)


@triton.jit
def _compact_tile(t, cnt, idx, acc, scratch, x_ptr, w_ptr, thr_ptr, N, stride_xb,
                  offs_j, offs_n, n_mask, offs_b, b_mask, rs, nw_ptr, K,
                  HAS_THRESHOLDS: tl.constexpr, USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr,
                  BLOCK_K: tl.constexpr, TILE_SUM: tl.constexpr, PRE: tl.constexpr):
    """One tile of the compacting kernel: kept rows scratch[t : t + BLOCK_K] (indices `idx`,
    fetched one tile ahead). Returns the new accumulator and the next tile's indices.
    B = 1: acc is [BLOCK_K, BLOCK_N] per-row partials, or [1, BLOCK_N] with TILE_SUM (each tile
    summed over its rows at once: fewer registers, so taller tiles fit)."""
    j_mask = (t + offs_j) < cnt
    p_offs = t + BLOCK_K + offs_j
    idx_next = tl.load(scratch + p_offs, mask=p_offs < cnt, other=0)
    w_tile = tl.load(  # [BLOCK_K, BLOCK_N]: BLOCK_K kept rows (fewer in the last tile)
        w_ptr + idx.to(tl.int64)[:, None] * N + offs_n[None, :],
        mask=j_mask[:, None] & n_mask[None, :],
        other=0.0,
    )
    if USE_DOT:
        x_tile = _x_vals(x_ptr, offs_b[:, None] * stride_xb, idx[None, :],  # [B_PAD, BLOCK_K]
                         b_mask[:, None] & j_mask[None, :], rs[:, None], nw_ptr, K, PRE,
                         w_ptr.dtype.element_ty)
        if HAS_THRESHOLDS:
            thr_j = tl.load(thr_ptr + idx, mask=j_mask, other=0.0)
        else:
            thr_j = tl.zeros([BLOCK_K], dtype=tl.float32)
        keep = (tl.abs(x_tile.to(tl.float32)) > thr_j[None, :]) & b_mask[:, None] & j_mask[None, :]
        acc = _dot_kept(x_tile, keep, w_tile, acc, DOT_FP32)
    else:
        # every listed row is kept
        x_j = _x_vals(x_ptr, 0, idx, j_mask, rs, nw_ptr, K, PRE, w_ptr.dtype.element_ty).to(tl.float32)
        if TILE_SUM:
            acc += tl.sum(x_j[:, None] * w_tile.to(tl.float32), axis=0)[None, :]
        else:
            acc += x_j[:, None] * w_tile.to(tl.float32)
    return acc, idx_next



@triton.jit
def _sparse_gemv_compact_kernel(
    x_ptr,  # x: [B, K], unit column stride, row stride stride_xb
    w_ptr,  # w_t: [K, N] contiguous
    thr_ptr,  # thresholds: [K] fp32 (not read when HAS_THRESHOLDS is False)
    y_ptr,  # y: [B, N] contiguous, x.dtype
    acc_ptr,  # workspace: [>= B * N] fp32, zero on entry and exit
    count_ptr,  # arrival counters: [>= cdiv(N, BLOCK_N)] int32, zero on entry and exit
    idx_ptr,  # row-index scratch: [>= num_programs(1) * ROWS] int32, any content on entry
    B,
    K,
    N,
    stride_xb,
    ROWS: tl.constexpr,  # rows of K owned by each program along K (a multiple of BLOCK_K)
    HAS_THRESHOLDS: tl.constexpr,
    USE_DOT: tl.constexpr,
    X_ROWS: tl.constexpr,
    B_PAD: tl.constexpr,
    DOT_FP32: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHUNK: tl.constexpr,  # power of two: rows scanned per step of the compaction pass
    PREFETCH: tl.constexpr,  # B = 1: load the next chunk's x while ranking this one
    STATIC_LOOP: tl.constexpr,  # loop over all ROWS instead of the kept count (CPU interpreter)
    TILE_SUM: tl.constexpr,  # B = 1: sum each tile over its rows at once (see _compact_tile)
    ACCUMULATE: tl.constexpr,  # y (fp32) += the product (sparse_gemv_add_)
    USE_PDL: tl.constexpr,  # programmatic dependent launch (see _pdl_prologue)
    nw_ptr=None,  # PRE_RMSNORM: the norm weight [K] (w's dtype)
    eps=0.0,  # PRE_RMSNORM: the norm's epsilon
    PRE: tl.constexpr = 0,  # input prologue: PRE_NONE, PRE_RMSNORM or PRE_SILU_MUL (see _x_vals)
    R_BLOCK: tl.constexpr = 16,  # PRE_RMSNORM: elements per row per step of the sum of squares
    R_STEPS: tl.constexpr = 1,  # PRE_RMSNORM: steps of the sum of squares (R_STEPS * R_BLOCK >= K)
):
    """Compacting variant: each program first lists the kept rows of its K range (threshold test,
    prefix sum, indices stored to a scratch slice), then streams only those rows in full
    BLOCK_K-row tiles. Steps, and bytes in flight per step, no longer depend on the sparsity."""
    _pdl_prologue(USE_PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    offs_b = tl.arange(0, B_PAD)
    b_mask = offs_b < B
    k_lo = pid_k * ROWS
    # The scratch slice belongs to this K range; the programs of other column tiles with the same
    # pid_k write the same indices to it (same inputs, same order), so their writes agree.
    scratch = idx_ptr + k_lo
    XT = w_ptr.dtype.element_ty
    # Pass 1: compaction. cnt = kept rows so far; kept row r goes to scratch[cnt + rank].
    offs_c = tl.arange(0, CHUNK)
    cnt = tl.zeros([], dtype=tl.int32)
    if not USE_DOT:
        # B = 1. The first chunk's loads (x, thresholds, the norm weight) go out before the RMSNorm
        # scale's read of the whole row, so both cost one memory round trip, not two.
        in_n = (offs_c < ROWS) & (k_lo + offs_c < K)
        a_n, b_n = _x_raw(x_ptr, 0, k_lo + offs_c, in_n, nw_ptr, K, PRE)
        if HAS_THRESHOLDS:
            thr_n = tl.load(thr_ptr + k_lo + offs_c, mask=in_n, other=0.0)
        else:
            thr_n = tl.zeros([CHUNK], dtype=tl.float32)
        if PRE == 1:  # PRE_RMSNORM: every program reduces the whole row to its scale (an L2 read of x)
            rs0 = tl.sum(_rms_scale(x_ptr, stride_xb, K, eps, offs_b, b_mask, B_PAD, R_BLOCK, R_STEPS), axis=0)
        else:
            rs0 = 0.0
        rs_t = rs0
        for c in range(0, ROWS, CHUNK):
            rows = k_lo + c + offs_c
            in_r = ((c + offs_c) < ROWS) & (rows < K)
            a_c = a_n
            b_c = b_n
            thr = thr_n
            in_n = ((c + CHUNK + offs_c) < ROWS) & (rows + CHUNK < K)
            if PREFETCH:
                # chunk c + 1's loads are requested before chunk c is ranked, so a range of several
                # chunks costs one memory round trip instead of one per chunk
                a_n, b_n = _x_raw(x_ptr, 0, rows + CHUNK, in_n, nw_ptr, K, PRE)
                if HAS_THRESHOLDS:
                    thr_n = tl.load(thr_ptr + rows + CHUNK, mask=in_n, other=0.0)
            x_c = _x_finish(a_c, b_c, rs0, PRE, XT)
            active = ((tl.abs(x_c.to(tl.float32)) > thr) & in_r).to(tl.int32)
            cnt = _list_kept(active, rows, scratch, cnt)
            if not PREFETCH:
                a_n, b_n = _x_raw(x_ptr, 0, rows + CHUNK, in_n, nw_ptr, K, PRE)
                if HAS_THRESHOLDS:
                    thr_n = tl.load(thr_ptr + rows + CHUNK, mask=in_n, other=0.0)
    else:
        if PRE == 1:  # PRE_RMSNORM: one scale per batch row
            rs_t = _rms_scale(x_ptr, stride_xb, K, eps, offs_b, b_mask, B_PAD, R_BLOCK, R_STEPS)  # [B_PAD]
        else:
            rs_t = tl.zeros([B_PAD], dtype=tl.float32)
        for c in range(0, ROWS, CHUNK):
            rows = k_lo + c + offs_c
            in_r = ((c + offs_c) < ROWS) & (rows < K)
            if HAS_THRESHOLDS:
                thr = tl.load(thr_ptr + rows, mask=in_r, other=0.0)
            else:
                thr = tl.zeros([CHUNK], dtype=tl.float32)
            active = tl.zeros([CHUNK], dtype=tl.int32)
            for b in tl.static_range(X_ROWS):
                rs_b = tl.sum(tl.where(offs_b == b, rs_t, 0.0), axis=0)
                x_b = _x_vals(x_ptr, b * stride_xb, rows, _mask_and(in_r, b < B), rs_b, nw_ptr, K, PRE, XT)
                keep_b = _mask_and((tl.abs(x_b.to(tl.float32)) > thr) & in_r, b < B)
                active = tl.maximum(active, keep_b.to(tl.int32))
            cnt = _list_kept(active, rows, scratch, cnt)
    tl.debug_barrier()  # the CTA's index stores are visible to all of its threads

    # Pass 2: full tiles of kept rows. Indices of tile t + 1 are fetched during tile t.
    offs_j = tl.arange(0, BLOCK_K)
    idx_next = tl.load(scratch + offs_j, mask=offs_j < cnt, other=0)
    if USE_DOT:
        acc = tl.zeros([B_PAD, BLOCK_N], dtype=tl.float32)
    elif TILE_SUM:
        acc = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)  # per-row partials, summed at the end
    if STATIC_LOOP:
        # The CPU interpreter (NumPy >= 2.4) cannot take a tensor as a loop bound: it runs every
        # possible tile; tiles past cnt are fully masked, so the result is the same.
        for t in range(0, ROWS, BLOCK_K):
            acc, idx_next = _compact_tile(t, cnt, idx_next, acc, scratch, x_ptr, w_ptr, thr_ptr, N, stride_xb,
                                          offs_j, offs_n, n_mask, offs_b, b_mask, rs_t,
                                          nw_ptr, K, HAS_THRESHOLDS, USE_DOT, DOT_FP32, BLOCK_K, TILE_SUM, PRE)
    else:
        for t in range(0, cnt, BLOCK_K):
            acc, idx_next = _compact_tile(t, cnt, idx_next, acc, scratch, x_ptr, w_ptr, thr_ptr, N, stride_xb,
                                          offs_j, offs_n, n_mask, offs_b, b_mask, rs_t,
                                          nw_ptr, K, HAS_THRESHOLDS, USE_DOT, DOT_FP32, BLOCK_K, TILE_SUM, PRE)
    if not USE_DOT and not TILE_SUM:
        acc = tl.sum(acc, axis=0)[None, :]  # [1, BLOCK_N]
    _publish(acc, y_ptr, acc_ptr, count_ptr, pid_n, offs_b, offs_n, b_mask, n_mask, N, SINGLE_SPLIT, ACCUMULATE)


@dataclass(frozen=True)
class GemvConfig:
    """One launch's shape: BLOCK_K x BLOCK_N weight tiles, the loop variant (num_stages == 1:
    register loads; > 1: a cp.async pipeline that deep), and about `programs_per_sm` programs per
    SM in total (this sets the number of K splits)."""

    block_k: int
    block_n: int
    num_stages: int = 1
    num_warps: int = 4
    programs_per_sm: int = 6
    max_steps: int = 64  # cap on STEPS (the pipelined variant keeps STEPS*BLOCK_K x values)
    use_dot: Optional[bool] = None  # tl.dot for B == 1 too if True; B > 1 always uses tl.dot
    compact: bool = False  # list the kept rows first, then stream full tiles of them
    pdl: bool = False  # programmatic dependent launch on Hopper+ (ignored elsewhere)
    chunk: int = 512  # compacting variant: rows per compaction step (2048 measured slower)
    prefetch: bool = False  # compacting variant, B = 1: overlap the compaction steps' x loads
    tile_sum: bool = False  # compacting variant, B = 1: reduce each tile at once (taller tiles fit)
    # Cap on registers per thread (None: the compiler's choice). A launch option for sweeps: the
    # shipped B=1 tile already runs at 128 registers on an H100 (4 programs per SM, Nsight
    # Compute), and capping the others gained nothing (docs/RESULTS.md, "Register footprint").
    maxnreg: Optional[int] = None

    def __post_init__(self):
        for name in ("block_k", "block_n", "max_steps", "chunk"):
            value = getattr(self, name)
            smallest = 1 if name == "max_steps" else 16
            if value < smallest or value & (value - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two >= {smallest}, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemvConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1 or self.programs_per_sm < 1:
            raise ValueError("GemvConfig.num_stages and programs_per_sm must be >= 1")
        if self.compact and self.num_stages != 1:
            raise ValueError("GemvConfig: the compacting variant has no cp.async pipeline (num_stages=1)")
        if self.maxnreg is not None and not 24 <= self.maxnreg <= 255:
            raise ValueError(f"GemvConfig.maxnreg must be None or in [24, 255], got {self.maxnreg}")

    def __str__(self) -> str:
        dot = {None: "", True: "-dot", False: "-fma"}[self.use_dot]
        return (f"{'c-' if self.compact else ''}bk{self.block_k}-bn{self.block_n}-st{self.num_stages}"
                f"-w{self.num_warps}-p{self.programs_per_sm}{dot}{'-pdl' if self.pdl else ''}"
                f"{'' if self.chunk == 512 else f'-ch{self.chunk}'}{'-pf' if self.prefetch else ''}"
                f"{'-ts' if self.tile_sum else ''}{'' if self.maxnreg is None else f'-r{self.maxnreg}'}")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_TUNED: dict[str, GemvConfig] = {}  # "b1" / "batched": configs from a sweep on this machine


def set_tuned_configs(b1: Optional[GemvConfig] = None, batched: Optional[GemvConfig] = None) -> None:
    """Use these configs instead of the built-in rule (e.g. the winners of
    ``benchmarks/bench_sparse_gemv.py --sweep --save-choice`` on your GPU); None restores the rule."""
    _TUNED.clear()
    if b1 is not None:
        _TUNED["b1"] = b1
    if batched is not None:
        _TUNED["batched"] = batched


def load_tuned_configs(path: str) -> dict[str, GemvConfig]:
    """Read {"b1": {GemvConfig fields}, "batched": {...}} (JSON) and apply it with set_tuned_configs."""
    import json  # noqa: PLC0415

    with open(path) as f:
        raw = json.load(f)
    configs = {k: GemvConfig(**v) for k, v in raw.items() if k in ("b1", "batched") and v}
    set_tuned_configs(configs.get("b1"), configs.get("batched"))
    return configs


if os.environ.get("ACTSPARSE_GEMV_CONFIGS"):  # a tuned-config file for this machine (see above)
    load_tuned_configs(os.environ["ACTSPARSE_GEMV_CONFIGS"])


def _clamped(config: GemvConfig, K: int, N: int) -> GemvConfig:
    return dataclasses.replace(
        config,
        block_k=min(config.block_k, max(16, _next_pow2(K))),
        block_n=min(config.block_n, max(16, _next_pow2(N))),
    )


# On by default (inert off Hopper and in the CPU interpreter). With every kernel of a decode block
# ours (fused residual, prologues and attention), PDL gained 1.2-1.9% end to end in H100 engine
# runs and was neutral on the ReLU engine. It was off for a session because on 2 of the 3 machines
# that first ran with it, Inductor could not analyse the PTX of a traced PDL kernel and compiled
# 8 copy kernels per layer around the attention (174 -> 430 kernels per step, -6%). Launches that
# Inductor traces now leave PDL out (_pdl_supported's probe). On a fresh H100 that had just run the
# PDL-on GPU tests, the engine step stayed at 174 kernels with PDL on and off, and PDL gained 1.3%
# at s=0.5 and 2.2% at s=0.7 in the same run (2026-12-05, 72b82ce; docs/RESULTS.md).
# ACTSPARSE_GEMV_PDL=0 turns it off.
_PDL_DEFAULT = [os.environ.get("ACTSPARSE_GEMV_PDL", "1") != "0"]


def set_pdl_default(on: bool) -> None:
    """Launch every config that pick_config returns, and the decode attention kernel, with
    programmatic dependent launch (Hopper+; inert elsewhere). On by default; ACTSPARSE_GEMV_PDL=0
    turns it off. Captured CUDA graphs and compiled code keep the launch form they were made with."""
    _PDL_DEFAULT[0] = bool(on)


def pdl_default() -> bool:
    """Whether set_pdl_default is on (see there)."""
    return _PDL_DEFAULT[0]


def pick_config(K: int, N: int, B: int) -> GemvConfig:
    config = _pick_config(K, N, B)
    return dataclasses.replace(config, pdl=True) if _PDL_DEFAULT[0] else config


def _pick_config(K: int, N: int, B: int) -> GemvConfig:
    """Tile config for a (K, N, B) problem, with the tile clamped for small K or N. No per-model
    table: one rule for every shape (or the configs given to set_tuned_configs).

    Both batch regimes use the compacting variant (kept rows listed first, then full tiles of
    them), as picked by the H100 sweep of 13 + 6 configs (docs/notes/sparse_gemv.md):
    B == 1: 64x128 tiles, 4 warps, ~4 programs per SM, the next compaction chunk prefetched;
    very wide outputs (N >= 16384, e.g. a fused gate/up) 32x256 tiles, 8 % faster there.
    B > 1: tl.dot on 64x256 tiles, 8 warps, ~2 programs per SM.
    """
    tuned = _TUNED.get("b1" if B == 1 else "batched")
    if tuned is not None:
        return _clamped(tuned, K, N)
    if B == 1:
        if N >= 16384:
            return _clamped(GemvConfig(32, 256, num_warps=4, programs_per_sm=4, compact=True), K, N)
        # prefetch: measured neutral to 6% faster on qkv/o/down shapes (H100, 1f55bbd); not with
        # the 256-wide tiles above, where with PDL it was 17% slower at s=0.9
        return _clamped(GemvConfig(64, 128, num_warps=4, programs_per_sm=4, compact=True, prefetch=True), K, N)
    return _clamped(GemvConfig(64, 256, num_warps=8, programs_per_sm=2, compact=True), K, N)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the CPU interpreter: any small number exercises the split-K path


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_k(K: int, grid_n: int, config: GemvConfig, sm_count: int) -> tuple[int, int]:
    """(programs along K, BLOCK_K steps per program): about programs_per_sm * sm_count programs
    in all, each owning a power-of-two number of steps.

    The compacting variant takes any number of steps and floors the target, so one wave holds
    every program. The older variants round the target and need power-of-two steps, which can
    overshoot the resident capacity (Llama-3 gate_up at B=1: 896 programs for ~792 slots).
    """
    k_blocks = triton.cdiv(K, config.block_k)
    if config.compact:
        # Any number of steps per program: floor the target so that one wave holds every program.
        target = max(1, (config.programs_per_sm * sm_count) // grid_n)
        steps = triton.cdiv(k_blocks, target)
        return triton.cdiv(k_blocks, steps), steps
    target = max(1, round(config.programs_per_sm * sm_count / grid_n))
    steps = min(_next_pow2(triton.cdiv(k_blocks, target)), config.max_steps, _next_pow2(k_blocks))
    return triton.cdiv(k_blocks, steps), steps


# --------------------------------------------------------------------------------------------
# Workspace: fp32 partial sums and per-column-tile arrival counters, left zeroed by each launch.
# --------------------------------------------------------------------------------------------
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
_RETIRED_WORKSPACES: list[tuple] = []  # kept alive: graphs may hold them


def _stream_key(device: torch.device) -> tuple:
    if device.type == "cuda":
        return (device.type, device.index, torch.cuda.current_stream(device).stream_id)
    return (device.type, device.index, 0)


def _cached_workspace(device: torch.device, acc_numel: int, count_numel: int, idx_numel: int = 1):
    """(fp32 partial sums, int32 arrival counters, int32 row-index scratch) for this stream."""
    key = _stream_key(device)
    cached = _WORKSPACES.get(key)
    if (cached is not None and cached[0].numel() >= acc_numel and cached[1].numel() >= count_numel
            and cached[2].numel() >= idx_numel):
        return cached
    if cached is not None:
        _RETIRED_WORKSPACES.append(cached)
        acc_numel = max(acc_numel, cached[0].numel())
        count_numel = max(count_numel, cached[1].numel())
        idx_numel = max(idx_numel, cached[2].numel())
    cached = (
        torch.zeros(acc_numel, dtype=torch.float32, device=device),
        torch.zeros(count_numel, dtype=torch.int32, device=device),
        torch.empty(idx_numel, dtype=torch.int32, device=device),  # scratch: no zeroing needed
    )
    _WORKSPACES[key] = cached
    return cached


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pdl_supported(device: torch.device, probe: Optional[torch.Tensor] = None) -> bool:
    """Programmatic dependent launch needs a Hopper-or-newer GPU (not the CPU interpreter), and a
    real launch: while Inductor traces a custom op (``probe``, an argument of the call, is then a
    fake or functional tensor) the kernel is built without it, since its inline PTX defeats
    Inductor's mutation analysis of user kernels ("ttir analysis hit an op we do not know how to
    analyze"), which then copies the mutated arguments around every call: on an H100 the engine's
    compiled step grew from 174 to 430 kernels and lost 6% (docs/RESULTS.md)."""
    if device.type != "cuda" or _interpreting():
        return False
    if probe is not None and (torch.compiler.is_compiling() or isinstance(probe, _TRACED_TENSORS)):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_capability(index)[0] >= 9


def _traced_tensor_types() -> tuple:
    from torch._subclasses.fake_tensor import FakeTensor  # noqa: PLC0415
    from torch._subclasses.functional_tensor import FunctionalTensor  # noqa: PLC0415

    return (FakeTensor, FunctionalTensor)


_TRACED_TENSORS = _traced_tensor_types()


@functools.lru_cache(maxsize=None)
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def _check_inputs(x: torch.Tensor, w_t: torch.Tensor, thresholds: Optional[torch.Tensor],
                  norm_weight: Optional[torch.Tensor] = None, act: Optional[str] = None) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(w_t, torch.Tensor):
        raise TypeError("sparse_gemv: x and w_t must be tensors")
    if x.dim() not in (1, 2):
        raise ValueError(f"sparse_gemv: x must be [K] or [B, K], got shape {tuple(x.shape)}")
    if w_t.dim() != 2:
        raise ValueError(f"sparse_gemv: w_t must be [K, N], got shape {tuple(w_t.shape)}")
    if act not in _PRE_CODES or act == "rmsnorm":
        raise ValueError(f"sparse_gemv: act must be None or 'silu', got {act!r}")
    if act is not None and norm_weight is not None:
        raise ValueError("sparse_gemv: norm_weight and act are two different input prologues; pass one")
    K = w_t.shape[0]
    x_cols = 2 * K if act is not None else K
    if x.shape[-1] != x_cols:
        what = f"[gate | up] of 2K={x_cols} columns" if act is not None else f"K={K} inputs"
        raise ValueError(
            f"sparse_gemv: w_t is {tuple(w_t.shape)}, so x must have {what}, got {x.shape[-1]}; "
            "w_t must be [K, N] (the transpose of nn.Linear.weight)"
        )
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"sparse_gemv: x.dtype must be bfloat16, float16 or float32, got {x.dtype}")
    if w_t.dtype != x.dtype and not (norm_weight is not None and w_t.dtype in _SUPPORTED_DTYPES):
        raise TypeError(f"sparse_gemv: w_t.dtype ({w_t.dtype}) must equal x.dtype ({x.dtype})")
    if norm_weight is not None:
        if not isinstance(norm_weight, torch.Tensor) or norm_weight.shape != (K,):
            raise ValueError(f"sparse_gemv: norm_weight must be a [K]=[{K}] tensor")
        if norm_weight.dtype != w_t.dtype or norm_weight.device != w_t.device:
            raise TypeError(f"sparse_gemv: norm_weight must be {w_t.dtype} on {w_t.device} like w_t")
    if not w_t.is_contiguous():
        raise ValueError(
            "sparse_gemv: w_t must be contiguous [K, N] (prepare it once with "
            "weight.t().contiguous()); a strided w_t would read scattered memory"
        )
    if w_t.device != x.device:
        raise ValueError(f"sparse_gemv: x is on {x.device} but w_t is on {w_t.device}")
    if thresholds is not None:
        if thresholds.shape != (K,):
            raise ValueError(
                f"sparse_gemv: thresholds must be [K]=[{K}], got shape {tuple(thresholds.shape)}"
            )
        if thresholds.dtype != torch.float32:
            raise TypeError(f"sparse_gemv: thresholds must be float32, got {thresholds.dtype}")
        if thresholds.device != x.device:
            raise ValueError(
                f"sparse_gemv: thresholds are on {thresholds.device} but x is on {x.device}"
            )
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"sparse_gemv: tensors on {x.device}: the Triton kernel needs CUDA (or "
            "TRITON_INTERPRET=1); use sparse_gemv_reference (the 'torch' backend) on the CPU"
        )


def apply_input_prologue(x: torch.Tensor, dtype: torch.dtype, norm_weight: Optional[torch.Tensor] = None,
                         eps: float = 1e-6, act: Optional[str] = None) -> torch.Tensor:
    """The GEMV input that the kernel computes from x with an input prologue, in PyTorch ops
    (the same ops, and roundings, as the engine's RMSNorm and its gated MLP):
    ``norm_weight``: RMSNorm of x, ``norm_weight * (x * rsqrt(mean(x^2) + eps)).to(dtype)``;
    ``act="silu"``: x = [gate | up], ``silu(gate) * up``; neither: x itself."""
    if norm_weight is not None:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return norm_weight * xf.to(dtype)
    if act == "silu":
        gate, up = x.chunk(2, dim=-1)
        return torch.nn.functional.silu(gate) * up
    return x


def _masked_dense_gemv(
    x: torch.Tensor, w_t: torch.Tensor, thresholds: Optional[torch.Tensor]
) -> torch.Tensor:
    """Fallback for B > 8: mask, then one dense matmul (cuBLAS accumulates in fp32)."""
    thr = 0.0 if thresholds is None else thresholds
    x_kept = torch.where(x.abs() > thr, x, torch.zeros_like(x))
    return x_kept @ w_t


def _launcher(kernel):
    """``wrap_triton(kernel)``, so that torch.compile traces through the launch. Some torch versions
    (2.11) refuse the CPU interpreter's kernels there; those are then launched directly."""
    try:
        return wrap_triton(kernel)
    except RuntimeError:
        if _interpreting():
            return kernel
        raise


def _launch(
    x: torch.Tensor,  # [B, K], 1 <= B <= 8
    w_t: torch.Tensor,  # [K, N]
    thresholds: Optional[torch.Tensor],  # [K] fp32 or None
    config: GemvConfig,
    persistent_workspace: bool,
    out: Optional[torch.Tensor] = None,  # [B, N] contiguous, w_t.dtype (tests pass a NaN-filled one)
    accumulate: bool = False,  # out (fp32, required) += the product; no workspace, no counters
    norm_weight: Optional[torch.Tensor] = None,  # input prologue: RMSNorm of x with this weight
    eps: float = 1e-6,
    act: Optional[str] = None,  # input prologue: x = [gate | up] -> silu(gate) * up
) -> torch.Tensor:
    B = x.shape[0]
    K, N = w_t.shape
    if x.stride(1) != 1:
        x = x.contiguous()
    pre = PRE_RMSNORM if norm_weight is not None else _PRE_CODES[act]
    if pre != PRE_NONE and not config.compact:
        raise ValueError("sparse_gemv: input prologues (norm_weight, act) need a compacting config")
    y = torch.empty((B, N), dtype=w_t.dtype, device=x.device) if out is None else out
    grid_n = triton.cdiv(N, config.block_n)
    grid_k, steps = split_k(K, grid_n, config, _sm_count(x.device))
    single_split = grid_k == 1
    idx_numel = grid_k * steps * config.block_k if config.compact else 1
    if persistent_workspace:
        acc, counts, idx = _cached_workspace(x.device, 1 if accumulate else B * N, grid_n, idx_numel)
    else:
        idx = torch.empty(idx_numel, dtype=torch.int32, device=x.device)
        if single_split or accumulate:  # the kernel never touches these
            acc = torch.empty(1, dtype=torch.float32, device=x.device)
            counts = torch.empty(1, dtype=torch.int32, device=x.device)
        else:
            acc = torch.zeros(B * N, dtype=torch.float32, device=x.device)
            counts = torch.zeros(grid_n, dtype=torch.int32, device=x.device)
    use_dot = B > 1 or bool(config.use_dot)  # the FMA path handles one row only
    common = dict(
        HAS_THRESHOLDS=thresholds is not None,
        USE_DOT=use_dot,
        X_ROWS=_next_pow2(B),
        B_PAD=16 if use_dot else 1,
        DOT_FP32=w_t.dtype == torch.float32 or _interpreting(),
        SINGLE_SPLIT=single_split,
        BLOCK_K=config.block_k,
        BLOCK_N=config.block_n,
        ACCUMULATE=accumulate,
        USE_PDL=False,
        num_warps=config.num_warps,
    )
    if config.maxnreg is not None and not _interpreting():
        common["maxnreg"] = config.maxnreg
    if config.pdl and _pdl_supported(x.device, probe=x):
        common.update(USE_PDL=True, launch_pdl=True)
    if config.compact:
        rows = steps * config.block_k
        r_block = max(16, min(_next_pow2(K), 4096 // common["B_PAD"]))
        _launcher(_sparse_gemv_compact_kernel)[(grid_n, grid_k)](
            x, w_t, thresholds if thresholds is not None else x, y, acc, counts, idx,
            B, K, N, x.stride(0),
            ROWS=rows,
            CHUNK=min(config.chunk, _next_pow2(rows)),
            PREFETCH=config.prefetch,
            STATIC_LOOP=_interpreting(),
            TILE_SUM=config.tile_sum and not use_dot,
            nw_ptr=norm_weight if norm_weight is not None else w_t,
            eps=float(eps),
            PRE=pre,
            R_BLOCK=r_block,
            R_STEPS=triton.cdiv(K, r_block) if pre == PRE_RMSNORM else 1,
            **common,
        )
        return y
    _launcher(_sparse_gemv_kernel)[(grid_n, grid_k)](
        x,
        w_t,
        thresholds if thresholds is not None else x,
        y,
        acc,
        counts,
        B,
        K,
        N,
        x.stride(0),
        STEPS=steps,
        NUM_STAGES=config.num_stages,
        **common,
    )
    return y


def _sparse_gemv_impl(
    x: torch.Tensor,
    w_t: torch.Tensor,
    thresholds: Optional[torch.Tensor],
    config: Optional[GemvConfig] = None,
    persistent_workspace: Optional[bool] = None,
    out: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    act: Optional[str] = None,
) -> torch.Tensor:
    """sparse_gemv without the custom-op wrapper; config/persistent_workspace/out for tests and
    benchmarks (None = what sparse_gemv would choose)."""
    _check_inputs(x, w_t, thresholds, norm_weight, act)
    squeeze = x.dim() == 1
    x2d = x.unsqueeze(0) if squeeze else x  # x2d: [B, K] (or [B, 2K] with act)
    B = x2d.shape[0]
    K, N = w_t.shape
    if B == 0 or N == 0 or K == 0:
        y = torch.zeros((B, N), dtype=w_t.dtype, device=x.device)
    elif B > MAX_KERNEL_BATCH:
        y = _masked_dense_gemv(apply_input_prologue(x2d, w_t.dtype, norm_weight, eps, act), w_t, thresholds)
    else:
        if persistent_workspace is None:
            # Real tensors in eager mode (CUDA-graph capture included): cached workspace, one
            # launch. Fake/functional tensors (torch.compile tracing): a fresh zeroed workspace.
            persistent_workspace = type(x) is torch.Tensor and not torch.compiler.is_compiling()
        if out is not None:
            out = out.view(B, N)
        y = _launch(x2d, w_t, thresholds, config or pick_config(K, N, B), persistent_workspace, out,
                    norm_weight=norm_weight, eps=eps, act=act)
    return y.squeeze(0) if squeeze else y


@triton_op("actsparse::sparse_gemv", mutates_args=())
def _sparse_gemv_op(
    x: torch.Tensor, w_t: torch.Tensor, thresholds: Optional[torch.Tensor],
    norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6, act: Optional[str] = None,
) -> torch.Tensor:
    return _sparse_gemv_impl(x, w_t, thresholds, norm_weight=norm_weight, eps=eps, act=act)


def sparse_gemv(
    x: torch.Tensor,  # [B, K] or [K], w_t.dtype (any float dtype with norm_weight; [B, 2K] with act)
    w_t: torch.Tensor,  # [K, N], contiguous
    thresholds: Optional[torch.Tensor] = None,  # [K] fp32; None keeps every nonzero input
    norm_weight: Optional[torch.Tensor] = None,  # [K], w_t.dtype: x is the input of this RMSNorm
    eps: float = 1e-6,  # the RMSNorm's epsilon
    act: Optional[str] = None,  # "silu": x = [gate | up], the input is silu(gate) * up
) -> torch.Tensor:  # [B, N] (or [N]) in w_t.dtype
    """y = (x * (|x| > thresholds)) @ w_t with fp32 accumulation, skipping unused weight rows.

    Weight row k is read iff some batch row keeps x[:, k]. B <= 8 runs the Triton kernel,
    larger batches a masked dense matmul. Runs as ``torch.ops.actsparse.sparse_gemv``.

    Input prologues fuse the op before the GEMV into it (``apply_input_prologue`` is their
    PyTorch form): with ``norm_weight`` the kernel applies the RMSNorm to x itself (every program
    reads the whole row for its scale), and with ``act="silu"`` it computes silu(gate) * up from
    the gate/up projection's output. The thresholds apply to the resulting input. The norm or
    activation kernel before the call, and its launch, disappear.
    """
    return torch.ops.actsparse.sparse_gemv(x, w_t, thresholds, norm_weight, eps, act)


def _check_accumulator(out: torch.Tensor, x: torch.Tensor, N: int) -> None:
    expected = (N,) if x.dim() == 1 else (x.shape[0], N)
    if not isinstance(out, torch.Tensor) or out.dtype != torch.float32:
        raise TypeError("sparse_gemv_add_: out must be a float32 tensor (the fp32 accumulator)")
    if tuple(out.shape) != expected:
        raise ValueError(f"sparse_gemv_add_: out must have shape {expected}, got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise ValueError("sparse_gemv_add_: out must be contiguous")
    if out.device != x.device:
        raise ValueError(f"sparse_gemv_add_: out is on {out.device} but x is on {x.device}")


def _sparse_gemv_add_impl(
    out: torch.Tensor,
    x: torch.Tensor,
    w_t: torch.Tensor,
    thresholds: Optional[torch.Tensor],
    config: Optional[GemvConfig] = None,
    persistent_workspace: Optional[bool] = None,
    norm_weight: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    act: Optional[str] = None,
) -> torch.Tensor:
    """sparse_gemv_add_ without the custom-op wrapper (config for tests and benchmarks)."""
    _check_inputs(x, w_t, thresholds, norm_weight, act)
    _check_accumulator(out, x, w_t.shape[1])
    x2d = x.unsqueeze(0) if x.dim() == 1 else x
    B = x2d.shape[0]
    K, N = w_t.shape
    if B == 0 or N == 0 or K == 0:
        return out
    if B > MAX_KERNEL_BATCH:
        x2d = apply_input_prologue(x2d, w_t.dtype, norm_weight, eps, act)
        thr = 0.0 if thresholds is None else thresholds
        x_kept = torch.where(x2d.abs() > thr, x2d, torch.zeros_like(x2d))
        out.view(B, N).add_(x_kept.float() @ w_t.float())
        return out
    if persistent_workspace is None:
        persistent_workspace = type(x) is torch.Tensor and not torch.compiler.is_compiling()
    _launch(x2d, w_t, thresholds, config or pick_config(K, N, B), persistent_workspace, out.view(B, N),
            accumulate=True, norm_weight=norm_weight, eps=eps, act=act)
    return out


@triton_op("actsparse::sparse_gemv_add_", mutates_args=("out",))
def _sparse_gemv_add_op(
    out: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor, thresholds: Optional[torch.Tensor],
    norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6, act: Optional[str] = None,
) -> None:
    _sparse_gemv_add_impl(out, x, w_t, thresholds, norm_weight=norm_weight, eps=eps, act=act)


def sparse_gemv_add_(
    out: torch.Tensor,  # [B, N] (or [N]) fp32, contiguous: accumulated into
    x: torch.Tensor,  # [B, K] or [K] (see sparse_gemv for the input prologues)
    w_t: torch.Tensor,  # [K, N], contiguous
    thresholds: Optional[torch.Tensor] = None,  # [K] fp32; None keeps every nonzero input
    norm_weight: Optional[torch.Tensor] = None,  # input prologue: RMSNorm (see sparse_gemv)
    eps: float = 1e-6,
    act: Optional[str] = None,  # input prologue: "silu" (see sparse_gemv)
) -> torch.Tensor:
    """out += (x * (|x| > thresholds)) @ w_t, in fp32, skipping unused weight rows; returns out.

    The fused-residual form of ``sparse_gemv`` (e.g. ``residual += down_proj(h)`` with an fp32
    residual stream): each program adds its split-K partial sum into ``out`` with fp32 atomics,
    so the call needs no workspace, no arrival counter and no final pass, which shortens the
    per-call chain that dominates at high sparsity. Summation order varies from run to run.
    """
    torch.ops.actsparse.sparse_gemv_add_(out, x, w_t, thresholds, norm_weight, eps, act)
    return out


def sparse_gemv_add_reference(
    out: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor, thresholds: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None, eps: float = 1e-6, act: Optional[str] = None,
) -> torch.Tensor:
    """Pure-PyTorch semantics of sparse_gemv_add_: out += masked(x) @ w_t in fp32."""
    _check_accumulator(out, x, w_t.shape[1])
    x32 = apply_input_prologue(x, w_t.dtype, norm_weight, eps, act).float()
    thr = 0.0 if thresholds is None else thresholds.float()
    return out.add_(torch.where(x32.abs() > thr, x32, torch.zeros_like(x32)) @ w_t.float())


def sparse_gemv_reference(
    x: torch.Tensor,  # [B, K] or [K]
    w_t: torch.Tensor,  # [K, N]
    thresholds: Optional[torch.Tensor] = None,  # [K] fp32 or None
    norm_weight: Optional[torch.Tensor] = None,  # input prologue (see sparse_gemv)
    eps: float = 1e-6,
    act: Optional[str] = None,
) -> torch.Tensor:  # [B, N] (or [N]) in w_t.dtype
    """Pure-PyTorch semantics of sparse_gemv (any device): fp32 math, one rounding at the end."""
    x32 = apply_input_prologue(x, w_t.dtype, norm_weight, eps, act).float()
    thr = 0.0 if thresholds is None else thresholds.float()
    x_kept = torch.where(x32.abs() > thr, x32, torch.zeros_like(x32))
    return (x_kept @ w_t.float()).to(w_t.dtype)
