"""Input-sparse GEMV: y = (x * (|x| > thresholds)) @ w_t, reading only the weight rows it needs.

Batch-1 (and small-batch) decode is bound by memory bandwidth: every weight byte is read once per
token and used for one multiply-add. When an input element x[:, k] is zeroed by its threshold in
every batch row, weight row k (``w_t[k, :]``, contiguous in this [K, N] layout) contributes
nothing, so the kernel does not load it. Time then falls with the fraction of rows kept.

Three layers (one file stem shared with ``tests/test_sparse_gemv.py`` and
``benchmarks/bench_sparse_gemv.py``):

- ``_sparse_gemv_kernel``: the Triton kernel. Split-K: program (n, k) owns a tile of
  ``BLOCK_N`` output columns and ``BLOCK_K * K_ITERS`` input rows, so that even N = 4096 gives
  hundreds of programs and every SM has loads in flight. The threshold test is fused: a program
  loads its slice of x, compares ``|x| > thr`` and issues masked row loads, so an inactive row
  costs no memory traffic. Partial sums meet in an fp32 workspace through atomics; the last
  program to finish a column tile (an arrival counter per tile) casts the sum into ``y`` and
  zeroes the workspace and its counter again. One launch, no memset, no cast kernel.
- ``sparse_gemv()``: checks shapes/dtypes/devices, picks a tile config from (K, N, B), and runs
  the custom op ``torch.ops.actsparse.sparse_gemv`` (``torch.library.triton_op`` +
  ``wrap_triton``) so ``torch.compile`` and CUDA graphs see through it.
- Modules (``actsparse.sparsify.SparseLinear``, the engine) call ``sparse_gemv``.

Workspace. In eager mode (also inside a manual ``torch.cuda.graph`` capture) the workspace is
cached per (device, stream) and left zeroed by each launch, so a call is a single kernel. While
``torch.compile`` traces the op (fake/functional tensors) the body instead allocates a fresh
zeroed workspace, which keeps the traced graph functional at the cost of one small memset.
Warm up once (one call per dtype and shape) before capturing a CUDA graph so that Triton
compiles outside the capture.

Batch > 8 falls back to ``_masked_dense_gemv`` (threshold mask + cuBLAS matmul): with more than
8 independent rows the union of kept inputs is nearly dense, and a GEMM is the right tool.

Numerics: products and sums in fp32, one rounding to x.dtype at the end. The order in which
split-K partial sums land is not fixed, so results can differ from run to run in the last bits.
An input is kept iff ``|x| > thr`` (strict); NaN inputs are never kept.
"""

from __future__ import annotations

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
    BATCHED: tl.constexpr,  # False: B == 1, FMA path; True: 2 <= B <= B_PAD, tl.dot path
    B_PAD: tl.constexpr,  # rows of the dot operand (>= 16, tl.dot's minimum); 1 when not BATCHED
    DOT_FP32: tl.constexpr,  # dot in fp32 ("ieee"): fp32 inputs, and the CPU interpreter
    SINGLE_SPLIT: tl.constexpr,  # one program along K: store y directly, no workspace
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_ITERS: tl.constexpr,  # BLOCK_K-row steps per program (unrolled)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_start = pid_k * (BLOCK_K * K_ITERS)
    offs_b = tl.arange(0, B_PAD)
    b_mask = offs_b < B
    n_active = 0  # weight rows this program loads; 0 -> nothing to add

    if BATCHED:
        acc = tl.zeros([B_PAD, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(K_ITERS):
            offs_k = k_start + i * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            # x_tile: [B_PAD, BLOCK_K]
            x_tile = tl.load(
                x_ptr + offs_b[:, None] * stride_xb + offs_k[None, :],
                mask=b_mask[:, None] & k_mask[None, :],
                other=0.0,
            )
            if HAS_THRESHOLDS:
                thr = tl.load(thr_ptr + offs_k, mask=k_mask, other=0.0)
            else:
                thr = tl.zeros([BLOCK_K], dtype=tl.float32)
            keep = (tl.abs(x_tile.to(tl.float32)) > thr[None, :]) & b_mask[:, None] & k_mask[None, :]
            # a weight row is read iff any batch row keeps its input
            row_active = tl.sum(keep.to(tl.int32), axis=0) > 0  # [BLOCK_K]
            n_active += tl.sum(row_active.to(tl.int32), axis=0)
            # w_tile: [BLOCK_K, BLOCK_N]; masked rows issue no memory traffic
            w_tile = tl.load(
                w_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :],
                mask=row_active[:, None] & n_mask[None, :],
                other=0.0,
            )
            if DOT_FP32:
                x_kept = tl.where(keep, x_tile.to(tl.float32), 0.0)
                acc = tl.dot(x_kept, w_tile.to(tl.float32), acc, input_precision="ieee")
            else:
                # bf16/fp16 operands, fp32 accumulation: products of 16-bit values are exact
                x_kept = tl.where(keep, x_tile, tl.zeros_like(x_tile))
                acc = tl.dot(x_kept, w_tile, acc)
    else:
        # B == 1: accumulate elementwise products and reduce over K once at the end
        acc_2d = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for i in tl.static_range(K_ITERS):
            offs_k = k_start + i * BLOCK_K + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x_vec = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)  # [BLOCK_K]
            if HAS_THRESHOLDS:
                thr = tl.load(thr_ptr + offs_k, mask=k_mask, other=0.0)
            else:
                thr = tl.zeros([BLOCK_K], dtype=tl.float32)
            keep = (tl.abs(x_vec) > thr) & k_mask
            n_active += tl.sum(keep.to(tl.int32), axis=0)
            w_tile = tl.load(
                w_ptr + offs_k.to(tl.int64)[:, None] * N + offs_n[None, :],
                mask=keep[:, None] & n_mask[None, :],
                other=0.0,
            )
            acc_2d += tl.where(keep, x_vec, 0.0)[:, None] * w_tile.to(tl.float32)
        acc = tl.sum(acc_2d, axis=0)[None, :]  # [1, BLOCK_N]

    # out_offs: [B_PAD, BLOCK_N] offsets into y and the workspace (both [B, N] row-major)
    out_offs = offs_b[:, None] * N + offs_n[None, :]
    out_mask = b_mask[:, None] & n_mask[None, :]
    if SINGLE_SPLIT:
        tl.store(y_ptr + out_offs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        if n_active > 0:
            tl.atomic_add(acc_ptr + out_offs, acc, mask=out_mask, sem="relaxed")
        # every thread's adds happen before the (release) arrival below
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1, sem="acq_rel")
        if arrived == tl.num_programs(1) - 1:
            # last program of this column tile: read the sum at L2, publish it, reset the state
            total = tl.atomic_add(acc_ptr + out_offs, tl.zeros_like(acc), mask=out_mask, sem="acq_rel")
            total = tl.where(out_mask, total, 0.0)  # masked lanes of an atomic return junk
            tl.store(y_ptr + out_offs, total.to(y_ptr.dtype.element_ty), mask=out_mask)
            tl.store(acc_ptr + out_offs, tl.zeros_like(acc), mask=out_mask)
            tl.atomic_xchg(count_ptr + pid_n, 0)


@dataclass(frozen=True)
class GemvConfig:
    """Tile shape of one launch: BLOCK_K x BLOCK_N weight tile, K_ITERS tiles per program."""

    block_k: int
    block_n: int
    k_iters: int = 1
    num_warps: int = 4

    def __post_init__(self):
        for name in ("block_k", "block_n", "k_iters"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemvConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")

    def __str__(self) -> str:
        return f"bk{self.block_k}-bn{self.block_n}-it{self.k_iters}-w{self.num_warps}"

    @property
    def rows_per_program(self) -> int:
        return self.block_k * self.k_iters


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pick_config(K: int, N: int, B: int) -> GemvConfig:
    """Tile config for a (K, N, B) problem, from the H100 sweep in docs/notes/sparse_gemv.md.

    Goals: 16-byte loads along N (BLOCK_N >= 64 when N allows), enough programs to give each of
    the ~132 SMs several tiles in flight even when most rows are masked, and few enough split-K
    slices that the fp32 atomics stay a small fraction of the weight bytes.
    """
    block_n = min(256, max(16, _next_pow2(N)))
    if B == 1:
        block_k = min(64, max(16, _next_pow2(K)))
        return GemvConfig(block_k=block_k, block_n=block_n, k_iters=1, num_warps=4)
    block_k = min(64, max(16, _next_pow2(K)))
    return GemvConfig(block_k=block_k, block_n=min(block_n, 128), k_iters=1, num_warps=4)


# --------------------------------------------------------------------------------------------
# Workspace: fp32 partial sums and per-column-tile arrival counters, left zeroed by each launch.
# --------------------------------------------------------------------------------------------
_WORKSPACES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED_WORKSPACES: list[tuple[torch.Tensor, torch.Tensor]] = []  # kept alive: graphs may hold them


def _stream_key(device: torch.device) -> tuple:
    if device.type == "cuda":
        return (device.type, device.index, torch.cuda.current_stream(device).stream_id)
    return (device.type, device.index, 0)


def _cached_workspace(device: torch.device, acc_numel: int, count_numel: int):
    key = _stream_key(device)
    cached = _WORKSPACES.get(key)
    if cached is not None and cached[0].numel() >= acc_numel and cached[1].numel() >= count_numel:
        return cached
    if cached is not None:
        _RETIRED_WORKSPACES.append(cached)
        acc_numel = max(acc_numel, cached[0].numel())
        count_numel = max(count_numel, cached[1].numel())
    cached = (
        torch.zeros(acc_numel, dtype=torch.float32, device=device),
        torch.zeros(count_numel, dtype=torch.int32, device=device),
    )
    _WORKSPACES[key] = cached
    return cached


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def _check_inputs(x: torch.Tensor, w_t: torch.Tensor, thresholds: Optional[torch.Tensor]) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(w_t, torch.Tensor):
        raise TypeError("sparse_gemv: x and w_t must be tensors")
    if x.dim() not in (1, 2):
        raise ValueError(f"sparse_gemv: x must be [K] or [B, K], got shape {tuple(x.shape)}")
    if w_t.dim() != 2:
        raise ValueError(f"sparse_gemv: w_t must be [K, N], got shape {tuple(w_t.shape)}")
    K = x.shape[-1]
    if w_t.shape[0] != K:
        raise ValueError(
            f"sparse_gemv: x has K={K} inputs but w_t is {tuple(w_t.shape)}; w_t must be [K, N] "
            "(the transpose of nn.Linear.weight)"
        )
    if x.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"sparse_gemv: x.dtype must be bfloat16, float16 or float32, got {x.dtype}")
    if w_t.dtype != x.dtype:
        raise TypeError(f"sparse_gemv: w_t.dtype ({w_t.dtype}) must equal x.dtype ({x.dtype})")
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


def _masked_dense_gemv(
    x: torch.Tensor, w_t: torch.Tensor, thresholds: Optional[torch.Tensor]
) -> torch.Tensor:
    """Fallback for B > 8: mask, then one dense matmul (cuBLAS accumulates in fp32)."""
    thr = 0.0 if thresholds is None else thresholds
    x_kept = torch.where(x.abs() > thr, x, torch.zeros_like(x))
    return x_kept @ w_t


def _launch(
    x: torch.Tensor,  # [B, K], 1 <= B <= 8
    w_t: torch.Tensor,  # [K, N]
    thresholds: Optional[torch.Tensor],  # [K] fp32 or None
    config: GemvConfig,
    persistent_workspace: bool,
    out: Optional[torch.Tensor] = None,  # [B, N] contiguous, x.dtype (tests pass a NaN-filled one)
) -> torch.Tensor:
    B, K = x.shape
    N = w_t.shape[1]
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty((B, N), dtype=x.dtype, device=x.device) if out is None else out
    grid_n = triton.cdiv(N, config.block_n)
    grid_k = triton.cdiv(K, config.rows_per_program)
    single_split = grid_k == 1
    if persistent_workspace:
        acc, counts = _cached_workspace(x.device, B * N, grid_n)
    elif single_split:  # the kernel stores y directly and never touches these
        acc = torch.empty(1, dtype=torch.float32, device=x.device)
        counts = torch.empty(1, dtype=torch.int32, device=x.device)
    else:
        acc = torch.zeros(B * N, dtype=torch.float32, device=x.device)
        counts = torch.zeros(grid_n, dtype=torch.int32, device=x.device)
    batched = B > 1
    wrap_triton(_sparse_gemv_kernel)[(grid_n, grid_k)](
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
        HAS_THRESHOLDS=thresholds is not None,
        BATCHED=batched,
        B_PAD=16 if batched else 1,
        DOT_FP32=x.dtype == torch.float32 or _interpreting(),
        SINGLE_SPLIT=single_split,
        BLOCK_K=config.block_k,
        BLOCK_N=config.block_n,
        K_ITERS=config.k_iters,
        num_warps=config.num_warps,
    )
    return y


def _sparse_gemv_impl(
    x: torch.Tensor,
    w_t: torch.Tensor,
    thresholds: Optional[torch.Tensor],
    config: Optional[GemvConfig] = None,
    persistent_workspace: Optional[bool] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """sparse_gemv without the custom-op wrapper; config/persistent_workspace/out for tests and
    benchmarks (None = what sparse_gemv would choose)."""
    _check_inputs(x, w_t, thresholds)
    squeeze = x.dim() == 1
    x2d = x.unsqueeze(0) if squeeze else x  # x2d: [B, K]
    B, K = x2d.shape
    N = w_t.shape[1]
    if B == 0 or N == 0:
        y = torch.zeros((B, N), dtype=x.dtype, device=x.device)
    elif B > MAX_KERNEL_BATCH:
        y = _masked_dense_gemv(x2d, w_t, thresholds)
    else:
        if persistent_workspace is None:
            # Real tensors in eager mode (CUDA-graph capture included): cached workspace, one
            # launch. Fake/functional tensors (torch.compile tracing): a fresh zeroed workspace.
            persistent_workspace = type(x) is torch.Tensor and not torch.compiler.is_compiling()
        if out is not None:
            out = out.view(B, N)
        y = _launch(x2d, w_t, thresholds, config or pick_config(K, N, B), persistent_workspace, out)
    return y.squeeze(0) if squeeze else y


@triton_op("actsparse::sparse_gemv", mutates_args=())
def _sparse_gemv_op(
    x: torch.Tensor, w_t: torch.Tensor, thresholds: Optional[torch.Tensor]
) -> torch.Tensor:
    return _sparse_gemv_impl(x, w_t, thresholds)


def sparse_gemv(
    x: torch.Tensor,  # [B, K] or [K], bf16/fp16/fp32
    w_t: torch.Tensor,  # [K, N], x.dtype, contiguous
    thresholds: Optional[torch.Tensor] = None,  # [K] fp32; None keeps every nonzero input
) -> torch.Tensor:  # [B, N] (or [N]) in x.dtype
    """y = (x * (|x| > thresholds)) @ w_t with fp32 accumulation, skipping unused weight rows.

    Weight row k is read iff some batch row keeps x[:, k]. B <= 8 runs the Triton kernel,
    larger batches a masked dense matmul. Runs as ``torch.ops.actsparse.sparse_gemv``.
    """
    return torch.ops.actsparse.sparse_gemv(x, w_t, thresholds)


def sparse_gemv_reference(
    x: torch.Tensor,  # [B, K] or [K]
    w_t: torch.Tensor,  # [K, N]
    thresholds: Optional[torch.Tensor] = None,  # [K] fp32 or None
) -> torch.Tensor:  # [B, N] (or [N]) in x.dtype
    """Pure-PyTorch semantics of sparse_gemv (any device): fp32 math, one rounding at the end."""
    x32 = x.float()
    thr = 0.0 if thresholds is None else thresholds.float()
    x_kept = torch.where(x32.abs() > thr, x32, torch.zeros_like(x32))
    return (x_kept @ w_t.float()).to(x.dtype)
