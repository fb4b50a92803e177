"""Input-sparse GEMV: y = (x * (|x| > thresholds)) @ w_t, reading only the weight rows it needs.

Batch-1 (and small-batch) decode is bound by memory bandwidth: every weight byte is read once per
token and used for one multiply-add. When an input element x[:, k] is zeroed by its threshold in
every batch row, weight row k (``w_t[k, :]``, contiguous in this [K, N] layout) contributes
nothing, so the kernel does not load it. Time then falls with the fraction of rows kept.

Three layers (one file stem shared with ``tests/test_sparse_gemv.py`` and
``benchmarks/bench_sparse_gemv.py``):

- ``_sparse_gemv_kernel``: the Triton kernel. Split-K: program (n, k) owns ``BLOCK_N`` output
  columns and a range of input rows that it streams in ``BLOCK_K``-row steps through a
  ``NUM_STAGES``-deep cp.async pipeline, so each SM keeps many row loads in flight; there are
  only about two programs per SM, so the fixed cost of a program (its reduction, atomics and
  counter) is paid rarely. The threshold test is fused: each step loads its slice of x, compares
  ``|x| > thr`` and issues masked row loads, so an inactive row costs no memory traffic. Partial sums meet in an fp32 workspace through atomics; the last
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
    ROWS_PER_PROGRAM: tl.constexpr,  # multiple of BLOCK_K; program (n, k) owns rows [k*R, (k+1)*R)
    HAS_THRESHOLDS: tl.constexpr,
    USE_DOT: tl.constexpr,  # False: B == 1, FMA path; True: B <= B_PAD rows through tl.dot
    B_PAD: tl.constexpr,  # rows of the dot operand (>= 16, tl.dot's minimum); 1 for the FMA path
    DOT_FP32: tl.constexpr,  # dot in fp32 ("ieee"): fp32 inputs, and the CPU interpreter
    SINGLE_SPLIT: tl.constexpr,  # one program along K: store y directly, no workspace
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the K loop (cp.async stages)
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    k_lo = pid_k * ROWS_PER_PROGRAM
    offs_b = tl.arange(0, B_PAD)
    b_mask = offs_b < B

    if USE_DOT:
        acc = tl.zeros([B_PAD, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, ROWS_PER_PROGRAM, BLOCK_K, num_stages=NUM_STAGES):
            offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)  # rows >= K (last program) are masked
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
            row_active = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_K]
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
                # 16-bit operands, fp32 accumulation: products of 16-bit values are exact
                x_kept = tl.where(keep, x_tile, tl.zeros_like(x_tile))
                acc = tl.dot(x_kept, w_tile, acc)
    else:
        # B == 1: accumulate elementwise products, reduce over K once at the end
        acc_2d = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
        for k0 in tl.range(0, ROWS_PER_PROGRAM, BLOCK_K, num_stages=NUM_STAGES):
            offs_k = k_lo + k0 + tl.arange(0, BLOCK_K)  # rows >= K (last program) are masked
            k_mask = offs_k < K
            x_vec = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)  # [BLOCK_K]
            if HAS_THRESHOLDS:
                thr = tl.load(thr_ptr + offs_k, mask=k_mask, other=0.0)
            else:
                thr = tl.zeros([BLOCK_K], dtype=tl.float32)
            keep = (tl.abs(x_vec) > thr) & k_mask
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
    """One launch's shape: BLOCK_K x BLOCK_N weight tiles streamed through a NUM_STAGES-deep
    pipeline, and about `programs_per_sm` programs per SM (this sets the split-K count)."""

    block_k: int
    block_n: int
    num_stages: int = 4
    num_warps: int = 4
    programs_per_sm: int = 2
    use_dot: Optional[bool] = None  # tl.dot for B == 1 too if True; B > 1 always uses tl.dot

    def __post_init__(self):
        for name in ("block_k", "block_n"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1):
                raise ValueError(f"GemvConfig.{name} must be a power of two >= 16, got {value}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"GemvConfig.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if self.num_stages < 1 or self.programs_per_sm < 1:
            raise ValueError("GemvConfig.num_stages and programs_per_sm must be >= 1")

    def __str__(self) -> str:
        dot = {None: "", True: "-dot", False: "-fma"}[self.use_dot]
        return (f"bk{self.block_k}-bn{self.block_n}-st{self.num_stages}-w{self.num_warps}"
                f"-p{self.programs_per_sm}{dot}")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pick_config(K: int, N: int, B: int) -> GemvConfig:
    """Tile config for a (K, N, B) problem, from the H100 sweep in docs/notes/sparse_gemv.md.

    Goals: 16-byte loads along N (BLOCK_N >= 64 when N allows); a pipeline deep enough that each
    SM keeps tens of KB of weight loads in flight even when most rows are masked; and few K
    splits (about programs_per_sm programs per SM in total), so the per-program fixed latency
    (x load, reduction, fp32 atomics, arrival counter) is paid rarely.
    """
    block_n = min(256, max(16, _next_pow2(N)))
    block_k = min(32, max(16, _next_pow2(K)))
    if B == 1:
        return GemvConfig(block_k=block_k, block_n=block_n, num_stages=4, num_warps=4, programs_per_sm=2)
    return GemvConfig(block_k=block_k, block_n=min(block_n, 128), num_stages=4, num_warps=4, programs_per_sm=2)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the CPU interpreter: any small number exercises the split-K path


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def split_k(K: int, grid_n: int, config: GemvConfig, sm_count: int) -> tuple[int, int]:
    """(programs along K, rows per program): about programs_per_sm * sm_count programs in all,
    each owning a whole number of BLOCK_K steps."""
    k_blocks = triton.cdiv(K, config.block_k)
    target = max(1, round(config.programs_per_sm * sm_count / grid_n))
    blocks_per_program = triton.cdiv(k_blocks, min(k_blocks, target))
    return triton.cdiv(k_blocks, blocks_per_program), blocks_per_program * config.block_k


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
    grid_k, rows_per_program = split_k(K, grid_n, config, _sm_count(x.device))
    single_split = grid_k == 1
    if persistent_workspace:
        acc, counts = _cached_workspace(x.device, B * N, grid_n)
    elif single_split:  # the kernel stores y directly and never touches these
        acc = torch.empty(1, dtype=torch.float32, device=x.device)
        counts = torch.empty(1, dtype=torch.int32, device=x.device)
    else:
        acc = torch.zeros(B * N, dtype=torch.float32, device=x.device)
        counts = torch.zeros(grid_n, dtype=torch.int32, device=x.device)
    use_dot = B > 1 or bool(config.use_dot)  # the FMA path handles one row only
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
        ROWS_PER_PROGRAM=rows_per_program,
        HAS_THRESHOLDS=thresholds is not None,
        USE_DOT=use_dot,
        B_PAD=16 if use_dot else 1,
        DOT_FP32=x.dtype == torch.float32 or _interpreting(),
        SINGLE_SPLIT=single_split,
        BLOCK_K=config.block_k,
        BLOCK_N=config.block_n,
        NUM_STAGES=config.num_stages,
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
