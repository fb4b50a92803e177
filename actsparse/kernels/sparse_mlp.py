"""Output-sparse gated MLP (gate/up): compute the gate, then read only the up rows that survive.

Decode at batch 1-8 is bound by weight bytes, not arithmetic. In a gated MLP
``h = act(x @ W_gate.T) * (x @ W_up.T)`` most neurons of a ReLU/ProSparse model (and, after a
magnitude threshold, of a SwiGLU model: CATS) have ``act(gate) ~ 0``. Their up row contributes
nothing, so it need not be read, and their ``h`` is 0, so the down projection can skip their
row of ``W_down.T`` too (``sparse_gemv(h, w_down_t, None)``, ProSparse's "step 3").

``sparse_gate_up`` is ProSparse's "step 2" in one launch. Each program owns ``BLOCK_F``
neurons (rows of W_gate and W_up, contiguous in HF layout [F, K]):

1. gate rows: read in full, or, when a predictor ``row_mask`` is given (DejaVu/PowerInfer),
   only the predicted rows: the others are neither read nor computed;
2. ``a = act(gate)`` in fp32, and the threshold test ``|a| > gate_threshold[f]`` (strict, so
   threshold 0 with ReLU is plain ReLU and threshold T > 0 is FATReLU);
3. up rows: read only for neurons that some batch row keeps;
4. ``h[b, f] = a[b, f] * up[b, f]`` where batch row b keeps neuron f, else 0.

The threshold test is per element: each sequence of a batch gets what it would get alone
(up to fp32 summation order: batch 1 uses FMAs, batch >= 2 tensor-core dots); a weight row is
read once if any batch row needs it, as in ``sparse_gemv``. Skipping whole rows keeps reads
contiguous (one neuron = K * 2 contiguous bytes). With a row_mask, ``up_with_gate=True`` reads the
up rows of predicted neurons together with their gate rows (PowerInfer's way; same h).

H100 (docs/RESULTS.md): LLaMA-2-7B/13B MLP at 89% sparsity with a predictor mask, step 2 runs
6.5x / 6.0x faster than dense cuBLAS; without a predictor it reaches the 1.8x byte bound.

Three layers: ``_sparse_gate_up_kernel`` (Triton) -> ``sparse_gate_up`` (checks, custom op
``torch.ops.actsparse.sparse_gate_up``) -> ``SparseGatedMLP`` (nn.Module, backend switch).
``sparse_gate_up_reference`` is the pure-PyTorch definition (fp32 arithmetic, runs on CPU).

Kept list (step 2 -> step 3 without a rescan of h): ``sparse_gate_up(..., kept=kept_list(...))``
also appends its kept neurons (index and h value) to a :class:`KeptList`, and
``sparse_down_kept_(out, kept, w_down_t)`` (``_sparse_down_kept_kernel``, custom op
``torch.ops.actsparse.sparse_down_kept_``; reference ``sparse_down_kept_reference``) adds
``h @ w_down_t`` into an fp32 ``out`` reading only the listed rows, split evenly by the list
length, and zeroes the list's count for the next step 2. H100: step 3 at 89% on LLaMA-2-7B
4.05x dense (3.8x when it rescans h), with the whole MLP as fast as before (docs/RESULTS.md).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn

try:  # Triton is optional: the reference path runs without it.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is missing
    HAS_TRITON = False

ACTIVATIONS = ("silu", "gelu_tanh", "relu")
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MAX_BATCH = 8


# ----------------------------------------------------------------------------------------------
# Reference (pure PyTorch): the definition the kernel is tested against.
# ----------------------------------------------------------------------------------------------
def _activation_torch(gate: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "silu":
        return torch.nn.functional.silu(gate)
    if activation == "gelu_tanh":
        return torch.nn.functional.gelu(gate, approximate="tanh")
    if activation == "relu":
        return torch.relu(gate)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def sparse_gate_up_reference(
    x: torch.Tensor,  # [B, K] or [K]
    w_gate: torch.Tensor,  # [F, K]
    w_up: torch.Tensor,  # [F, K]
    gate_threshold: Union[torch.Tensor, float],  # [F] fp32 or a float
    activation: str,
    row_mask: Optional[torch.Tensor] = None,  # [F] bool
) -> torch.Tensor:  # h: [B, F] (or [F]) in x.dtype
    """h = a * up with a = act(x @ w_gate.T), zeroed where |a| <= gate_threshold or not row_mask.

    Arithmetic in fp32 (as the kernel accumulates), one rounding to x.dtype at the end.
    """
    squeeze = x.dim() == 1
    x2 = x.reshape(1, -1) if squeeze else x
    xf = x2.float()
    gate = xf @ w_gate.float().T  # [B, F]
    a = _activation_torch(gate, activation)
    thr = torch.as_tensor(gate_threshold, dtype=torch.float32, device=x.device)
    keep = a.abs() > thr  # [B, F] (thr broadcasts from [F] or scalar)
    if row_mask is not None:
        keep = keep & row_mask.to(device=x.device, dtype=torch.bool)
    up = xf @ w_up.float().T  # [B, F]
    h = torch.where(keep, a * up, torch.zeros((), dtype=torch.float32, device=x.device))
    h = h.to(x.dtype)
    return h.reshape(-1) if squeeze else h


# ----------------------------------------------------------------------------------------------
# Kernel
# ----------------------------------------------------------------------------------------------
if HAS_TRITON:

    @triton.jit
    def _activation(g, ACTIVATION: tl.constexpr):
        # g: fp32. 0 = silu, 1 = gelu_tanh, 2 = relu (threshold > 0 makes it FATReLU).
        if ACTIVATION == 0:
            return g * tl.sigmoid(g)
        elif ACTIVATION == 1:
            u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            # tanh(u) = 1 - 2 / (exp(2u) + 1): exp overflow gives +1, underflow -1, no NaN.
            return 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * u) + 1.0))
        else:
            return tl.maximum(g, 0.0)

    @triton.jit
    def _rows_times_x(
        w_ptr,  # [F, K], rows of this program at row_offsets
        w2_ptr,  # [F, K], read with the same mask when TWO (gate and up together), else unused
        x_ptr,  # [B, K]
        row_offsets,  # [BLOCK_F] int64: f * K
        rows_needed,  # [BLOCK_F] bool: rows to read (others read nothing, give 0)
        offs_b,  # [BLOCK_B]
        B,
        K: tl.constexpr,
        stride_xb,
        BLOCK_B: tl.constexpr,
        BLOCK_F: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        USE_DOT: tl.constexpr,  # batch >= 2: x padded to BLOCK_B = 16 rows, tensor-core dot
        DOT_FP32: tl.constexpr,  # dot on fp32 operands (fp32 inputs; the CPU interpreter)
        TWO: tl.constexpr,
    ):
        # returns (acc, acc2): [BLOCK_B, BLOCK_F] fp32 = x @ w[rows].T (and x @ w2[rows].T)
        acc = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.float32)
        acc2 = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.float32)
        offs_k = tl.arange(0, BLOCK_K)
        b_in = offs_b < B
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k  # [BLOCK_K]
            if EVEN_K:
                w_mask = rows_needed[:, None]
                k_in = offs_k < BLOCK_K  # all true, folded away
            else:
                k_in = k < K
                w_mask = rows_needed[:, None] & k_in[None, :]
            w_offs = row_offsets[:, None] + k[None, :]  # [BLOCK_F, BLOCK_K]
            # masked-off rows issue no memory traffic
            w = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0)
            if TWO:
                w2 = tl.load(w2_ptr + w_offs, mask=w_mask, other=0.0)
            if USE_DOT:
                # xk: [BLOCK_B, BLOCK_K], padded rows are 0
                xk = tl.load(x_ptr + offs_b[:, None] * stride_xb + k[None, :],
                             mask=b_in[:, None] & k_in[None, :], other=0.0)
                if DOT_FP32:
                    acc = tl.dot(xk.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
                    if TWO:
                        acc2 = tl.dot(xk.to(tl.float32), tl.trans(w2.to(tl.float32)), acc2, input_precision="ieee")
                else:
                    # 16-bit operands, fp32 accumulation (products of 16-bit values are exact)
                    acc = tl.dot(xk, tl.trans(w), acc)
                    if TWO:
                        acc2 = tl.dot(xk, tl.trans(w2), acc2)
            else:
                # batch 1 (BLOCK_B == 1): FMA and one reduction per step.
                # Upcast before arithmetic (also required by the interpreter for bf16).
                xb = tl.load(x_ptr + k, mask=k_in, other=0.0).to(tl.float32)  # [BLOCK_K]
                acc += tl.sum(w.to(tl.float32) * xb[None, :], axis=1)[None, :]
                if TWO:
                    acc2 += tl.sum(w2.to(tl.float32) * xb[None, :], axis=1)[None, :]
        return acc, acc2

    @triton.jit
    def _sparse_gate_up_kernel(
        x_ptr,  # x: [B, K], unit stride along K
        w_gate_ptr,  # w_gate: [F, K] contiguous
        w_up_ptr,  # w_up: [F, K] contiguous
        threshold_ptr,  # gate_threshold: [F] fp32
        row_mask_ptr,  # row_mask: [F] uint8 (read only if HAS_ROW_MASK)
        h_ptr,  # h: [B, F], unit stride along F
        kept_idx_ptr,  # kept list (WRITE_KEPT): [F] int32 neuron indices, in slot order
        kept_h_ptr,  # kept list: [B, F] values of h, in slot order (row stride F)
        kept_count_ptr,  # kept list: [2] int32: [listed neurons, step-3 arrivals]
        B,
        F,
        stride_xb,
        stride_hb,
        K: tl.constexpr,  # specialised: a model has few distinct K, and static trip counts help
        ACTIVATION: tl.constexpr,
        HAS_ROW_MASK: tl.constexpr,
        UP_WITH_GATE: tl.constexpr,  # read up rows of predicted neurons with the gate rows
        BLOCK_B: tl.constexpr,
        BLOCK_F: tl.constexpr,
        BLOCK_K: tl.constexpr,
        EVEN_K: tl.constexpr,
        USE_DOT: tl.constexpr,
        DOT_FP32: tl.constexpr,
        WRITE_KEPT: tl.constexpr,  # also append the kept neurons to the kept list (sparse_down_kept_)
    ):
        pid = tl.program_id(0)
        offs_f = pid * BLOCK_F + tl.arange(0, BLOCK_F)  # [BLOCK_F]
        offs_b = tl.arange(0, BLOCK_B)  # [BLOCK_B]
        f_in = offs_f < F
        b_in = offs_b < B
        if HAS_ROW_MASK:
            predicted = (tl.load(row_mask_ptr + offs_f, mask=f_in, other=0) != 0) & f_in
        else:
            predicted = f_in
        row_offsets = offs_f.to(tl.int64) * K  # [BLOCK_F]
        thr = tl.load(threshold_ptr + offs_f, mask=f_in, other=0.0)  # [BLOCK_F]

        # 1. gate for the predicted rows (a block with none predicted reads nothing at all)
        gate = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.float32)
        up = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.float32)
        if tl.max(predicted.to(tl.int32), axis=0) > 0:
            gate, up = _rows_times_x(
                w_gate_ptr, w_up_ptr, x_ptr, row_offsets, predicted, offs_b, B, K, stride_xb,
                BLOCK_B, BLOCK_F, BLOCK_K, EVEN_K, USE_DOT, DOT_FP32, UP_WITH_GATE,
            )
        # 2. activation and per-element threshold test
        a = _activation(gate, ACTIVATION)  # [BLOCK_B, BLOCK_F]
        keep = (tl.abs(a) > thr[None, :]) & predicted[None, :] & b_in[:, None]
        row_active = tl.max(keep.to(tl.int32), axis=0) > 0  # [BLOCK_F]: some batch row keeps f

        # 3. up only for active rows (one dependent memory round trip less when UP_WITH_GATE)
        if not UP_WITH_GATE:
            if tl.max(row_active.to(tl.int32), axis=0) > 0:
                up, _unused = _rows_times_x(
                    w_up_ptr, w_up_ptr, x_ptr, row_offsets, row_active, offs_b, B, K, stride_xb,
                    BLOCK_B, BLOCK_F, BLOCK_K, EVEN_K, USE_DOT, DOT_FP32, False,
                )
        # 4. h = a * up where kept, 0 elsewhere (every element of [B, F] is written)
        h = tl.where(keep, a * up, 0.0).to(h_ptr.dtype.element_ty)
        h_ptrs = h_ptr + offs_b[:, None] * stride_hb + offs_f[None, :]
        tl.store(h_ptrs, h, mask=b_in[:, None] & f_in[None, :])
        # 5. kept list: reserve slots with one atomic per program, write the neurons' indices and h
        if WRITE_KEPT:
            active_i = row_active.to(tl.int32)
            n_active = tl.sum(active_i, axis=0)
            if n_active > 0:
                base = tl.atomic_add(kept_count_ptr, n_active, sem="relaxed")
                slot = base + tl.cumsum(active_i, axis=0) - 1  # [BLOCK_F]
                in_list = row_active & (slot < F)  # a list not consumed by step 3 fills up: never past F
                tl.store(kept_idx_ptr + slot, offs_f, mask=in_list)
                tl.store(kept_h_ptr + offs_b[:, None] * F + slot[None, :], h, mask=b_in[:, None] & in_list[None, :])


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GateUpConfig:
    """Tile of one program: BLOCK_F neurons x BLOCK_K inputs per step, num_warps warps."""

    block_f: int
    block_k: int
    num_warps: int

    def __post_init__(self):
        for name in ("block_f", "block_k"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"{name} must be a power of two, got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def default_config(batch: int, k: int, f: int) -> GateUpConfig:
    """Tile from the H100 sweep in benchmarks/bench_sparse_mlp.py (docs/notes/sparse_mlp.md).

    Batch 1: one neuron per program and its whole K-long row in one step (up to 4096), so a
    skipped neuron costs one mask byte and an active one two contiguous row reads (gate, then
    up) with all 16-byte loads in flight at once (within 3% of the best swept tile on every
    benchmarked shape). Batch >= 2: 64 neurons x 128 inputs per step, 8 warps, the batch padded
    to 16 rows for tl.dot (best of the swept tiles at B = 2, 4, 8 on the Llama-3-8B shape).
    """
    if batch == 1:
        return GateUpConfig(block_f=1, block_k=max(16, min(_next_pow2(k), 4096)), num_warps=4)
    return GateUpConfig(block_f=64, block_k=max(16, min(_next_pow2(k), 128)), num_warps=8)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _launch_sparse_gate_up(
    x: torch.Tensor,  # [B, K]
    w_gate: torch.Tensor,  # [F, K]
    w_up: torch.Tensor,  # [F, K]
    gate_threshold: torch.Tensor,  # [F] fp32
    activation: str,
    row_mask: Optional[torch.Tensor],  # [F] bool or uint8
    h: torch.Tensor,  # [B, F] output
    config: Optional[GateUpConfig] = None,
    up_with_gate: bool = False,
    kernel_runner=None,
    kept: Optional["KeptList"] = None,
) -> None:
    """Launch on checked inputs (no checks here: the benchmark sweeps configs through this)."""
    batch, k = x.shape
    f = w_gate.shape[0]
    cfg = config or default_config(batch, k, f)
    use_dot = batch > 1
    if use_dot and (cfg.block_f < 16 or cfg.block_k < 16):
        raise ValueError(f"batch {batch} uses tl.dot: block_f and block_k must be >= 16, got {cfg}")
    mask_arg = row_mask.view(torch.uint8) if row_mask is not None else gate_threshold
    kernel = _sparse_gate_up_kernel if kernel_runner is None else kernel_runner(_sparse_gate_up_kernel)
    grid = (triton.cdiv(f, cfg.block_f),)
    kept_args = (kept.idx, kept.h, kept.count) if kept is not None else (h, h, h)
    kernel[grid](
        x, w_gate, w_up, gate_threshold, mask_arg, h, *kept_args,
        batch, f, x.stride(0), h.stride(0),
        K=k,
        ACTIVATION=ACTIVATIONS.index(activation),
        HAS_ROW_MASK=row_mask is not None,
        UP_WITH_GATE=bool(up_with_gate and row_mask is not None),
        BLOCK_B=16 if use_dot else 1,
        BLOCK_F=cfg.block_f,
        BLOCK_K=cfg.block_k,
        EVEN_K=k % cfg.block_k == 0,
        USE_DOT=use_dot,
        DOT_FP32=x.dtype == torch.float32 or _interpreting(),
        WRITE_KEPT=kept is not None,
        num_warps=cfg.num_warps,
    )


def _check_inputs(x, w_gate, w_up, gate_threshold, activation, row_mask) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() not in (1, 2):
        raise ValueError(f"x must be a [B, K] or [K] tensor, got shape {getattr(x, 'shape', None)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x dtype must be bf16, fp16 or fp32, got {x.dtype}")
    batch = 1 if x.dim() == 1 else x.shape[0]
    if not 1 <= batch <= MAX_BATCH:
        raise ValueError(f"batch must be 1..{MAX_BATCH} (decode kernel), got {batch}")
    k = x.shape[-1]
    if x.stride(-1) != 1:
        raise ValueError("x must have unit stride along K")
    for name, w in (("w_gate", w_gate), ("w_up", w_up)):
        if w.dim() != 2 or w.shape[1] != k:
            raise ValueError(f"{name} must be [F, K={k}], got {tuple(w.shape)}")
        if w.dtype != x.dtype:
            raise TypeError(f"{name} dtype {w.dtype} differs from x dtype {x.dtype}")
        if not w.is_contiguous():
            raise ValueError(f"{name} must be contiguous (a row per neuron)")
        if w.device != x.device:
            raise ValueError(f"{name} is on {w.device}, x on {x.device}")
    f = w_gate.shape[0]
    if w_up.shape[0] != f:
        raise ValueError(f"w_gate has {f} rows, w_up {w_up.shape[0]}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(gate_threshold, torch.Tensor):
        if gate_threshold.shape != (f,) or gate_threshold.dtype != torch.float32:
            raise ValueError(
                f"gate_threshold must be a fp32 tensor [F={f}], got {gate_threshold.dtype} "
                f"{tuple(gate_threshold.shape)}"
            )
        if gate_threshold.device != x.device:
            raise ValueError(f"gate_threshold is on {gate_threshold.device}, x on {x.device}")
    elif not isinstance(gate_threshold, (int, float)) or gate_threshold != gate_threshold:
        raise ValueError(f"gate_threshold must be a [F] fp32 tensor or a number, got {gate_threshold!r}")
    if row_mask is not None:
        if row_mask.shape != (f,) or row_mask.dtype != torch.bool:
            raise ValueError(f"row_mask must be a bool tensor [F={f}], got {row_mask.dtype} {tuple(row_mask.shape)}")
        if row_mask.device != x.device:
            raise ValueError(f"row_mask is on {row_mask.device}, x on {x.device}")
    if x.device.type != "cuda" and not _interpreting():
        raise ValueError(
            f"tensors on {x.device}: the Triton kernel needs CUDA (or TRITON_INTERPRET=1); "
            "use sparse_gate_up_reference (the 'torch' backend) on the CPU"
        )


if HAS_TRITON:
    from .sparse_gemv import _launcher  # wrap_triton, or a direct launch for the interpreter where needed

    @torch.library.triton_op("actsparse::sparse_gate_up", mutates_args=())
    def _sparse_gate_up_op(
        x: torch.Tensor,  # [B, K]
        w_gate: torch.Tensor,  # [F, K]
        w_up: torch.Tensor,  # [F, K]
        gate_threshold: torch.Tensor,  # [F] fp32
        activation: str,
        row_mask: Optional[torch.Tensor] = None,  # [F] bool
        up_with_gate: bool = False,
    ) -> torch.Tensor:  # h: [B, F]
        h = torch.empty((x.shape[0], w_gate.shape[0]), dtype=x.dtype, device=x.device)
        _launch_sparse_gate_up(
            x, w_gate, w_up, gate_threshold, activation, row_mask, h,
            up_with_gate=up_with_gate, kernel_runner=_launcher,
        )
        return h


def sparse_gate_up(
    x: torch.Tensor,  # [B, K] or [K], bf16/fp16 (fp32 accepted)
    w_gate: torch.Tensor,  # [F, K] contiguous, x.dtype
    w_up: torch.Tensor,  # [F, K] contiguous, x.dtype
    gate_threshold: Union[torch.Tensor, float],  # [F] fp32 or a number
    activation: str,  # "silu" | "gelu_tanh" | "relu"
    row_mask: Optional[torch.Tensor] = None,  # [F] bool: predicted active neurons
    *,
    up_with_gate: bool = False,
    kept: Optional["KeptList"] = None,
) -> torch.Tensor:  # h: [B, F] (or [F]) in x.dtype
    """Gate-aware output-sparse gate/up in one Triton launch (see module docstring).

    Bytes read: gate rows (all, or the predicted ones) + up rows of neurons some batch row keeps.
    Feed the result to ``sparse_gemv(h, w_down_t, None)`` for the down projection.

    ``up_with_gate=True`` (only with a row_mask; PowerInfer's way): read the up rows of the
    predicted neurons together with their gate rows instead of after the threshold test. Same h,
    one dependent memory round trip less per neuron, but up rows of neurons the predictor
    over-predicted (predicted, then below threshold) are read too.

    ``kept`` (a :class:`KeptList` from :func:`kept_list`): the kept neurons are also appended to
    it, for ``sparse_down_kept_`` (step 3 without a rescan of h).
    """
    if not HAS_TRITON:
        raise RuntimeError("sparse_gate_up needs triton; use sparse_gate_up_reference")
    _check_inputs(x, w_gate, w_up, gate_threshold, activation, row_mask)
    squeeze = x.dim() == 1
    x2 = x.reshape(1, -1) if squeeze else x
    if not isinstance(gate_threshold, torch.Tensor):
        gate_threshold = torch.full((w_gate.shape[0],), float(gate_threshold), dtype=torch.float32, device=x.device)
    if kept is None:
        h = torch.ops.actsparse.sparse_gate_up(
            x2, w_gate, w_up, gate_threshold.contiguous(), activation, row_mask, up_with_gate
        )
    else:
        if kept.batch != x2.shape[0] or kept.idx.shape != (w_gate.shape[0],) or kept.h.dtype != x.dtype \
                or kept.h.device != x.device:
            raise ValueError(f"kept list ({kept.batch} x {tuple(kept.idx.shape)}, {kept.h.dtype}, {kept.h.device}) "
                             f"does not fit x {tuple(x2.shape)} {x.dtype} and F={w_gate.shape[0]}")
        h = torch.ops.actsparse.sparse_gate_up_kept(
            x2, w_gate, w_up, gate_threshold.contiguous(), activation, kept.idx, kept.h, kept.count,
            row_mask, up_with_gate
        )
    return h.reshape(-1) if squeeze else h


# ----------------------------------------------------------------------------------------------
# Kept list: step 2 hands step 3 the rows it needs (ProSparse steps 2 -> 3 without a rescan of h)
# ----------------------------------------------------------------------------------------------
@dataclass
class KeptList:
    """Buffers in which ``sparse_gate_up(..., kept=)`` lists the neurons it kept, for
    ``sparse_down_kept_``. Make one with :func:`kept_list` per call site (e.g. per layer).

    ``idx`` [F] int32: kept neuron indices in slot order (the order of arrival, which varies);
    ``h`` [B, F]: their values of h, same slots; ``count`` [2] int32: (neurons listed, arrivals of
    the step-3 programs). Step 2 appends; step 3 reads the list and, once all of its programs have
    read the length, zeroes ``count``, so the buffers are ready for the next step 2 without a
    memset. Call step 3 exactly once after each step 2 that wrote the list.
    """

    idx: torch.Tensor
    h: torch.Tensor
    count: torch.Tensor

    @property
    def batch(self) -> int:
        return self.h.shape[0]


def kept_list(batch: int, f: int, dtype: torch.dtype, device) -> KeptList:
    """Empty kept-list buffers for ``batch`` rows of an MLP with ``f`` neurons."""
    return KeptList(idx=torch.zeros(f, dtype=torch.int32, device=device),
                    h=torch.zeros(batch, f, dtype=dtype, device=device),
                    count=torch.zeros(2, dtype=torch.int32, device=device))


def sparse_down_kept_reference(out: torch.Tensor, kept: KeptList, w_down_t: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch semantics of ``sparse_down_kept_``: out += h[:, :n] @ w_down_t[idx[:n]] in fp32,
    n = count[0]; then count is zeroed."""
    n = int(kept.count[0])
    rows = kept.idx[:n].long()
    out.view(kept.batch, -1).add_(kept.h[:, :n].float() @ w_down_t[rows].float())
    kept.count.zero_()
    return out


if HAS_TRITON:
    from .sparse_gemv import _mask_and, _pdl_prologue, _pdl_supported, _sm_count

    @triton.jit
    def _kept_tile(t, hi, acc, kept_idx_ptr, kept_h_ptr, w_ptr, N, F, offs_j, offs_n, n_mask, offs_b, b_mask,
                   USE_DOT: tl.constexpr, DOT_FP32: tl.constexpr):
        j = t + offs_j  # list slots of this tile
        j_in = j < hi
        rows = tl.load(kept_idx_ptr + j, mask=j_in, other=0)
        w = tl.load(w_ptr + rows.to(tl.int64)[:, None] * N + offs_n[None, :],
                    mask=j_in[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_K, BLOCK_N]
        if USE_DOT:
            hv = tl.load(kept_h_ptr + offs_b[:, None] * F + j[None, :], mask=b_mask[:, None] & j_in[None, :],
                         other=0.0)  # [B_PAD, BLOCK_K]
            if DOT_FP32:
                acc = tl.dot(hv.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(hv, w, acc)
        else:
            hv = tl.load(kept_h_ptr + j, mask=j_in, other=0.0).to(tl.float32)  # [BLOCK_K]
            acc += hv[:, None] * w.to(tl.float32)
        return acc

    @triton.jit
    def _sparse_down_kept_kernel(
        kept_idx_ptr,  # [F] int32
        kept_h_ptr,  # [B, F], row stride F
        kept_count_ptr,  # [2] int32
        w_ptr,  # w_down_t: [F, N] contiguous
        y_ptr,  # out: [B, N] fp32, accumulated into
        B,
        N,
        F,
        BLOCK_K: tl.constexpr,
        BLOCK_N: tl.constexpr,
        B_PAD: tl.constexpr,
        USE_DOT: tl.constexpr,
        DOT_FP32: tl.constexpr,
        STATIC_LOOP: tl.constexpr,  # the CPU interpreter: loop bounds must not be tensors
        F_STATIC: tl.constexpr,  # with STATIC_LOOP: F (an upper bound on the slots per program); else 0
        MIN_ROWS: tl.constexpr,  # fewest list slots per program (0: use every program)
        RESET: tl.constexpr,  # zero the count once every program has read it (False: keep the list; benchmarks)
        USE_PDL: tl.constexpr,
    ):
        """Program (n, k) takes slots [k * per, (k + 1) * per) of the kept list (per = ceil(listed /
        programs along k), so the work is balanced whatever the sparsity pattern) for column tile n,
        and adds its partial product into y with fp32 atomics. Chain: length -> indices -> weight rows."""
        _pdl_prologue(USE_PDL)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        splits = tl.num_programs(1)
        listed = tl.load(kept_count_ptr)
        total = tl.minimum(listed, F)
        # Arrival ticket, taken right after reading the length; its value is needed only at the end.
        # Relaxed, so the weight loads below do not wait for it (an acquire would make them wait for
        # the ticket, which ~500 programs contend for). The ticket's operand depends on the loaded
        # length, so the ticket cannot be taken before the length has been read: when the last
        # ticket is taken, every program has read the length, and zeroing it is safe.
        tick = tl.where(listed >= 0, 1, 0)
        arrived = tl.atomic_add(kept_count_ptr + 1, tick, sem="relaxed")
        # Programs used along k: enough that each gets at least MIN_ROWS list slots (a program's
        # fixed chain is amortised over more rows when the list is short), at most all of them.
        used = splits
        if MIN_ROWS > 0:
            used = tl.minimum(splits, tl.maximum((total + MIN_ROWS - 1) // MIN_ROWS, 1))
        per = (total + used - 1) // used
        lo = pid_k * per
        hi = tl.minimum(lo + per, total)
        offs_j = tl.arange(0, BLOCK_K)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        offs_b = tl.arange(0, B_PAD)
        b_mask = offs_b < B
        if USE_DOT:
            acc = tl.zeros([B_PAD, BLOCK_N], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)  # per-row partials, summed at the end
        if STATIC_LOOP:
            for t0 in range(0, F_STATIC, BLOCK_K):
                acc = _kept_tile(lo + t0, hi, acc, kept_idx_ptr, kept_h_ptr, w_ptr, N, F, offs_j, offs_n,
                                 n_mask, offs_b, b_mask, USE_DOT, DOT_FP32)
        else:
            for t in range(lo, hi, BLOCK_K):
                acc = _kept_tile(t, hi, acc, kept_idx_ptr, kept_h_ptr, w_ptr, N, F, offs_j, offs_n,
                                 n_mask, offs_b, b_mask, USE_DOT, DOT_FP32)
        if USE_DOT:
            out = acc
        else:
            out = tl.sum(acc, axis=0)[None, :]  # [1, BLOCK_N]
        out_offs = offs_b[:, None] * N + offs_n[None, :]
        tl.atomic_add(y_ptr + out_offs, out, mask=_mask_and(b_mask[:, None] & n_mask[None, :], pid_k < used),
                      sem="relaxed")  # programs left unused add nothing
        if arrived == tl.num_programs(0) * splits - 1:  # every program has read the length
            # RESET=False (benchmarks time step 3 alone on one list): the same work, but the length
            # is written back instead of zeroed, so the next call reads the same list.
            tl.atomic_xchg(kept_count_ptr, 0 if RESET else listed, sem="relaxed")
            tl.atomic_xchg(kept_count_ptr + 1, 0, sem="relaxed")


@dataclass(frozen=True)
class KeptDownConfig:
    """Step 3 on a kept list: BLOCK_K list slots x BLOCK_N outputs per tile, about
    ``programs_per_sm`` programs per SM in all (of which a short list uses fewer, ``min_rows``).
    (Two tiles in flight per step were measured and dropped: slowest config, docs/RESULTS.md.)"""

    block_k: int = 64
    block_n: int = 128
    num_warps: int = 4
    programs_per_sm: int = 4
    pdl: bool = False
    # programs along k used: at most cdiv(list length, min_rows); 0 = all. 96: best geometric mean
    # over LLaMA-2-7B/13B down at 67%/89% among the H100 sweep's configs that reach 4x at 89%
    # (bench_sparse_mlp.py --kept, 776846c; docs/RESULTS.md)
    min_rows: int = 96

    def __post_init__(self):
        for name in ("block_k", "block_n"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"KeptDownConfig.{name} must be a power of two >= 16, got {v}")
        if self.min_rows < 0:
            raise ValueError(f"KeptDownConfig.min_rows must be >= 0, got {self.min_rows}")
        if self.num_warps not in (1, 2, 4, 8, 16) or self.programs_per_sm < 1:
            raise ValueError("KeptDownConfig: num_warps in 1..16 (power of two), programs_per_sm >= 1")

    def __str__(self) -> str:
        return (f"k-bk{self.block_k}-bn{self.block_n}-w{self.num_warps}-p{self.programs_per_sm}"
                f"{'-pdl' if self.pdl else ''}"
                f"{f'-min{self.min_rows}' if self.min_rows else ''}")


def _check_kept(out: torch.Tensor, kept: KeptList, w_down_t: torch.Tensor) -> None:
    f, n = w_down_t.shape
    if kept.idx.shape != (f,) or kept.idx.dtype != torch.int32 or kept.count.shape != (2,) \
            or kept.count.dtype != torch.int32 or kept.h.dim() != 2 or kept.h.shape[1] != f:
        raise ValueError(f"kept list does not fit w_down_t [F={f}, N={n}]: idx {tuple(kept.idx.shape)}, "
                         f"h {tuple(kept.h.shape)}, count {tuple(kept.count.shape)}")
    if not 1 <= kept.batch <= MAX_BATCH:
        raise ValueError(f"kept list batch must be 1..{MAX_BATCH}, got {kept.batch}")
    if kept.h.dtype != w_down_t.dtype:
        raise TypeError(f"kept list dtype {kept.h.dtype} differs from w_down_t {w_down_t.dtype}")
    if not w_down_t.is_contiguous():
        raise ValueError("w_down_t must be contiguous ([F, N]: a row per neuron)")
    if out.dtype != torch.float32 or not out.is_contiguous() or out.numel() != kept.batch * n:
        raise ValueError(f"out must be a contiguous fp32 tensor of {kept.batch} x {n}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    devices = {t.device for t in (out, kept.idx, kept.h, kept.count, w_down_t)}
    if len(devices) != 1:
        raise ValueError(f"tensors on several devices: {devices}")
    if out.device.type != "cuda" and not _interpreting():
        raise ValueError("the Triton kernel needs CUDA (or TRITON_INTERPRET=1); use sparse_down_kept_reference")


def _launch_sparse_down_kept(out, kept: KeptList, w_down_t, config: Optional[KeptDownConfig] = None,
                             reset: bool = True, kernel_runner=None) -> None:
    cfg = config or KeptDownConfig()
    f, n = w_down_t.shape
    batch = kept.batch
    use_dot = batch > 1
    grid_n = triton.cdiv(n, cfg.block_n)
    splits = max(1, min(triton.cdiv(f, cfg.block_k), cfg.programs_per_sm * _sm_count(out.device) // grid_n))
    kernel = _sparse_down_kept_kernel if kernel_runner is None else kernel_runner(_sparse_down_kept_kernel)
    extra = {}
    use_pdl = cfg.pdl and _pdl_supported(out.device, probe=out)
    if use_pdl:
        extra["launch_pdl"] = True
    kernel[(grid_n, splits)](
        kept.idx, kept.h, kept.count, w_down_t, out, batch, n, f,
        BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, B_PAD=16 if use_dot else 1, USE_DOT=use_dot,
        DOT_FP32=w_down_t.dtype == torch.float32 or _interpreting(),
        STATIC_LOOP=_interpreting(), F_STATIC=f if _interpreting() else 0, MIN_ROWS=cfg.min_rows, RESET=reset, USE_PDL=use_pdl, num_warps=cfg.num_warps, **extra,
    )


if HAS_TRITON:

    @torch.library.triton_op("actsparse::sparse_gate_up_kept", mutates_args=("kept_idx", "kept_h", "kept_count"))
    def _sparse_gate_up_kept_op(
        x: torch.Tensor, w_gate: torch.Tensor, w_up: torch.Tensor, gate_threshold: torch.Tensor, activation: str,
        kept_idx: torch.Tensor, kept_h: torch.Tensor, kept_count: torch.Tensor,
        row_mask: Optional[torch.Tensor] = None, up_with_gate: bool = False,
    ) -> torch.Tensor:
        h = torch.empty((x.shape[0], w_gate.shape[0]), dtype=x.dtype, device=x.device)
        _launch_sparse_gate_up(x, w_gate, w_up, gate_threshold, activation, row_mask, h, up_with_gate=up_with_gate,
                               kernel_runner=_launcher, kept=KeptList(kept_idx, kept_h, kept_count))
        return h

    @torch.library.triton_op("actsparse::sparse_down_kept_", mutates_args=("out", "kept_count"))
    def _sparse_down_kept_op(out: torch.Tensor, kept_idx: torch.Tensor, kept_h: torch.Tensor,
                             kept_count: torch.Tensor, w_down_t: torch.Tensor) -> None:
        _launch_sparse_down_kept(out, KeptList(kept_idx, kept_h, kept_count), w_down_t, kernel_runner=_launcher)


def sparse_down_kept_(out: torch.Tensor, kept: KeptList, w_down_t: torch.Tensor) -> torch.Tensor:
    """ProSparse step 3 on step 2's kept list: ``out += h @ w_down_t`` in fp32, reading only the
    rows of w_down_t (``[F, N]``) of the neurons that ``sparse_gate_up(..., kept=kept)`` listed.

    Unlike ``sparse_gemv_add_(out, h, w_down_t)`` it does not scan h for its nonzeros: the list
    gives the rows, and its length splits them evenly over the programs. The list is consumed (its
    count zeroed) by this call. Returns out. Summation order varies from run to run."""
    if not HAS_TRITON:
        raise RuntimeError("sparse_down_kept_ needs triton; use sparse_down_kept_reference")
    _check_kept(out, kept, w_down_t)
    torch.ops.actsparse.sparse_down_kept_(out, kept.idx, kept.h, kept.count, w_down_t)
    return out


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------
def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    if backend == "auto":
        return "triton" if (HAS_TRITON and device.type == "cuda") else "torch"
    return backend


class SparseGatedMLP(nn.Module):
    """Gated MLP down(act(gate(x)) * up(x)) with gate-aware output sparsity (CATS / ProSparse).

    Weights in HF layout: ``w_gate``, ``w_up`` [F, D]; the down projection is stored transposed,
    ``w_down_t`` [F, D], so a zero neuron of h skips one contiguous row (``sparse_gemv``).
    ``gate_threshold`` [F] fp32 is a buffer (travels with state_dict): a neuron is kept iff
    |act(gate)| > gate_threshold. An optional ``row_mask`` [F] bool (a predictor's output) can be
    passed to ``forward``. Decode shapes only on the triton backend (1..8 rows).
    """

    def __init__(
        self,
        w_gate: torch.Tensor,  # [F, D]
        w_up: torch.Tensor,  # [F, D]
        w_down: torch.Tensor,  # [D, F] (HF layout; stored transposed)
        gate_threshold: Union[torch.Tensor, float] = 0.0,
        activation: str = "silu",
        backend: str = "auto",
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        f, d = w_gate.shape
        if w_up.shape != (f, d) or w_down.shape != (d, f):
            raise ValueError(
                f"expected w_gate, w_up [F, D] and w_down [D, F]; got {tuple(w_gate.shape)}, "
                f"{tuple(w_up.shape)}, {tuple(w_down.shape)}"
            )
        self.activation = activation
        self.backend = backend
        self.w_gate = nn.Parameter(w_gate.detach().contiguous(), requires_grad=False)
        self.w_up = nn.Parameter(w_up.detach().contiguous(), requires_grad=False)
        self.w_down_t = nn.Parameter(w_down.detach().T.contiguous(), requires_grad=False)  # [F, D]
        thr = torch.as_tensor(gate_threshold, dtype=torch.float32).expand(f).clone()
        self.register_buffer("gate_threshold", thr.to(w_gate.device))

    def forward(self, x: torch.Tensor, row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        # x: [..., D] -> [..., D]
        backend = _resolve_backend(self.backend, x.device)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])  # [B, D]
        if backend == "triton":
            from .sparse_gemv import sparse_gemv  # helper "kernels-gemv"

            h = sparse_gate_up(x2, self.w_gate, self.w_up, self.gate_threshold, self.activation, row_mask)
            y = sparse_gemv(h, self.w_down_t, None)  # [B, D]
        else:
            h = sparse_gate_up_reference(x2, self.w_gate, self.w_up, self.gate_threshold, self.activation, row_mask)
            y = (h.float() @ self.w_down_t.float()).to(x.dtype)
        return y.reshape(*lead, y.shape[-1])
