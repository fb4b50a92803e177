"""Sparsification criteria: which statistic is thresholded, and how a threshold maps back to |x|.

A criterion ranks the input channels of a site by a *score*; the ``s`` fraction with the lowest
scores is zeroed. Every criterion here scores ``|x_i| * c_i`` with a per-channel scale ``c`` fixed at
calibration time, so at run time it is still one comparison ``|x_i| > t / c_i``: the scale is folded
into the per-channel threshold buffer of :class:`actsparse.sparsify.SparseLinear`.

* ``magnitude`` (TEAL): c = 1.

Criteria register themselves with :func:`register_criterion`; calibration records the histograms a
criterion asks for, and :func:`site_thresholds` turns a target sparsity into thresholds.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .errors import ActsparseError
from .models import InputSite

_CRITERIA: dict[str, "Criterion"] = {}


def register_criterion(cls):
    _CRITERIA[cls.name] = cls()
    return cls


def get_criterion(name: str) -> "Criterion":
    if name not in _CRITERIA:
        raise ActsparseError(f"unknown criterion '{name}' (choose from {', '.join(sorted(_CRITERIA))})")
    return _CRITERIA[name]


def available_criteria() -> list[str]:
    return sorted(_CRITERIA)


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


@register_criterion
class Magnitude(Criterion):
    """TEAL: zero the inputs with the smallest |x|."""

    name = "magnitude"
    stat = "abs"
