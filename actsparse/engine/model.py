"""One readable decoder model for the decode engine (gpt-fast style), dense or activation-sparse.

Reads top to bottom: ``ModelArgs`` (every shape, derived from a Hugging Face ``config.json``),
``KVCache``, ``Linear`` (the only place where dense and sparse differ), ``Attention`` (GQA),
``FeedForward`` (gated MLP), ``RMSNorm``, RoPE, ``Block`` and ``Transformer``. Loading (Hugging Face
safetensors folders, built on ``meta`` and filled with ``load_state_dict(assign=True)``) and
random-weight models of named shapes built directly on the GPU live in ``load.py``.

Why fused linears: decode at batch 1 is bandwidth-bound, one GEMV per weight matrix. q/k/v share
their input, and so do gate/up, so we concatenate their weights along N and make one launch each
(``wqkv`` [Nq + 2 Nkv, K], ``w13`` [2 F, K]): fewer launches, and in sparse mode one mask decides
which weight rows are read for all of them.

Sparse mode (``Transformer.sparsify_``): each block linear stores its weight transposed,
``weight_t`` [K, N], so that a zeroed input x_k skips the contiguous row ``weight_t[k]``, and calls
``actsparse.kernels.sparse_gemv.sparse_gemv`` with per-input thresholds [K] (kept iff
``|x_k| > thresholds[k]``). Prefill (more rows than a GEMV serves) applies the same mask and uses a
dense matmul, so prefill and decode compute the same function. ``lm_head`` always stays dense.
With every linear sparse, the residual stream is fp32 and the o/down GEMVs add into it
(``set_fused_residual_``), and the qkv, gate/up and down GEMVs compute what precedes them, the
RMSNorm or ``silu(gate) * up``, from their raw inputs (``set_fused_prologue_``, ``Linear(x, pre)``).
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ActsparseError

ENGINE_ARCHITECTURES = ("llama", "mistral", "qwen2")
MAX_GEMV_ROWS = 8  # sparse_gemv serves up to 8 rows (batch 1..8 at decode); more rows use a matmul
# Thresholded (TEAL) linears send decode batches of more than 2 rows to the masked dense product:
# per-row thresholds leave few weight rows that every row skips (at s=0.5 the union skips 26.7%,
# 7.3% and 0.6% of the rows at batch 2, 4 and 8), and the sparse kernel reading nearly every row
# was slower than dense there (H100, Llama-3-8B shape: 0.907x at batch 4, 0.861x at 8;
# docs/RESULTS.md). ReLU inputs (skip_zeros) share their zeros across rows and keep all 8.
TEAL_MAX_GEMV_ROWS = 2


# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


@dataclass
class ModelArgs:
    """Every shape of the model. Built from a Hugging Face config with :meth:`from_hf_config`."""

    vocab_size: int
    dim: int  # hidden_size
    n_layer: int
    n_head: int
    n_kv_head: int
    intermediate_size: int
    head_dim: int = 0  # 0 = dim // n_head
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", "factor": ..., ...}
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    model_type: str = "llama"
    extra: dict = field(default_factory=dict, repr=False)  # the config it came from

    def __post_init__(self):
        if self.head_dim == 0:
            if self.dim % self.n_head:
                raise ActsparseError(f"hidden_size {self.dim} is not a multiple of num_attention_heads {self.n_head}")
            self.head_dim = self.dim // self.n_head
        if self.n_head % self.n_kv_head:
            raise ActsparseError(f"num_attention_heads {self.n_head} is not a multiple of num_key_value_heads {self.n_kv_head}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ActsparseError(f"unsupported hidden_act '{self.hidden_act}' (engine supports {', '.join(_ACTIVATIONS)})")
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in ("default", "llama3", "linear"):
            raise ActsparseError(f"unsupported RoPE scaling '{rope_type}' (engine supports default, llama3, linear)")

    @property
    def q_size(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_head * self.head_dim

    @classmethod
    def from_hf_config(cls, config: dict) -> "ModelArgs":
        """Parse a ``config.json`` dict of the Llama, Mistral or Qwen2 family (transformers 4 or 5 layout)."""
        mt = config.get("model_type", "llama")
        if mt not in ENGINE_ARCHITECTURES:
            raise ActsparseError(
                f"the decode engine does not support '{mt}' (supported: {', '.join(ENGINE_ARCHITECTURES)})"
            )
        # transformers 5 writes rope_parameters {rope_theta, rope_type, ...}; 4.x wrote rope_theta + rope_scaling.
        rope = dict(config.get("rope_parameters") or {})
        if "rope_theta" not in rope:
            rope["rope_theta"] = config.get("rope_theta", 10000.0)
        scaling = config.get("rope_scaling") or {k: v for k, v in rope.items() if k != "rope_theta"}
        scaling = dict(scaling)
        if "type" in scaling and "rope_type" not in scaling:  # very old configs
            scaling["rope_type"] = scaling.pop("type")
        if scaling.get("rope_type", "default") == "default":
            scaling = None
        if mt == "qwen2" and config.get("use_sliding_window", False):
            raise ActsparseError("Qwen2 sliding-window attention (use_sliding_window=true) is not supported")
        n_head = config["num_attention_heads"]
        return cls(
            vocab_size=config["vocab_size"],
            dim=config["hidden_size"],
            n_layer=config["num_hidden_layers"],
            n_head=n_head,
            n_kv_head=config.get("num_key_value_heads") or n_head,
            intermediate_size=config["intermediate_size"],
            head_dim=config.get("head_dim") or 0,
            norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope["rope_theta"]),
            rope_scaling=scaling,
            # Qwen2 has q/k/v biases by architecture (no config field); Llama names them attention_bias.
            qkv_bias=bool(config.get("attention_bias", mt == "qwen2")),
            o_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            sliding_window=config.get("sliding_window") if mt == "mistral" else None,
            hidden_act=config.get("hidden_act", "silu"),
            model_type=mt,
            extra=dict(config),
        )

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in NAMED_CONFIGS:
            raise ActsparseError(f"unknown model shape '{name}' (choose from {', '.join(NAMED_CONFIGS)})")
        return cls.from_hf_config(NAMED_CONFIGS[name])


# Named shapes for random-weight benchmarks and tests, written as Hugging Face config dicts so that
# they go through the same parser as a real checkpoint (and can build the matching HF model).
NAMED_CONFIGS: dict[str, dict] = {
    "llama3-8b": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
        max_position_embeddings=131072, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
    "llama2-7b": dict(
        model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5,
        max_position_embeddings=4096, tie_word_embeddings=False,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
    "mistral-7b": dict(
        model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
        max_position_embeddings=32768, tie_word_embeddings=False, sliding_window=4096,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
    # Tiny shapes for tests (odd sizes on purpose: head_dim 12, F not a power of two).
    "tiny-llama": dict(
        model_type="llama", vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=256,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=32),
    ),
    "tiny-mistral": dict(
        model_type="mistral", vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, rms_norm_eps=1e-5, max_position_embeddings=256,
        sliding_window=8, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
    ),
    "tiny-qwen2": dict(
        model_type="qwen2", vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256,
        tie_word_embeddings=True, rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
    ),
}


# ----------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------


class KVCache(nn.Module):
    """Static key/value cache: writes at ``input_pos`` and returns the whole buffers."""

    def __init__(self, batch_size: int, max_seq_len: int, n_kv_head: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch_size, n_kv_head, max_seq_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        # arrival counters of the fused decode attention (kernels/decode_attention), kept zero
        self.register_buffer("counts", torch.zeros(batch_size * n_kv_head, dtype=torch.int32, device=device),
                             persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        # input_pos: [T]; k, v: [B, Hkv, T, D] with B <= the cache's batch
        k_cache, v_cache = self.k_cache[: k.shape[0]], self.v_cache[: k.shape[0]]
        k_cache.index_copy_(2, input_pos, k)
        v_cache.index_copy_(2, input_pos, v)
        return k_cache, v_cache


_LAYOUT_EPOCHS = itertools.count(1)  # a fresh number for every weight re-layout (see sparse_key)


class Linear(nn.Module):
    """``y = x W^T + b``: dense (cuBLAS) or, after :meth:`sparsify_`, activation-sparse.

    Dense: ``weight`` [N, K] (the Hugging Face layout), ``F.linear``.
    Sparse: ``weight_t`` [K, N] and a ``thresholds`` [K] fp32 buffer; ``x_k`` is kept iff
    ``|x_k| > thresholds[k]``, and a dropped input skips the weight row ``weight_t[k]``.
    A sparse linear whose thresholds are all <= 0 skips nothing (``keeps_all``): it keeps the
    [N, K] ``weight`` and runs exactly the dense path; new thresholds switch the layout back.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_parameter("weight_t", None)  # [K, N] in sparse mode (unless keeps_all)
        self.register_buffer("thresholds", None)  # [K] fp32 in sparse mode
        self.backend = "dense"
        self.prefill_dense = False  # sparse mode: keep multi-token (prompt) inputs dense
        self.keeps_all = True  # sparse mode: every threshold <= 0 (dense layout, dense path)
        self.skip_zeros = False  # sparse mode: zero thresholds still take the sparse path (ReLU inputs)
        self.max_gemv_rows = MAX_GEMV_ROWS  # sparse mode: more input rows than this take the masked matmul
        self.layout_epoch = 0  # changes whenever the weight tensor is replaced by a re-layout
        self.record: list | None = None  # calibration/statistics: inputs are appended here when set
        self.record_io: list | None = None  # checks: (x [M, K], y [M, N]) of each sparse call when set

    @property
    def sparse(self) -> bool:
        return self.backend != "dense"

    @property
    def default_max_gemv_rows(self) -> int:
        """Decode rows served by the sparse kernels unless set_max_gemv_rows_ says otherwise."""
        return MAX_GEMV_ROWS if self.skip_zeros else TEAL_MAX_GEMV_ROWS

    @property
    def weight_bytes(self) -> int:
        w = self.weight if self.weight is not None else self.weight_t
        return w.numel() * w.element_size()

    @torch.no_grad()
    def sparsify_(self, thresholds: torch.Tensor | None, backend: str, skip_zeros: bool = False) -> None:
        """Switch to sparse mode and keep ``thresholds`` [K] in a buffer (weight re-laid as [K, N]
        unless every threshold is <= 0). ``skip_zeros``: take the sparse path even with zero
        thresholds, for inputs that are exactly zero by construction (a ReLU MLP's down input)."""
        if backend not in ("torch", "triton"):
            raise ActsparseError(f"unknown sparse backend '{backend}' (choose torch or triton)")
        self.skip_zeros = bool(skip_zeros)
        self.max_gemv_rows = self.default_max_gemv_rows
        if not self.sparse:
            w = self.weight if self.weight is not None else self.weight_t
            self.thresholds = torch.zeros(self.in_features, dtype=torch.float32, device=w.device)
        self.backend = backend
        self.set_thresholds_(thresholds)

    @torch.no_grad()
    def set_thresholds_(self, thresholds: torch.Tensor | None) -> None:
        """Copy new thresholds in place (a captured CUDA graph keeps working with the new values,
        unless the weight layout changes between all-zero and positive thresholds: then
        ``Transformer.sparse_key`` changes and the generator captures a new graph)."""
        if thresholds is None:
            self.thresholds.zero_()
        else:
            thresholds = torch.as_tensor(thresholds, dtype=torch.float32)
            if thresholds.ndim == 0:
                thresholds = thresholds.expand(self.in_features)
            if thresholds.shape != (self.in_features,):
                raise ActsparseError(f"thresholds have shape {tuple(thresholds.shape)}, expected ({self.in_features},)")
            self.thresholds.copy_(thresholds)
        # All thresholds <= 0 keep every nonzero input: the dense product is the same sum, and the
        # dense path (cuBLAS or Inductor's tuned GEMV on the [N, K] weight) is the fastest way to it.
        self.keeps_all = bool((self.thresholds <= 0).all()) and not self.skip_zeros
        self._relayout_(transposed=not self.keeps_all)

    def _relayout_(self, transposed: bool) -> None:
        """Hold the weight as [K, N] (``weight_t``, sparse kernels) or [N, K] (``weight``)."""
        if transposed and self.weight_t is None:
            w_t = self.weight.detach().t().contiguous()
            self.weight = None  # free the old copy before the next linear re-lays its own
            self.weight_t = nn.Parameter(w_t, requires_grad=False)
        elif not transposed and self.weight is None:
            w = self.weight_t.detach().t().contiguous()
            self.weight_t = None
            self.weight = nn.Parameter(w, requires_grad=False)
        else:
            return
        self.layout_epoch = next(_LAYOUT_EPOCHS)

    def forward(self, x: torch.Tensor, pre=None) -> torch.Tensor:  # x: [B, T, K] -> [B, T, N]
        """``pre``: an input prologue applied to x first (see ``apply_prologue``): None, an
        ``RMSNorm`` (x is its input) or "silu" (x = [gate | up]). A sparse Triton linear at
        decode computes it inside its kernel (``fuses_prologue``); every other path applies it
        in PyTorch ops, which a compiled block fuses with its neighbours."""
        if pre is not None:
            if self.fuses_prologue(x, pre):
                return self._sparse_forward(x, pre)
            x = apply_prologue(x, pre)
        if self.record is not None:
            self.record.append(x.detach())
        if not self.sparse or (self.keeps_all and self.record_io is None):
            # Traced when compiled: Inductor calls cuBLAS, or (with coordinate-descent tuning)
            # turns the M=1 product into a tuned Triton GEMV.
            return F.linear(x, self.weight, self.bias)
        if self.record_io is None and not self._gemv_rows(x):
            return self._matmul_forward(x)  # traced when compiled: the mask fuses with its neighbours
        return self._sparse_forward(x)

    def forward_add(self, x: torch.Tensor, r: torch.Tensor, pre=None) -> torch.Tensor:
        """``r + self(x, pre)`` for an fp32 residual stream r [B, T, N]. A sparse Triton linear at
        decode adds its product into r in place (``sparse_gemv_add_``: one kernel, no workspace,
        no arrival counter, no separate add); every other path returns ``r + self(x, pre).float()``."""
        if (self.sparse and self.backend == "triton" and self._gemv_rows(x) and self.bias is None
                and r.dtype == torch.float32 and r.is_contiguous()
                and (pre is None or self.fuses_prologue(x, pre))):
            return self._sparse_add(x, r, pre)
        return r + self(x, pre).float()

    def fuses_prologue(self, x: torch.Tensor, pre) -> bool:
        """True where the kernel computes the input prologue ``pre`` itself: a sparse Triton
        GEMV call (decode) with an RMSNorm or SiLU prologue, no bias, not recording inputs."""
        return (self.sparse and self.backend == "triton" and self.bias is None and self.record is None
                and (isinstance(pre, RMSNorm) or pre == "silu") and self._gemv_rows(x))

    def _gemv_rows(self, x: torch.Tensor) -> bool:
        """Sparse mode: x [..., K] goes to a sparse GEMV (kernel or its reference), not to a dense
        product (all thresholds <= 0, or a prompt under prefill_dense) or a masked matmul (more
        than max_gemv_rows rows)."""
        return not (self._dense_prompt(x) or self.keeps_all) and x.numel() // x.shape[-1] <= self.max_gemv_rows

    def _dense_prompt(self, x: torch.Tensor) -> bool:
        """A multi-token (prompt) input that prefill_dense keeps unmasked."""
        return self.prefill_dense and x.dim() == 3 and x.shape[1] > 1

    def _matmul_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Sparse mode, inputs that do not go to a GEMV (prompts, batches above max_gemv_rows):
        the dense product of the masked input (or of the input itself for prompts under
        prefill_dense, and where every threshold is <= 0), the same function as the GEMV path."""
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if not (self._dense_prompt(x) or self.keeps_all):
            x2 = x2 * (x2.abs() > self.thresholds).to(x2.dtype)
        y = self._dense_product(x2)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    @torch.compiler.disable
    def _sparse_add(self, x: torch.Tensor, r: torch.Tensor, pre=None) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])  # [M, K], or the prologue's input
        if self.record is not None:
            self.record.append(x.detach())
        r2 = r.view(-1, self.out_features)  # [M, N] fp32, updated in place
        xin = apply_prologue(x2, pre) if self.record_io is not None else None  # the product's input
        before = r2.clone() if self.record_io is not None else None
        _sparse_gemv_add()(r2, x2, self.weight_t, self.thresholds, **_prologue_args(pre))
        if before is not None:
            self.record_io.append((xin.detach().clone(), (r2 - before).to(self.weight_t.dtype)))
        return r

    def _dense_product(self, x2: torch.Tensor) -> torch.Tensor:  # [M, K] -> [M, N], no bias
        return x2 @ self.weight_t if self.weight_t is not None else F.linear(x2, self.weight)

    # Sparse linears run eagerly even inside compiled blocks: the sparse_gemv launcher is one
    # kernel on its persistent, self-zeroing workspace, while a traced call would allocate and
    # memset a fresh workspace every time. Inside a CUDA graph the graph break costs nothing.
    @torch.compiler.disable
    def _sparse_forward(self, x: torch.Tensor, pre=None) -> torch.Tensor:
        if pre is not None:  # fuses_prologue: the kernel computes the prologue from x
            x2 = x.reshape(-1, x.shape[-1])
            y = _sparse_gemv()(x2, self.weight_t, self.thresholds, **_prologue_args(pre))
            if self.record_io is not None:
                self.record_io.append((apply_prologue(x2, pre).detach().clone(), y.detach().clone()))
            return y.view(*x.shape[:-1], self.out_features)
        if not self._gemv_rows(x):  # only with record_io set (forward traces this case itself)
            y = self._matmul_forward(x)
            if self.record_io is not None:
                self.record_io.append((x.reshape(-1, self.in_features).detach().clone(),
                                       y.reshape(-1, self.out_features).detach().clone()))
            return y
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        gemv = _sparse_gemv() if self.backend == "triton" else _sparse_gemv_reference()
        y = gemv(x2, self.weight_t, self.thresholds)  # [M, N]
        if self.bias is not None:
            y = y + self.bias
        if self.record_io is not None:
            self.record_io.append((x2.detach().clone(), y.detach().clone()))
        return y.view(*x.shape[:-1], self.out_features)


def apply_prologue(x: torch.Tensor, pre) -> torch.Tensor:
    """The input prologue of a linear in PyTorch ops: None (x), an RMSNorm (norm(x)) or an
    activation name (x = [gate | up] -> act(gate) * up)."""
    if pre is None:
        return x
    if isinstance(pre, RMSNorm):
        return pre(x)
    gate, up = x.chunk(2, dim=-1)
    return _ACTIVATIONS[pre](gate) * up


def _prologue_args(pre) -> dict:
    """sparse_gemv's keyword arguments for a fusable prologue (Linear.fuses_prologue)."""
    if pre is None:
        return {}
    if isinstance(pre, RMSNorm):
        return dict(norm_weight=pre.weight, eps=pre.eps)
    return dict(act=pre)


def _sparse_gemv():
    from ..kernels.sparse_gemv import sparse_gemv  # noqa: PLC0415  (Triton is optional on CPU)

    return sparse_gemv


def _sparse_gemv_add():
    from ..kernels.sparse_gemv import sparse_gemv_add_  # noqa: PLC0415

    return sparse_gemv_add_


def _sparse_gemv_reference():
    try:
        from ..kernels.sparse_gemv import sparse_gemv_reference  # noqa: PLC0415
    except ImportError:  # the kernel module is optional for the reference path
        return _masked_gemv
    return sparse_gemv_reference


def _masked_gemv(x: torch.Tensor, w_t: torch.Tensor, thresholds: torch.Tensor | None) -> torch.Tensor:
    """Pure-PyTorch ``(x * (|x| > thr)) @ w_t`` accumulated in fp32 (the sparse_gemv contract)."""
    # x: [B, K], w_t: [K, N], thresholds: [K] fp32 -> [B, N] in x.dtype
    keep = x != 0 if thresholds is None else x.abs().float() > thresholds
    return ((x.float() * keep) @ w_t.float()).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # in the weight's dtype: an fp32 residual stream (Transformer.set_fused_residual_) still
        # feeds the linears model-dtype inputs; for x in the model dtype this is HF's formula
        return self.weight * xf.to(self.weight.dtype)


def rope_tables(args: ModelArgs, max_seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: [max_seq_len, head_dim] fp32, the "rotate half" layout of Hugging Face checkpoints."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64, device=device).float() / d))
    scaling = args.rope_scaling or {}
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":  # Llama 3.1: stretch long wavelengths, keep short ones, blend between
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / hi) * ~(wavelen > old_len / lo)
        inv_freq = torch.where(medium, smoothed, scaled)
    pos = torch.arange(max_seq_len, device=device, dtype=torch.int64).float()
    freqs = pos[:, None] * inv_freq[None, :]  # [S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [S, D]
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, T, D]; cos, sin: [T, D] fp32
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        self.q_size, self.kv_size = args.q_size, args.kv_size
        self.wqkv = Linear(args.dim, args.q_size + 2 * args.kv_size, args.qkv_bias, device, dtype)
        self.wo = Linear(args.q_size, args.dim, args.o_bias, device, dtype)
        self.kv_cache: KVCache | None = None
        # one-token attention: "fused" (Triton, kernels/decode_attention), "matmul" (two GEMMs),
        # "reductions", or "auto" (auto_decode_attention: fused on CUDA for short caches)
        self.decode_attention = "auto"

    def forward(self, x, cos, sin, mask, input_pos, residual=None, norm=None):
        # x: [B, T, dim]; cos, sin: [T, D]; mask: [T, S] bool (True = attend); input_pos: [T]
        # residual: fp32 [B, T, dim] to add the output into (fused residual), or None
        # norm: the RMSNorm to apply to x first, inside the qkv kernel where it can (fused prologue)
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        mode = self.decode_attention
        if mode == "auto":
            mode = auto_decode_attention(x.is_cuda, self.kv_cache.k_cache.shape[2])
        if T == 1 and mode == "fused":  # RoPE, cache write and attention: one kernel
            from ..kernels.decode_attention import decode_attention  # noqa: PLC0415 (Triton is optional on CPU)

            cache = self.kv_cache
            y = decode_attention(self.wqkv(x, norm).view(B, -1), cos, sin, mask, input_pos, cache.k_cache,
                                 cache.v_cache, H, Hkv, D, counts=cache.counts).view(B, 1, H * D)
        else:
            y = self._attend(x, cos, sin, mask, input_pos, mode, norm)
        return self.wo(y) if residual is None else self.wo.forward_add(y, residual)

    def _attend(self, x, cos, sin, mask, input_pos, mode, norm=None):
        """RoPE, cache update and attention in PyTorch ops: -> [B, T, H * D]."""
        B, T, _ = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q, k, v = self.wqkv(x, norm).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = apply_rope(q.view(B, T, H, D).transpose(1, 2), cos, sin)  # [B, H, T, D]
        k = apply_rope(k.view(B, T, Hkv, D).transpose(1, 2), cos, sin)  # [B, Hkv, T, D]
        v = v.view(B, T, Hkv, D).transpose(1, 2)
        k, v = self.kv_cache.update(input_pos, k, v)  # [B, Hkv, S, D]
        # GQA without copying the cache: the G query heads of a kv head are stacked along time,
        # so each cached key/value is read once. Rows of q (and of the mask) follow (g, t).
        G = H // Hkv
        q = q.reshape(B, Hkv, G * T, D)
        if T == 1 and mode == "matmul":
            y = _decode_attention_matmul(q, k, v, mask)  # [B, Hkv, G, D]
        elif T == 1:
            y = _decode_attention(q, k, v, mask)  # [B, Hkv, G, D]
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.repeat(G, 1))  # [B, Hkv, G*T, D]
        # reshape, not view: some SDPA backends (fp32 on CUDA) return a non-contiguous y
        return y.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)


FUSED_ATTENTION_MAX_CACHE = 4096  # "auto" uses the fused kernel up to this many cached positions


def auto_decode_attention(on_cuda: bool, cache_len: int) -> str:
    """The "auto" decode attention: the fused Triton kernel on CUDA for caches of at most
    FUSED_ATTENTION_MAX_CACHE positions, "matmul" elsewhere. Per layer on an H100 (docs/RESULTS.md,
    2026-12-05): 7.3-8.3 against 12.4-12.9 us for the compiled matmul path with 384 cached
    positions, 10.8 / 21.0 against 22.3 us with 4096 (positions 1023 / 4095). Longer caches were
    not measured."""
    return "fused" if on_cuda and cache_len <= FUSED_ATTENTION_MAX_CACHE else "matmul"


def _decode_attention(q, k, v, mask):
    """One query position: plain reductions, which Inductor fuses into a few small Triton kernels
    (a fused attention kernel is built for long query blocks and wastes most of its tile here)."""
    # q: [B, Hkv, G, D]; k, v: [B, Hkv, S, D]; mask: [1, S]
    # Both factors of every product in one dtype: a mixed bf16 * fp32 product can be pattern-
    # matched back into a mixed-dtype matmul by Inductor's passes, which then fails to compile.
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = (q.to(acc).unsqueeze(-2) * k.to(acc).unsqueeze(-3)).sum(-1) * (1.0 / math.sqrt(q.shape[-1]))  # [B, Hkv, G, S]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return (probs.unsqueeze(-1) * v.to(acc).unsqueeze(-3)).sum(-2).to(q.dtype)  # [B, Hkv, G, D]


def _decode_attention_matmul(q, k, v, mask):
    """One query position as two batched matmuls in the model dtype (fp32 accumulation inside the
    GEMM, as Hugging Face's eager attention does) with an fp32 softmax in between."""
    # q: [B, Hkv, G, D]; k, v: [B, Hkv, S, D]; mask: [1, S]
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * (1.0 / math.sqrt(q.shape[-1]))  # [B, Hkv, G, S]
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.matmul(probs.to(v.dtype), v)  # [B, Hkv, G, D]


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.hidden_act = args.hidden_act
        self.act = _ACTIVATIONS[args.hidden_act]
        # FATReLU threshold of a relufied model (actsparse.relu): a = gate * (gate > T); 0 = plain ReLU.
        # A Python float, so compiled decode steps treat it as a constant.
        self.act_threshold = 0.0
        # End the compiled region after act(gate) * up (see Transformer.set_act_boundary_).
        self.act_boundary = True
        # ReLU models (Transformer.sparsify_relu_): decode computes h with sparse_gate_up, which
        # reads the up rows of kept neurons only; "torch" / "triton", None = the plain w13 path.
        self.gate_up_backend: str | None = None
        self.register_buffer("gate_thresholds", None, persistent=False)  # [F] fp32 = act_threshold
        self.w13 = Linear(args.dim, 2 * args.intermediate_size, args.mlp_bias, device, dtype)  # gate; up
        self.w2 = Linear(args.intermediate_size, args.dim, args.mlp_bias, device, dtype)  # down

    def set_act_threshold_(self, threshold: float) -> None:
        if threshold and self.hidden_act != "relu":
            raise ActsparseError(f"a FATReLU threshold needs a ReLU MLP, this one uses {self.hidden_act}")
        if not (threshold >= 0 and math.isfinite(threshold)):
            raise ActsparseError(f"FATReLU threshold must be a finite number >= 0, got {threshold}")
        self.act_threshold = float(threshold)
        if self.gate_thresholds is not None:
            self.gate_thresholds.fill_(self.act_threshold)

    def forward(self, x, residual=None, norm=None):
        # residual: fp32 [B, T, dim] to add the output into (fused residual), or None
        # norm: the RMSNorm to apply to x first (a block with fused prologues passes it): the
        # gate/up kernel applies it, and the down kernel computes act(gate) * up itself
        down = self.w2 if residual is None else (lambda h, pre=None: self.w2.forward_add(h, residual, pre))
        if self.gate_up_backend is not None and x.shape[0] * x.shape[1] <= MAX_GEMV_ROWS:
            return down(self._sparse_gate_up(apply_prologue(x, norm)))
        gu = self.w13(x, norm)
        if norm is not None and self.act_threshold == 0 and self.w2.fuses_prologue(gu, self.hidden_act):
            return down(gu, "silu")  # fuses_prologue: the activation is SiLU
        gate, up = gu.chunk(2, dim=-1)
        if self.act_threshold > 0:
            act = torch.where(gate > self.act_threshold, gate, torch.zeros_like(gate))
        else:
            act = self.act(gate)
        h = act * up
        if self.act_boundary and torch.compiler.is_compiling():
            # h becomes a graph output (one small fused kernel), and the down projection starts a
            # new region: its GEMV then reads h instead of recomputing act(gate) * up per tile.
            torch._dynamo.graph_break()
        return down(h)

    # Eager inside compiled blocks and CUDA graphs, like the sparse linears.
    @torch.compiler.disable
    def _sparse_gate_up(self, x: torch.Tensor) -> torch.Tensor:
        """h = relu(gate) * up where gate > act_threshold, else 0 (the same function as forward),
        reading the up rows of kept neurons only. x: [B, T, dim] with B * T <= 8."""
        if self.w13.record is not None:
            self.w13.record.append(x.detach())
        F_ = self.w2.in_features
        x2 = x.reshape(-1, x.shape[-1])
        w = self.w13.weight  # [2F, K]: gate rows, then up rows (w13 keeps the dense layout)
        if w is None:
            raise ActsparseError("positive gate/up thresholds and sparsify_relu_(gate_up=True) do not combine")
        if self.gate_up_backend == "triton":
            from ..kernels.sparse_mlp import sparse_gate_up  # noqa: PLC0415

            h = sparse_gate_up(x2, w[:F_], w[F_:], self.gate_thresholds, "relu")
        else:
            from ..kernels.sparse_mlp import sparse_gate_up_reference  # noqa: PLC0415

            h = sparse_gate_up_reference(x2, w[:F_], w[F_:], self.gate_thresholds, "relu")
        if self.w13.record_io is not None:
            self.w13.record_io.append((x2.detach().clone(), h.detach().clone()))
        return h.view(*x.shape[:-1], F_)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps, device, dtype)
        self.attention = Attention(args, device, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, device, dtype)
        self.feed_forward = FeedForward(args, device, dtype)
        # fp32 residual stream with o/down products added in place: True, False, or "auto" (on
        # when the o projection runs the Triton kernel; see Transformer.set_fused_residual_)
        self.fused_residual: bool | str = "auto"
        # norms and act(gate) * up computed inside the sparse kernels: True, False, or "auto" (with
        # the fused residual; see Transformer.set_fused_prologue_)
        self.fused_prologue: bool | str = "auto"

    def uses_fused_residual(self) -> bool:
        if self.fused_residual != "auto":
            return bool(self.fused_residual)
        wo = self.attention.wo
        return wo.sparse and wo.backend == "triton" and not wo.keeps_all

    def uses_fused_prologue(self) -> bool:
        if self.fused_prologue != "auto":
            return bool(self.fused_prologue) and self.uses_fused_residual()
        return self.uses_fused_residual()

    def forward(self, x, cos, sin, mask, input_pos):
        if self.uses_fused_residual():  # x: the model dtype (first block) or fp32 (a block's output)
            r = x.float()
            if self.uses_fused_prologue():  # the norms run inside the qkv and gate/up kernels
                r = self.attention(r, cos, sin, mask, input_pos, residual=r, norm=self.attention_norm)
                return self.feed_forward(r, residual=r, norm=self.ffn_norm)
            r = self.attention(self.attention_norm(r), cos, sin, mask, input_pos, residual=r)
            return self.feed_forward(self.ffn_norm(r), residual=r)
        h = x + self.attention(self.attention_norm(x), cos, sin, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, device=None, dtype=None):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim, device=device, dtype=dtype)
        self.layers = nn.ModuleList(Block(args, device, dtype) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps, device, dtype)
        self.output = Linear(args.dim, args.vocab_size, False, device, dtype)  # lm_head: always dense
        if args.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        self.batch_size = self.max_seq_len = 0

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    def setup_caches(self, batch_size: int, max_seq_len: int) -> None:
        """(Re)allocate the KV caches, RoPE tables and causal mask on the weights' device."""
        args, device, dtype = self.args, self.device, self.dtype
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch_size, max_seq_len, args.n_kv_head, args.head_dim, dtype, device)
        cos, sin = rope_tables(args, max_seq_len, device)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        pos = torch.arange(max_seq_len, device=device)
        mask = pos[None, :] <= pos[:, None]  # [S, S]: query i attends key j <= i
        if args.sliding_window is not None:
            mask &= pos[None, :] > pos[:, None] - args.sliding_window
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor, last_only: bool = False, block_fn=None):
        """idx: [B, T] token ids at positions input_pos: [T] -> logits [B, T or 1, vocab].

        ``block_fn(block, x, cos, sin, mask, input_pos)`` lets the generator run compiled blocks.
        """
        if self.max_seq_len == 0:
            raise ActsparseError("call setup_caches(batch_size, max_seq_len) before running the model")
        x = self.tok_embeddings(idx)  # [B, T, dim]
        cos, sin = self.rope_cos[input_pos], self.rope_sin[input_pos]  # [T, D]
        mask = self.causal_mask[input_pos]  # [T, S]
        for layer in self.layers:
            x = layer(x, cos, sin, mask, input_pos) if block_fn is None else block_fn(layer, x, cos, sin, mask, input_pos)
        if last_only:
            x = x[:, -1:]
        return self.output(self.norm(x))

    # -------------------------------------------------------------------------------- sparsity

    def block_linears(self):
        """(engine name, Linear, Hugging Face names of the linears it fuses) for every block linear."""
        for i, layer in enumerate(self.layers):
            p = f"model.layers.{i}"
            yield f"layers.{i}.attention.wqkv", layer.attention.wqkv, tuple(f"{p}.self_attn.{n}_proj" for n in "qkv")
            yield f"layers.{i}.attention.wo", layer.attention.wo, (f"{p}.self_attn.o_proj",)
            yield f"layers.{i}.feed_forward.w13", layer.feed_forward.w13, (f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj")
            yield f"layers.{i}.feed_forward.w2", layer.feed_forward.w2, (f"{p}.mlp.down_proj",)

    def is_sparse(self) -> bool:
        return any(lin.sparse for _, lin, _ in self.block_linears())

    def backend(self) -> str:
        """The sparse linears' backend ("torch" / "triton"), or "dense" if none is sparse."""
        return next((lin.backend for _, lin, _ in self.block_linears() if lin.sparse), "dense")

    def sparse_key(self) -> tuple:
        """What a captured decode graph depends on besides buffer contents."""
        lin = self.layers[0].attention.wqkv
        return (lin.backend, lin.prefill_dense, self.layers[0].attention.decode_attention,
                self.layers[0].feed_forward.act_boundary, self.layers[0].feed_forward.gate_up_backend,
                self.layers[0].fused_residual, self.layers[0].uses_fused_residual(),
                self.layers[0].fused_prologue, self.layers[0].uses_fused_prologue(),
                tuple((l.keeps_all, l.layout_epoch, l.max_gemv_rows) for _, l, _ in self.block_linears()))

    @property
    def prefill_dense(self) -> bool:
        return self.layers[0].attention.wqkv.prefill_dense

    @prefill_dense.setter
    def prefill_dense(self, value: bool) -> None:
        for _, lin, _ in self.block_linears():
            lin.prefill_dense = bool(value)

    def set_decode_attention_(self, mode: str) -> "Transformer":
        """How a one-token step attends: "reductions" (elementwise products and sums that Inductor
        fuses), "matmul" (two batched GEMMs), or "fused" (``kernels/decode_attention``: RoPE, the
        cache write and the attention in one Triton launch; CUDA, or TRITON_INTERPRET=1); all
        exact up to rounding. "auto" (the default): fused on CUDA for KV caches of up to 512
        positions, matmul elsewhere (``auto_decode_attention``; measured on an H100 at Llama-3-8B
        shape with 384 positions: 171.9-176.0 against 167.2-170.0 tok/s, docs/RESULTS.md)."""
        if mode not in ("reductions", "matmul", "fused", "auto"):
            raise ActsparseError(f"decode attention must be 'auto', 'reductions', 'matmul' or 'fused', got '{mode}'")
        if mode == "fused":
            if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ActsparseError("decode attention 'fused' runs Triton kernels: it needs a CUDA device "
                                     "(or TRITON_INTERPRET=1)")
        for layer in self.layers:
            layer.attention.decode_attention = mode
        return self

    def set_fused_residual_(self, on: bool | str = True) -> "Transformer":
        """Keep the residual stream in fp32 and let sparse Triton o/down projections add their
        products into it in place (``Linear.forward_add`` -> ``sparse_gemv_add_``), which saves the
        kernel's split-K publish pass and the separate residual add. More precise than a
        model-dtype residual (Hugging Face rounds it to bf16 after every add), so logits differ
        from the unfused model by that rounding.

        "auto" (the default): on exactly when a block's o projection runs the Triton kernel
        (TEAL thresholds on the attention linears). Measured on an H100 (docs/RESULTS.md): with
        every linear sparse (Llama-3-8B shape) +3.6 to +6% tokens/s at s = 0.25-0.7 in two runs,
        -2.5 to -4% at s = 0 (dense linears); with only the MLP sparse (ReLU model, LLaMA-2-7B
        shape, dense attention) it was slower, so "auto" leaves it off there."""
        return self._set_block_option_("fused_residual", on)

    def set_fused_prologue_(self, on: bool | str = True) -> "Transformer":
        """Let the sparse kernels compute what precedes them (with the fused residual only): the
        qkv and gate/up GEMVs take the fp32 residual and apply the RMSNorm themselves, and the down
        GEMV takes the gate/up output and computes silu(gate) * up (``sparse_gemv``'s input
        prologues). The norm and activation kernels, two or three per block, disappear from the
        decode step. The same function as the unfused block, up to rounding. Linears that cannot
        fuse (dense, the reference backend, prompts) apply the prologue in PyTorch ops.
        "auto" (the default): on wherever the fused residual is on."""
        return self._set_block_option_("fused_prologue", on)

    def _set_block_option_(self, name: str, on: bool | str) -> "Transformer":
        """Set a Block's True / False / "auto" option (``fused_residual``, ``fused_prologue``)."""
        if on not in (True, False, "auto"):
            raise ActsparseError(f"{name.replace('_', ' ')} must be True, False or 'auto', got {on!r}")
        for layer in self.layers:
            setattr(layer, name, on)
        return self

    def set_max_gemv_rows_(self, rows: int | None = None) -> "Transformer":
        """Decode batches of up to ``rows`` rows (1-8) go to the sparse GEMV kernels; larger ones
        to the masked dense product, the same function. None restores the defaults:
        ``TEAL_MAX_GEMV_ROWS`` (2) for thresholded linears, 8 for ReLU inputs (skip_zeros)."""
        if rows is not None and not (isinstance(rows, int) and 0 <= rows <= MAX_GEMV_ROWS):
            raise ActsparseError(f"max GEMV rows must be an integer in 0..{MAX_GEMV_ROWS}, got {rows!r}")
        for _, lin, _ in self.block_linears():
            lin.max_gemv_rows = lin.default_max_gemv_rows if rows is None else rows
        return self

    def set_act_boundary_(self, on: bool = True) -> "Transformer":
        """Compile ``act(gate) * up`` and the down projection in separate regions (a graph break).

        Inductor fuses pointwise producers into the reduction that reads them. With its
        coordinate-descent GEMV (``gemv="inductor"``), the down projection then recomputes
        ``act(gate) * up`` in every output tile: 4096 x 14336 SiLUs per token on Llama-3-8B.
        With the boundary, h is written once by a small kernel and the GEMV only streams
        weights. The same function up to rounding (h is stored in the model dtype)."""
        for layer in self.layers:
            layer.feed_forward.act_boundary = bool(on)
        return self

    def set_backend_(self, backend: str) -> None:
        """Switch a sparse model between the "torch" reference path and the "triton" kernels."""
        if backend not in ("torch", "triton"):
            raise ActsparseError(f"unknown sparse backend '{backend}' (choose torch or triton)")
        for _, lin, _ in self.block_linears():
            if not lin.sparse:
                raise ActsparseError("set_backend_ needs a sparse model: call sparsify_ first")
            lin.backend = backend

    @torch.no_grad()
    def sparsify_(self, thresholds: dict[str, torch.Tensor] | None, backend: str = "auto") -> "Transformer":
        """Make every block linear sparse with ``thresholds`` (keys: HF linear names; missing = 0).

        Linears that share an input (q/k/v, gate/up) must carry identical thresholds, since one
        fused launch applies one mask. ``backend``: "torch" (reference, CPU), "triton", "auto".
        """
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        for name, linear, hf_names in self.block_linears():
            linear.sparsify_(_site_thresholds(thresholds, hf_names, linear.in_features), backend)
        return self

    @torch.no_grad()
    def sparsify_relu_(self, backend: str = "auto", gate_up: bool = True) -> "Transformer":
        """ProSparse's steps 2 and 3 for a ReLU MLP (relufied or ProSparse models), the same function.

        Step 3: ``h = relu(gate) * up`` (FATReLU: kept where gate > T) is exactly zero wherever the
        activation cuts, so every down projection skips those weight rows (zero thresholds,
        nothing to calibrate). Step 2 (``gate_up=True``): decode steps compute h with
        ``sparse_gate_up``, which reads all gate rows but only the up rows of kept neurons.
        Attention linears stay as they are (``sparsify_`` handles them), and a down projection
        that already has thresholds keeps them."""
        if self.args.hidden_act != "relu":
            raise ActsparseError(f"sparsify_relu_ needs a ReLU MLP, this model uses {self.args.hidden_act}")
        if gate_up and self.args.mlp_bias:
            raise ActsparseError("sparsify_relu_(gate_up=True) does not support MLP biases")
        if backend == "auto":
            backend = "triton" if self.device.type == "cuda" else "torch"
        if backend not in ("torch", "triton"):
            raise ActsparseError(f"unknown sparse backend '{backend}' (choose torch or triton)")
        for layer in self.layers:
            ff = layer.feed_forward
            if gate_up and ff.w13.weight is None:
                raise ActsparseError("sparsify_relu_(gate_up=True) needs the gate/up weight in its dense layout "
                                     "(no positive gate/up thresholds)")
            kept = ff.w2.thresholds.clone() if ff.w2.sparse else None  # TEAL thresholds stay
            ff.w2.sparsify_(kept, backend, skip_zeros=True)
            ff.gate_up_backend = backend if gate_up else None
            ff.gate_thresholds = (torch.full((ff.w2.in_features,), ff.act_threshold, dtype=torch.float32,
                                             device=self.device) if gate_up else None)
        return self

    @torch.no_grad()
    def set_thresholds_(self, thresholds: dict[str, torch.Tensor] | None) -> None:
        """New thresholds for a sparse model, copied in place (captured graphs stay valid)."""
        for name, linear, hf_names in self.block_linears():
            if not linear.sparse:
                raise ActsparseError("set_thresholds_ needs a sparse model: call sparsify_ first")
            linear.set_thresholds_(_site_thresholds(thresholds, hf_names, linear.in_features))


def _site_thresholds(thresholds, hf_names, in_features) -> torch.Tensor | None:
    if thresholds is None:
        return None
    present = [n for n in hf_names if n in thresholds]
    if not present:
        return None
    first = torch.as_tensor(thresholds[present[0]], dtype=torch.float32).cpu()
    for n in present[1:]:
        if not torch.equal(torch.as_tensor(thresholds[n], dtype=torch.float32).cpu(), first):
            raise ActsparseError(f"{n} and {present[0]} share an input but have different thresholds")
    if first.shape not in ((), (in_features,)):
        raise ActsparseError(f"thresholds for {present[0]} have shape {tuple(first.shape)}, expected ({in_features},)")
    return first
