"""Gate-aware MLP sparsity (CATS): cut on ``|act(gate(x))|``, skip the matching up rows and down columns.

In a gated MLP ``y = down(act(gate(x)) * up(x))`` neuron f contributes ``act(gate)_f * up_f`` times
column f of down. CATS (Lee et al., 2024) zeroes the neurons whose ``|act(gate)_f|`` is at or below a
calibrated threshold; for those, row f of up and column f of down need not be read: at batch-1 decode,
time is bytes, and the two make up 2/3 of the MLP's weights. The gate itself must be read in full,
since its output decides. The reference semantics (what every backend computes)::

    a = act(gate(x)); mask = |a| > t; h = (a * mask) * up(x); y = down(h)

Module layout (qualified names stay those of Hugging Face, so threshold sets keep working):
``layer.mlp`` becomes a :class:`CatsMLP` whose ``act_fn`` is a :class:`CatsActivation` holding the
per-neuron thresholds ``t`` [F] in a buffer. A threshold set addresses it as
``model.layers.<i>.mlp.act_fn``; ``mlp.down_proj`` then gets thresholds 0 (its input h is exactly zero
at masked neurons, and a sparse GEMV skips zeros). A set without ``act_fn`` entries switches CATS off
(thresholds 0: the plain activation), so CATS and input-sparsity sets can be evaluated on one model.

On CUDA, decode steps (1-8 tokens) run the fused ``sparse_gate_up`` kernel (gate in full, up rows only
for kept neurons) and ``sparse_gemv`` for down; elsewhere the pure PyTorch path runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import ActsparseError
from .models import InputSite, decoder_layers
from .sparsify import BACKENDS, SparseLinear, load_threshold_buffer, register_transform

# Hugging Face activation names -> sparse_gate_up's activation names
KERNEL_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh",
                      "relu": "relu"}


def activation_name(site: InputSite) -> str:
    """Qualified name of the MLP activation of the block of ``site`` (``model.layers.3.mlp.act_fn``)."""
    return f"{site.prefix}.mlp.act_fn"


def activation_module(model: nn.Module, site: InputSite) -> nn.Module:
    """The module whose output is ``act(gate(x))`` before any CATS mask (for calibration hooks)."""
    mod = model.get_submodule(activation_name(site))
    return mod.act if isinstance(mod, CatsActivation) else mod


class CatsActivation(nn.Module):
    """``a = act(g)``, zeroed where ``|a| <= thresholds`` (per neuron, strict like every keep rule).

    ``thresholds`` [F] fp32 buffer: travels with ``state_dict``. All zero = exactly ``act``.
    """

    is_gate_threshold = True  # found by sparsify.threshold_modules / apply_thresholds_

    def __init__(self, act: nn.Module, features: int, prefill_dense: bool = False, device=None):
        super().__init__()
        self.act = act
        self.features = features
        self.prefill_dense = prefill_dense
        self.register_buffer("thresholds", torch.zeros(features, dtype=torch.float32, device=device))
        self._all_zero = True

    def set_thresholds(self, thresholds: torch.Tensor | float) -> None:
        self._all_zero = load_threshold_buffer(self.thresholds, thresholds, "an MLP gate with {n} neurons")

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._all_zero = bool((self.thresholds == 0).all())

    @property
    def active(self) -> bool:
        return not self._all_zero

    def forward(self, g: torch.Tensor) -> torch.Tensor:  # g: [..., F]
        a = self.act(g)
        if self._all_zero or (self.prefill_dense and g.dim() >= 2 and g.shape[-2] > 1):
            return a
        return torch.where(a.abs() > self.thresholds.to(a.device), a, torch.zeros((), dtype=a.dtype, device=a.device))

    def extra_repr(self) -> str:
        return f"features={self.features}, prefill_dense={self.prefill_dense}"


class CatsMLP(nn.Module):
    """A gated MLP ``down(act_fn(gate(x)) * up(x))`` with ``act_fn`` a :class:`CatsActivation`.

    Keeps the children (and so the qualified names) of the Hugging Face MLP it replaces. With the
    CATS thresholds at 0 it computes exactly that MLP. Sparsity accounting (``track_sparsity``): an
    up row is skipped iff its neuron is masked, so while CATS is active the up projection is
    credited with the masked fraction, not with the zeros of its input; down counts the zeros of
    its input h (exactly the masked neurons); gate counts its own input zeros (0 unless the MLP
    input is also sparsified).
    """

    def __init__(self, mlp: nn.Module, activation: str | None, backend: str = "auto"):
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, name):
                raise ActsparseError(f"{type(mlp).__name__} is not a gated MLP (no {name})")
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        act = mlp.act_fn
        if not isinstance(act, CatsActivation):
            act = CatsActivation(act, mlp.down_proj.in_features, device=mlp.down_proj.weight.device)
        self.act_fn = act
        self.activation = activation  # kernel activation name, or None: reference path only
        self.backend = backend
        self._original = (mlp,)  # the replaced module, restored by uninstall_cats_ (not a child)

    def _use_kernel(self, x: torch.Tensor) -> bool:
        if self.backend == "torch" or not x.is_cuda or self.activation is None or not self.act_fn.active:
            return False
        if self.act_fn.prefill_dense and x.dim() >= 2 and x.shape[-2] > 1:
            return False
        if any(getattr(m, "bias", None) is not None for m in (self.gate_proj, self.up_proj, self.down_proj)):
            return False
        return x.numel() // x.shape[-1] <= 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., D]
        act = self.act_fn
        if self._use_kernel(x):
            return self._forward_kernel(x)
        gate = self.gate_proj(x)  # gate: [..., F]
        a = act(gate)  # masked where |act(gate)| <= thresholds
        up_proj = self.up_proj
        credit_rows = act.active and getattr(up_proj, "track", False)
        if credit_rows:
            up_proj.track = False
        try:
            up = up_proj(x)
        finally:
            if credit_rows:
                up_proj.track = True
        if credit_rows:
            # rows of up read = neurons kept; a prefill-dense multi-token step skips nothing
            dense_step = act.prefill_dense and x.dim() >= 2 and x.shape[-2] > 1
            skipped = torch.zeros_like(a, dtype=torch.bool) if dense_step else (a == 0)
            up_proj.zeros = up_proj.zeros + skipped.sum()
            up_proj.seen += skipped.numel()
        return self.down_proj(a * up)

    def _forward_kernel(self, x: torch.Tensor) -> torch.Tensor:
        from .kernels.sparse_gemv import sparse_gemv
        from .kernels.sparse_mlp import sparse_gate_up

        x2 = x.reshape(-1, x.shape[-1])  # [B, D]
        gate = self.gate_proj
        if isinstance(gate, SparseLinear) and not gate._all_zero:  # optional MLP-input sparsity
            x2 = torch.where(x2.abs() > gate.thresholds, x2, torch.zeros((), dtype=x2.dtype, device=x2.device))
        h = sparse_gate_up(x2.contiguous(), gate.weight, self.up_proj.weight, self.act_fn.thresholds, self.activation)
        down = self.down_proj
        if getattr(down, "_weight_t", None) is None or down._weight_t.device != x.device:
            w_t = down.weight.detach().t().contiguous()  # [F, D]: a skipped neuron skips one contiguous row
            if isinstance(down, SparseLinear):
                down._weight_t = w_t
        else:
            w_t = down._weight_t
        y = sparse_gemv(h, w_t, None)  # [B, D]
        return y.view(*x.shape[:-1], y.shape[-1])


def _kernel_activation(model: nn.Module) -> str | None:
    cfg = model.config
    name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
    return KERNEL_ACTIVATIONS.get(str(name))


def install_cats_(model: nn.Module, prefill_dense: bool | None = None, backend: str | None = None) -> list[int]:
    """Replace every block's MLP by a :class:`CatsMLP` (thresholds 0); return the blocks changed.

    Idempotent; ``None`` settings leave MLPs already swapped untouched.
    """
    _, layers = decoder_layers(model)
    activation = _kernel_activation(model)
    installed = []
    acts = set()
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        if isinstance(mlp, CatsMLP):
            if prefill_dense is not None:
                mlp.act_fn.prefill_dense = prefill_dense
            if backend is not None:
                mlp.backend = backend
        else:
            if not isinstance(getattr(mlp, "act_fn", None), nn.Module):
                raise ActsparseError(f"block {i}: the MLP activation is not a module; CATS needs one to hook")
            if id(mlp.act_fn) in acts:
                raise ActsparseError("the MLP activation module is shared between blocks; CATS needs one per block")
            new = CatsMLP(mlp, activation if type(mlp.act_fn).__module__.startswith(("transformers", "torch"))
                          else None, backend=backend or "auto")
            new.act_fn.prefill_dense = bool(prefill_dense)
            layer.mlp = new
            installed.append(i)
        acts.add(id(layer.mlp.act_fn.act))
    return installed


def uninstall_cats_(model: nn.Module, blocks: list[int] | None = None) -> None:
    """Put the original MLP modules back (with the current, possibly densified, linears)."""
    _, layers = decoder_layers(model)
    for i, layer in enumerate(layers):
        mlp = layer.mlp
        if not isinstance(mlp, CatsMLP) or (blocks is not None and i not in blocks):
            continue
        original = mlp._original[0]
        original.gate_proj, original.up_proj, original.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        original.act_fn = mlp.act_fn.act
        layer.mlp = original


@dataclass
class CatsConfig:
    """CATS on the MLP (cut on ``|act(gate)|``) plus input sparsity on q/k/v and o.

    ``input_criterion`` picks the input-sparsity criterion of the other sites: "magnitude" (TEAL)
    gives criterion ``cats``, "wina" gives ``cats_wina``. Model-wide ``sparsity`` counts the gate
    as read in full, so CATS tops out near ``0.99 * (1 - gate bytes / all bytes)`` (0.74 on
    SmolLM2-135M). Same sources of thresholds as :class:`~actsparse.sparsify.TealConfig`.
    """

    sparsity: float = 0.5
    allocation: str = "greedy"
    input_criterion: str = "magnitude"
    calibration: object = None
    thresholds: object = None
    prefill_dense: bool = False
    backend: str = "auto"

    def __post_init__(self):
        if self.input_criterion not in ("magnitude", "wina"):
            raise ActsparseError(f"input_criterion must be 'magnitude' or 'wina', got '{self.input_criterion}'")
        if self.backend not in BACKENDS:
            raise ActsparseError(f"backend must be one of {BACKENDS}, got '{self.backend}'")
        self.as_teal()  # validates the rest

    @property
    def criterion(self) -> str:
        return "cats" if self.input_criterion == "magnitude" else "cats_wina"

    def as_teal(self):
        from .sparsify import TealConfig

        return TealConfig(sparsity=self.sparsity, allocation=self.allocation, criterion=self.criterion,
                          calibration=self.calibration, thresholds=self.thresholds,
                          prefill_dense=self.prefill_dense, backend=self.backend)


@register_transform(CatsConfig)
def _cats(model: nn.Module, config: CatsConfig) -> nn.Module:
    from .sparsify import sparsify_

    return sparsify_(model, config.as_teal())


__all__ = ["CatsActivation", "CatsConfig", "CatsMLP", "activation_module", "activation_name", "install_cats_",
           "uninstall_cats_"]
