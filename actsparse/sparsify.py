"""``sparsify_(model, config)``: swap the decoder's linear layers for activation-sparse ones.

At batch 1 decoding reads every weight once per token, so time is bytes. An input element that is
zero makes a whole weight column useless; :class:`SparseLinear` zeroes the inputs whose magnitude is
at or below a per-channel threshold (a registered buffer, so it travels with ``state_dict`` and
safetensors). On the reference ("torch") backend this saves no time; it reproduces exactly what the
sparse kernels compute, on any device, so quality can be measured anywhere.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ActsparseError
from .models import decoder_layers, input_sites

BACKENDS = ("auto", "torch", "triton")


def load_threshold_buffer(buffer: torch.Tensor, thresholds: torch.Tensor | float, what: str) -> bool:
    """Check and copy thresholds (a scalar or [n]) into ``buffer`` [n]; return whether all are zero."""
    n = buffer.shape[0]
    t = torch.as_tensor(thresholds, dtype=torch.float32).to(buffer.device)
    t = t.expand(n) if t.dim() == 0 else t
    if t.shape != (n,):
        raise ActsparseError(f"thresholds of shape {tuple(t.shape)} for {what.format(n=n)}")
    if bool((t < 0).any()) or not bool(torch.isfinite(t).all()):
        raise ActsparseError("thresholds must be finite and >= 0")
    buffer.copy_(t)
    return bool((t == 0).all())


class SparseLinear(nn.Module):
    """``y = W (x * [|x| > thresholds]) + b``; thresholds: [in_features] fp32 buffer."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 prefill_dense: bool = False, backend: str = "auto"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.register_buffer("thresholds", torch.zeros(in_features, device=device, dtype=torch.float32))
        self.prefill_dense = prefill_dense
        self.backend = backend
        self.track = False
        self.zeros = 0  # inputs zeroed since the last reset (when track is on)
        self.seen = 0
        self._all_zero = True
        self._weight_t = None  # [K, N] copy for the triton GEMV, made on first use

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "SparseLinear":
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta", **kwargs)
        mod.weight = linear.weight  # shared, not copied
        mod.bias = linear.bias
        mod.thresholds = torch.zeros(linear.in_features, device=linear.weight.device, dtype=torch.float32)
        return mod

    def set_thresholds(self, thresholds: torch.Tensor | float) -> None:
        self._all_zero = load_threshold_buffer(self.thresholds, thresholds, "a layer with {n} inputs")

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._all_zero = bool((self.thresholds == 0).all())

    def _use_triton(self, x: torch.Tensor) -> bool:
        if self.backend == "torch" or not x.is_cuda:
            if self.backend == "triton" and not x.is_cuda:
                raise ActsparseError("backend 'triton' needs CUDA tensors; use backend 'torch' on the CPU")
            return False
        tokens = x.numel() // x.shape[-1]
        return tokens <= 8 and self.bias is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., K]
        if self.prefill_dense and x.dim() >= 2 and x.shape[-2] > 1:
            return F.linear(x, self.weight, self.bias)
        if self.track:
            keep = x.abs() > self.thresholds
            self.zeros = self.zeros + (~keep).sum()  # a device tensor: no sync on the hot path
            self.seen += keep.numel()
        if self._all_zero:  # sparsity 0: exactly the dense layer
            return F.linear(x, self.weight, self.bias)
        if self._use_triton(x):
            from .kernels.sparse_gemv import sparse_gemv

            if self._weight_t is None or self._weight_t.device != x.device:
                self._weight_t = self.weight.detach().t().contiguous()
            y = sparse_gemv(x.reshape(-1, self.in_features), self._weight_t, self.thresholds)
            return y.view(*x.shape[:-1], self.out_features)
        x = torch.where(x.abs() > self.thresholds, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, prefill_dense={self.prefill_dense}, backend={self.backend}")


@dataclass
class TealConfig:
    """Training-free activation sparsity (TEAL) and its weight-aware variants.

    Give either ``thresholds`` (a dict or a thresholds file) or a ``calibration`` (a
    :class:`~actsparse.calibrate.Calibration` or its file) from which thresholds for ``sparsity``
    are computed with ``allocation`` ("uniform": every site at ``sparsity``; "greedy": TEAL's
    block-wise allocation) and ``criterion``.
    """

    sparsity: float = 0.5
    allocation: str = "greedy"
    criterion: str = "magnitude"
    calibration: object = None
    thresholds: object = None
    prefill_dense: bool = False  # keep prompt processing dense, sparsify decode only
    backend: str = "auto"

    def __post_init__(self):
        from .criteria import get_criterion

        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= self.sparsity < 1.0:
            raise ActsparseError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.allocation not in ("uniform", "greedy"):
            raise ActsparseError(f"allocation must be 'uniform' or 'greedy', got '{self.allocation}'")
        if self.backend not in BACKENDS:
            raise ActsparseError(f"backend must be one of {BACKENDS}, got '{self.backend}'")
        get_criterion(self.criterion)


_TRANSFORMS: dict[type, Callable] = {}


def register_transform(config_type: type):
    """torchao-style registry: config type -> function(model, config) applied by :func:`sparsify_`."""

    def deco(fn):
        _TRANSFORMS[config_type] = fn
        return fn

    return deco


def sparsify_(model: nn.Module, config) -> nn.Module:
    """Sparsify ``model`` in place according to ``config`` and return it."""
    fn = _TRANSFORMS.get(type(config))
    if fn is None:
        raise ActsparseError(f"no sparsify transform for {type(config).__name__}")
    return fn(model, config)


def swap_linears_(model: nn.Module, prefill_dense: bool = False, backend: str = "auto") -> dict[str, SparseLinear]:
    """Replace every linear of the decoder blocks by a :class:`SparseLinear` (thresholds 0)."""
    swapped = {}
    for site in input_sites(model):
        for name in site.linears:
            mod = model.get_submodule(name)
            if isinstance(mod, SparseLinear):
                mod.prefill_dense, mod.backend = prefill_dense, backend
            elif isinstance(mod, nn.Linear):
                mod = SparseLinear.from_linear(mod, prefill_dense=prefill_dense, backend=backend)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, mod)
            else:
                raise ActsparseError(f"{name} is a {type(mod).__name__}, expected nn.Linear")
            swapped[name] = mod
    return swapped


def densify_(model: nn.Module) -> nn.Module:
    """Undo :func:`swap_linears_`: put plain ``nn.Linear`` modules back (weights shared)."""
    for name, mod in list(model.named_modules()):
        if isinstance(mod, SparseLinear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None, device="meta")
            lin.weight, lin.bias = mod.weight, mod.bias
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
    return model


def sparse_linears(model: nn.Module) -> dict[str, SparseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def threshold_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module a threshold set addresses: the SparseLinears and the gate-threshold modules
    (CATS, ``actsparse.gated.CatsActivation``: an absent entry there means off, i.e. 0)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, SparseLinear) or getattr(m, "is_gate_threshold", False)}


def apply_thresholds_(model: nn.Module, thresholds: dict[str, torch.Tensor]) -> None:
    """Load a threshold set into the model's :class:`SparseLinear` modules (every one must be named)."""
    mods = sparse_linears(model)
    if not mods:
        raise ActsparseError("model has no SparseLinear layers: call sparsify_ first")
    missing = sorted(set(mods) - set(thresholds))
    if missing:
        raise ActsparseError(f"thresholds missing for {len(missing)} layers, e.g. {missing[0]}")
    for name, mod in mods.items():
        mod.set_thresholds(thresholds[name])
    gates = {n: m for n, m in threshold_modules(model).items() if n not in mods}
    for name, mod in gates.items():
        mod.set_thresholds(thresholds.get(name, 0.0))
    stray = [k for k in thresholds if k not in mods and k not in gates]
    if stray:
        named = dict(model.named_modules())
        if any(k in named for k in stray):
            raise ActsparseError(
                f"thresholds for {stray[0]}, which holds none: install the modules of the set's criterion first "
                "(sparsify_ with its config)")


def zero_thresholds(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: torch.zeros(m.in_features) for n, m in sparse_linears(model).items()}


@register_transform(TealConfig)
def _teal(model: nn.Module, config: TealConfig) -> nn.Module:
    from .calibrate import Calibration
    from .thresholds import compute_thresholds, load_thresholds

    from .criteria import get_criterion

    decoder_layers(model)  # fails clearly on an unsupported model
    criterion = config.criterion
    if config.thresholds is not None:
        thresholds = config.thresholds
        if not isinstance(thresholds, dict):
            thresholds, meta = load_thresholds(thresholds, model=model)
            criterion = meta.get("criterion", criterion)
    elif config.calibration is not None:
        from .rotate import prepare_model_

        calib = config.calibration
        if not isinstance(calib, Calibration):
            calib = Calibration.load(calib)
        prepare_model_(model, calib)  # applies the calibration's rotation, if any, then checks the model
        thresholds = compute_thresholds(model, calib, config.sparsity, config.allocation, config.criterion).thresholds
    elif config.sparsity == 0:
        thresholds = None
    else:
        raise ActsparseError("TealConfig needs a calibration or thresholds for sparsity > 0")
    get_criterion(criterion).install_(model, prefill_dense=config.prefill_dense, backend=config.backend)
    if thresholds is not None:
        apply_thresholds_(model, thresholds)
    return model


@dataclass
class SparsityStats:
    """Achieved sparsity: per linear, per input site, and model-wide (weighted by weight elements)."""

    per_linear: dict[str, float]
    per_site: dict[str, float]
    model_wide: float
    weights: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"model_wide": self.model_wide, "per_site": self.per_site}


@contextlib.contextmanager
def track_sparsity(model: nn.Module):
    """Count zeroed inputs of every SparseLinear inside the block; yields a callable -> SparsityStats."""
    mods = sparse_linears(model)
    for m in mods.values():
        m.track, m.zeros, m.seen = True, 0, 0
    site_of = {lin: site for site in input_sites(model) for lin in site.linears}

    def report() -> SparsityStats:
        per_linear = {n: (float(m.zeros) / m.seen if m.seen else 0.0) for n, m in mods.items()}
        weights = {n: m.weight.numel() for n, m in mods.items()}
        per_site: dict[str, list] = {}
        for n, frac in per_linear.items():
            s = site_of[n]
            per_site.setdefault(s.name, [frac, 0])[1] += weights[n]
        total = sum(weights.values())
        model_wide = sum(per_linear[n] * weights[n] for n in mods) / total if total else 0.0
        return SparsityStats(per_linear, {k: v[0] for k, v in per_site.items()}, model_wide, weights)

    try:
        yield report
    finally:
        for m in mods.values():
            m.track = False
