"""Sparsification criteria: which statistic is thresholded, and how a threshold maps back to |x|.

A criterion ranks the input channels of a site by a *score*; the ``s`` fraction with the lowest
scores is zeroed. The input-sparsity criteria here score ``|x_i| * c_i`` with a per-channel scale
``c`` fixed at calibration time, so at run time it is still one comparison ``|x_i| > t / c_i``: the
scale is folded into the per-channel threshold buffer of :class:`actsparse.sparsify.SparseLinear`.

* ``magnitude`` (TEAL): c = 1.
* ``wina`` (WINA, weight-informed): c_i = the norm of column i of every weight the site feeds
  (``sqrt(sum over linears of ||W[:, i]||^2)`` for q/k/v and gate/up), because zeroing x_i changes
  the site's concatenated output by exactly ``|x_i| * c_i`` (see :class:`Wina`).
* ``cats``, ``cats_wina`` (CATS, gate-aware): the MLP is sparsified on its *output* side,
  ``|act(gate(x))| > t`` skips the matching rows of up and columns of down
  (:mod:`actsparse.gated`); q/k/v and o keep input sparsity with ``magnitude`` / ``wina``.
  ``cats_gate`` also sparsifies the MLP input (magnitude) for the gate.

Criteria register themselves with :func:`register_criterion`; calibration records the histograms a
criterion asks for, and :meth:`Criterion.site_thresholds` turns a site sparsity into thresholds.

Besides scoring, a criterion answers the questions that differ between criteria and that the
allocation and threshold code (``allocate.py``, ``thresholds.py``) ask it:

* :meth:`~Criterion.site_weight`: weight elements skipped per unit of a site's sparsity (CATS: the
  ``down`` site skips up rows *and* down columns, ``gate_up`` skips nothing: gate is read in full);
* :meth:`~Criterion.uniform_allocation`: the per-site sparsities of "uniform" at a model-wide target;
* :meth:`~Criterion.threshold_entries`: which modules a site's thresholds go to;
* :meth:`~Criterion.install_`: the module swaps the criterion needs (SparseLinear; CATS also swaps
  the MLP).

:func:`quality_methods` lists every method (criterion x allocation x rotation) by name, for
benchmark loops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .errors import ActsparseError
from .models import InputSite

_CRITERIA: dict[str, "Criterion"] = {}

MAX_SITE_SPARSITY = 0.99  # same cap as the greedy allocation


def register_criterion(cls):
    _CRITERIA[cls.name] = cls()
    return cls


def get_criterion(name: str) -> "Criterion":
    if name not in _CRITERIA:
        raise ActsparseError(f"unknown criterion '{name}' (choose from {', '.join(sorted(_CRITERIA))})")
    return _CRITERIA[name]


def available_criteria() -> list[str]:
    return sorted(_CRITERIA)


def _noop() -> None:
    return None


class Criterion:
    """Base: magnitude-style criteria with an optional per-channel scale per site."""

    name = "base"
    stat = "abs"  # histogram key suffix

    def prepare(self, model: nn.Module, sites: list[InputSite]) -> dict[str, torch.Tensor]:
        """Tensors computed once from the weights (saved in the calibration file as extras)."""
        return {}

    def channel_scale(self, site: InputSite, extras: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Per-channel score scale c [K] (None = 1)."""
        return None

    def recorders(self, model: nn.Module, sites: list[InputSite], extras: dict[str, torch.Tensor]
                  ) -> list[tuple[nn.Module, str, Callable]]:
        """(module, histogram key, fn(args, output) -> values) hooks that feed the histograms."""
        out = []
        for site in sites:
            scale = self.channel_scale(site, extras)
            module = model.get_submodule(site.linears[0])
            if scale is None:
                fn = lambda args, output: args[0]  # noqa: E731
            else:
                fn = lambda args, output, c=scale: args[0] * c.to(args[0].device, args[0].dtype)  # noqa: E731
            out.append((module, f"{site.name}/{self.stat}", fn))
        return out

    def site_thresholds(self, calib, site: InputSite, sparsity: float) -> torch.Tensor:
        """Per-channel thresholds [K] (fp32) that zero a fraction ``sparsity`` of the site's inputs."""
        t = calib.quantile(site, self.stat, sparsity)
        scale = self.channel_scale(site, calib.extras)
        if scale is None:
            return torch.full((site.in_features,), t, dtype=torch.float32)
        return (t / scale.float().clamp_min(1e-12)).to(torch.float32)

    # -- what allocation and threshold code asks (defaults: input sparsity on every linear) ------
    def site_weight(self, site: InputSite) -> int:
        """Weight elements skipped per unit of the site's sparsity (model-wide accounting)."""
        return site.weight_numel

    def uniform_allocation(self, sites: list[InputSite], sparsity: float) -> dict[str, float]:
        """Per-site sparsities of the "uniform" allocation at model-wide ``sparsity``."""
        return {s.name: float(sparsity) for s in sites}

    def threshold_entries(self, site: InputSite, thresholds: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{module qualified name: thresholds}`` a site's thresholds turn into in a threshold set."""
        return {name: thresholds.clone() for name in site.linears}

    def install_(self, model: nn.Module, prefill_dense: bool | None = None,
                 backend: str | None = None) -> Callable[[], None]:
        """Swap in the modules this criterion's thresholds act on; return a function that undoes it.

        ``None`` settings keep the modules already there untouched (and give new ones the defaults).
        """
        from .sparsify import densify_, sparse_linears, swap_linears_

        had = bool(sparse_linears(model))
        if had and prefill_dense is None and backend is None:
            return _noop
        swap_linears_(model, prefill_dense=bool(prefill_dense), backend=backend or "auto")
        return _noop if had else (lambda: densify_(model))


@register_criterion
class Magnitude(Criterion):
    """TEAL: zero the inputs with the smallest |x|."""

    name = "magnitude"
    stat = "abs"


def column_norms(model: nn.Module, site: InputSite) -> torch.Tensor:
    """c [K] fp32: ``sqrt(sum over the linears fed by the site of ||W[:, k]||^2)``."""
    sq = None
    for name in site.linears:
        w = model.get_submodule(name).weight.detach().float()  # [N, K]
        part = w.pow(2).sum(0)
        sq = part if sq is None else sq + part
    return sq.sqrt().cpu()


@register_criterion
class Wina(Criterion):
    """WINA: zero the inputs with the smallest ``|x_k| * ||W[:, k]||``.

    Zeroing x_k removes ``x_k * W[:, k]`` from the output, an error of norm ``|x_k| ||W[:, k]||``;
    TEAL ranks by ``|x_k|`` alone, so an input feeding small weights is kept at the expense of one
    feeding large weights. For inputs shared by several linears (q/k/v; gate/up) the output that
    skipping the column affects is the concatenation ``[q; k; v]``, whose column norm is
    ``sqrt(||Wq[:, k]||^2 + ||Wk[:, k]||^2 + ||Wv[:, k]||^2)``: the same combination also weights
    each linear by its size, as the model-wide byte accounting does (GQA's smaller k/v count less).
    The scale is folded into per-channel thresholds ``t / c_k``, so the run time is unchanged.
    """

    name = "wina"
    stat = "wina"

    def prepare(self, model: nn.Module, sites: list[InputSite]) -> dict[str, torch.Tensor]:
        return {f"wina/{site.name}": column_norms(model, site) for site in sites}

    def channel_scale(self, site: InputSite, extras: dict[str, torch.Tensor]) -> torch.Tensor:
        key = f"wina/{site.name}"
        if key not in extras:
            raise ActsparseError(f"calibration has no WINA column norms for {site.name}; calibrate with 'wina'")
        return extras[key]


class Cats(Criterion):
    """CATS: threshold ``|act(gate(x))|`` per neuron; input sparsity elsewhere.

    The ``down`` site's sparsity is the fraction of neurons whose ``|act(gate)|`` is at or below the
    threshold; such a neuron's up row and down column are skipped, so the site skips
    ``2 * weight_numel(down)`` elements per unit. The gate is read in full (its output decides), so
    ``gate_up`` skips nothing unless ``gate_input`` also sparsifies the MLP input (criterion
    ``cats_gate``): then the gate's skipped columns are counted, and up (whose kept rows are read in
    full) is not. The fused ``sparse_gate_up`` kernel reads gate rows in full, so those gate savings
    need a column-skipping gate GEMV to be real. q/k/v and o use ``input_criterion``.
    """

    stat = "cats"

    def __init__(self, name: str = "cats", input_criterion: str = "magnitude", gate_input: bool = False):
        self.name = name
        self.input_name = input_criterion
        self.gate_input = gate_input

    @property
    def input(self) -> Criterion:
        return get_criterion(self.input_name)

    def _input_sites(self, sites: list[InputSite]) -> list[InputSite]:
        keep = ("qkv", "o", "gate_up") if self.gate_input else ("qkv", "o")
        return [s for s in sites if s.site in keep]

    def prepare(self, model, sites):
        return self.input.prepare(model, self._input_sites(sites))

    def channel_scale(self, site, extras):
        return None if site.site == "down" else self.input.channel_scale(site, extras)

    def recorders(self, model, sites, extras):
        from .gated import activation_module

        out = self.input.recorders(model, self._input_sites(sites), extras)
        for site in sites:
            if site.site == "down":
                act = activation_module(model, site)  # pre-mask act(gate), also when CATS is installed
                out.append((act, f"{site.name}/{self.stat}", lambda args, output: output))
        return out

    def site_thresholds(self, calib, site, sparsity):
        if site.site == "down":
            t = calib.quantile(site, self.stat, sparsity)
            return torch.full((site.in_features,), t, dtype=torch.float32)
        if site.site == "gate_up" and not self.gate_input:
            if sparsity > 0:
                raise ActsparseError(f"criterion '{self.name}' keeps the MLP input dense (gate_up sparsity must be 0)")
            return torch.zeros(site.in_features, dtype=torch.float32)
        return self.input.site_thresholds(calib, site, sparsity)

    def site_weight(self, site):
        if site.site == "down":
            return 2 * site.weight_numel  # up row + down column per neuron (both [F, D] sized)
        if site.site == "gate_up":
            return site.weight_numel // 2 if self.gate_input else 0  # gate only
        return site.weight_numel

    def uniform_allocation(self, sites, sparsity):
        skippable = sum(self.site_weight(s) for s in sites)
        total = sum(s.weight_numel for s in sites)
        level = sparsity * total / skippable
        if level > MAX_SITE_SPARSITY + 1e-9:
            raise ActsparseError(
                f"criterion '{self.name}' cannot reach model-wide sparsity {sparsity:g}: the gate is read in "
                f"full, so at most {MAX_SITE_SPARSITY * skippable / total:.3f}"
            )
        return {s.name: (level if self.site_weight(s) > 0 else 0.0) for s in sites}

    def threshold_entries(self, site, thresholds):
        if site.site != "down":
            return {name: thresholds.clone() for name in site.linears}
        from .gated import activation_name

        # down keeps every nonzero input (h is exactly 0 at masked neurons); the cut is on act(gate)
        return {site.linears[0]: torch.zeros_like(thresholds), activation_name(site): thresholds.clone()}

    def install_(self, model, prefill_dense=None, backend=None):
        from .gated import install_cats_, uninstall_cats_
        from .sparsify import densify_, sparse_linears, swap_linears_

        had = bool(sparse_linears(model))
        if not had or prefill_dense is not None or backend is not None:
            swap_linears_(model, prefill_dense=bool(prefill_dense), backend=backend or "auto")
        installed = install_cats_(model, prefill_dense=prefill_dense, backend=backend)

        def undo():
            uninstall_cats_(model, installed)
            if not had:
                densify_(model)

        return undo


for _name, _input, _gate_input in (("cats", "magnitude", False), ("cats_wina", "wina", False),
                                   ("cats_gate", "magnitude", True)):
    _CRITERIA[_name] = Cats(_name, _input, _gate_input)


# -- named methods for quality benchmarks ---------------------------------------------------------
ROTATIONS = ("", "heads", "full")  # none; attention heads only; residual stream + heads


@dataclass(frozen=True)
class QualityMethod:
    """One point of the quality comparison: a criterion, an allocation, and a rotation (or none).

    ``rotation``: "" (none), "heads" (per-KV-group PCA of the attention output, folded into v/o) or
    "full" (also the PCA of the residual stream). A rotated model is a different model: it needs its
    own calibration (:func:`actsparse.rotate.calibrate_rotated` with :meth:`rotation_config`).
    """

    name: str
    criterion: str
    allocation: str = "greedy"
    rotation: str = ""

    def rotation_config(self, tokens: int = 16384, seq_len: int = 1024):
        """The :class:`~actsparse.rotate.RotationConfig` of this method, or None."""
        if not self.rotation:
            return None
        from .rotate import RotationConfig

        return RotationConfig(tokens=tokens, seq_len=seq_len, residual=self.rotation == "full", heads=True)


def quality_methods(rotation: bool = True) -> list[QualityMethod]:
    """Every method of the criteria comparison, TEAL first (its baseline).

    Names: ``<criterion>-<allocation>``, prefixed ``rotheads-`` / ``rot-`` for the heads-only /
    full rotation, e.g. ``teal-greedy``, ``wina-greedy``, ``rotheads-wina-greedy``, ``cats-greedy``.
    Group them by ``rotation``: one model and one calibration (holding every criterion of the group)
    serve each group.
    """
    out = [QualityMethod("teal-greedy", "magnitude"), QualityMethod("teal-uniform", "magnitude", "uniform"),
           QualityMethod("wina-greedy", "wina"), QualityMethod("wina-uniform", "wina", "uniform"),
           QualityMethod("cats-greedy", "cats"), QualityMethod("cats_wina-greedy", "cats_wina")]
    if rotation:
        for prefix, kind in (("rotheads-", "heads"), ("rot-", "full")):
            out += [QualityMethod(prefix + "teal-greedy", "magnitude", rotation=kind),
                    QualityMethod(prefix + "wina-greedy", "wina", rotation=kind)]
    for m in out:
        if m.rotation not in ROTATIONS:
            raise ActsparseError(f"unknown rotation '{m.rotation}'")
    return out


__all__ = ["Cats", "Criterion", "Magnitude", "QualityMethod", "Wina", "available_criteria", "column_norms",
           "get_criterion", "quality_methods", "register_criterion"]
