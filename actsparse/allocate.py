"""TEAL's greedy block-wise sparsity allocation.

Sites differ in how much zeroing their inputs hurts: the input of ``down`` tolerates far more
sparsity than that of ``o`` in most models. For each decoder block independently, starting from
all-dense, we repeatedly try raising each site's sparsity by the amount that skips the same number
of weight elements, keep the candidate whose block output is closest (MSE) to the dense block
output on calibration tokens, and record the path. Reading the path at the model-wide levels
0, 0.05, ..., 0.9 gives a table; at each level we keep the greedy allocation only if its error is
no larger than the uniform allocation's (so the table never does worse than uniform on this
objective at those levels).
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ActsparseError
from .models import SITES, decoder_layers, input_sites
from .sparsify import threshold_modules

MAX_SITE_SPARSITY = 0.99


class BlockIO:
    """Inputs (args, kwargs) and dense outputs of every decoder block on a few calibration sequences."""

    def __init__(self):
        self.calls: dict[int, tuple[tuple, dict]] = {}
        self.outputs: dict[int, torch.Tensor] = {}


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def capture_block_io(model: nn.Module, input_ids: torch.Tensor) -> BlockIO:
    _, layers = decoder_layers(model)
    io = BlockIO()
    handles = []
    for i, layer in enumerate(layers):
        def pre(mod, args, kwargs, i=i):
            io.calls[i] = (tuple(a for a in args), dict(kwargs))

        def post(mod, args, kwargs, out, i=i):
            io.outputs[i] = _first(out).detach().clone()

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    try:
        model(input_ids=input_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return io


def _weighted(sparsity: list[float], weights: list[int], total: int | None = None) -> float:
    return sum(s * w for s, w in zip(sparsity, weights)) / (total or sum(weights))


@torch.no_grad()
def greedy_allocation(model: nn.Module, block_io: BlockIO, calib, criterion, levels: list[float],
                      step: float = 0.025, progress: bool = True) -> torch.Tensor:
    """Per-site sparsity table [len(levels), blocks, 4] (site order: ``models.SITES``)."""
    saved = {n: m.thresholds.clone() for n, m in threshold_modules(model).items()}
    undo = criterion.install_(model)  # SparseLinears (and e.g. CATS MLPs) if missing
    mods = threshold_modules(model)
    _, layers = decoder_layers(model)
    sites = input_sites(model)
    by_block: dict[int, list] = {}
    for s in sites:
        by_block.setdefault(s.layer, []).append(s)

    table = torch.zeros(len(levels), len(layers), len(SITES))
    try:
        for m in mods.values():
            m.set_thresholds(0.0)
        bar = tqdm(total=len(layers), desc=f"greedy ({criterion.name})", unit="block", disable=not progress)
        for i, layer in enumerate(layers):
            block_sites = sorted(by_block[i], key=lambda s: SITES.index(s.site))
            weights = [criterion.site_weight(s) for s in block_sites]  # elements skipped per unit sparsity
            total_w = sum(s.weight_numel for s in block_sites)  # every element of the block
            args, kwargs = block_io.calls[i]
            target = block_io.outputs[i]
            scale = target.float().pow(2).mean().clamp_min(1e-30)
            cache: dict[tuple[str, float], torch.Tensor] = {}

            def thresholds_for(site, s):
                key = (site.name, round(s, 6))
                if key not in cache:
                    cache[key] = criterion.site_thresholds(calib, site, s)
                return cache[key]

            def error(alloc: list[float]) -> float:
                for site, s in zip(block_sites, alloc):
                    for name, t in criterion.threshold_entries(site, thresholds_for(site, s)).items():
                        mods[name].set_thresholds(t)
                out = _first(layer(*args, **kwargs))
                return float((out.float() - target.float()).pow(2).mean() / scale)

            alloc = [0.0] * len(block_sites)
            path = [(0.0, list(alloc))]
            while _weighted(alloc, weights, total_w) < levels[-1] - 1e-9:
                best = None
                for j, w in enumerate(weights):
                    if alloc[j] >= MAX_SITE_SPARSITY or w == 0:
                        continue
                    cand = list(alloc)
                    cand[j] = min(MAX_SITE_SPARSITY, alloc[j] + step * total_w / w)
                    err = error(cand)
                    if best is None or err < best[0]:
                        best = (err, cand)
                if best is None:
                    break
                alloc = best[1]
                path.append((_weighted(alloc, weights, total_w), list(alloc)))

            for li, level in enumerate(levels):
                greedy = _interpolate(path, level)
                try:
                    per_site = criterion.uniform_allocation(block_sites, level)
                    uniform = [per_site[s.name] for s in block_sites]
                except ActsparseError:  # beyond the criterion's reach
                    uniform = None
                if level > 0 and uniform is not None and error(uniform) < error(greedy):
                    greedy = uniform
                table[li, i] = torch.tensor(greedy)
            bar.update(1)
        bar.close()
    finally:
        for n, m in mods.items():
            if n in saved:
                m.set_thresholds(saved[n])
        undo()
    return table


def _interpolate(path: list[tuple[float, list[float]]], level: float) -> list[float]:
    """Allocation on the greedy path at block sparsity ``level`` (linear between steps)."""
    if level <= path[0][0]:
        return list(path[0][1])
    for (s0, a0), (s1, a1) in zip(path, path[1:]):
        if s0 <= level <= s1:
            w = 0.0 if s1 == s0 else (level - s0) / (s1 - s0)
            return [x0 + w * (x1 - x0) for x0, x1 in zip(a0, a1)]
    return list(path[-1][1])
