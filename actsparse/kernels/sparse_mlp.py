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
4.7x / 4.5x faster than dense cuBLAS; without a predictor it reaches the 1.8x byte bound.

Three layers: ``_sparse_gate_up_kernel`` (Triton) -> ``sparse_gate_up`` (checks, custom op
``torch.ops.actsparse.sparse_gate_up``) -> ``SparseGatedMLP`` (nn.Module, backend switch).
``sparse_gate_up_reference`` is the pure-PyTorch definition (fp32 arithmetic, runs on CPU).
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
        h = tl.where(keep, a * up, 0.0)
        h_ptrs = h_ptr + offs_b[:, None] * stride_hb + offs_f[None, :]
        tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=b_in[:, None] & f_in[None, :])


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
    kernel[grid](
        x, w_gate, w_up, gate_threshold, mask_arg, h,
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
) -> torch.Tensor:  # h: [B, F] (or [F]) in x.dtype
    """Gate-aware output-sparse gate/up in one Triton launch (see module docstring).

    Bytes read: gate rows (all, or the predicted ones) + up rows of neurons some batch row keeps.
    Feed the result to ``sparse_gemv(h, w_down_t, None)`` for the down projection.

    ``up_with_gate=True`` (only with a row_mask; PowerInfer's way): read the up rows of the
    predicted neurons together with their gate rows instead of after the threshold test. Same h,
    one dependent memory round trip less per neuron, but up rows of neurons the predictor
    over-predicted (predicted, then below threshold) are read too.
    """
    if not HAS_TRITON:
        raise RuntimeError("sparse_gate_up needs triton; use sparse_gate_up_reference")
    _check_inputs(x, w_gate, w_up, gate_threshold, activation, row_mask)
    squeeze = x.dim() == 1
    x2 = x.reshape(1, -1) if squeeze else x
    if not isinstance(gate_threshold, torch.Tensor):
        gate_threshold = torch.full((w_gate.shape[0],), float(gate_threshold), dtype=torch.float32, device=x.device)
    h = torch.ops.actsparse.sparse_gate_up(
        x2, w_gate, w_up, gate_threshold.contiguous(), activation, row_mask, up_with_gate
    )
    return h.reshape(-1) if squeeze else h


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
