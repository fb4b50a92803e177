"""Choosing the FATReLU threshold on calibration text (the last step of ProSparse).

After ReLU + L1 training most of ``a = relu(gate(x))`` is zero, and many of the survivors are tiny.
Raising the cut from 0 to T drops those too. Two rules, both measured on *held-out calibration*
text (never the evaluation text):

* ``max_ppl_increase=tol``: the largest T whose perplexity is at most ``(1 + tol)`` times the
  perplexity at T = 0. T is searched through the sparsity it gives: candidate sparsity levels are
  bisected between the ReLU sparsity and 1, each mapped to T by the quantile of sampled activations;
  this assumes perplexity grows with T (it does in practice; the search keeps the best T that
  passed, so a non-monotone bump can only make it conservative).
* ``target_sparsity=s``: the smallest T whose sampled quantile reaches sparsity ``s``; if the
  sparsity measured on the text falls short, the aim is raised by the shortfall and tried again
  (``target_retries`` times). Perplexity is reported, not constrained.

How a model-wide sparsity is shared between layers (``allocation``):

* ``"uniform"`` (ProSparse): one T for every layer;
* ``"equal"``: each layer gets the T that reaches the same sparsity in that layer (activation scales
  differ between layers);
* ``"sensitivity"``: layers differ in how much a cut costs, so each layer's cost is measured alone.
  For every layer and every sparsity level of a grid (``sensitivity_step`` apart, from the layer's
  ReLU sparsity up), the held-out loss is measured with only that layer cut; then levels are
  handed out greedily, each time to the layer whose next level adds the least loss per point of
  sparsity, until the layers' mean reaches the target. Costs are assumed additive across layers;
  the final thresholds are evaluated together, and that is the figure reported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ActsparseError
from .measure import ActivationTap, evaluate_relu, tokenize
from .modules import fat_thresholds, set_fat_thresholds_


ALLOCATIONS = ("uniform", "equal", "sensitivity")
MAX_LAYER_SPARSITY = 0.99


@dataclass
class FatThresholdConfig:
    """Rule for :func:`select_fat_threshold_`; set exactly one of the two targets."""

    max_ppl_increase: float | None = 0.01  # relative perplexity increase allowed vs T = 0
    target_sparsity: float | None = None  # fraction of zeros of act(gate(x)) to reach
    allocation: str = "uniform"  # "uniform" (one T), "equal" (same sparsity per layer), "sensitivity"
    context: int = 1024
    max_tokens: int = 32768
    search_steps: int = 8
    samples_per_call: int = 4096  # activation values sampled per layer per forward (for quantiles)
    target_retries: int = 3  # target_sparsity: re-aims while the measured sparsity falls short
    sensitivity_step: float = 0.03  # "sensitivity": spacing of the per-layer sparsity levels measured
    sensitivity_tokens: int = 8192  # "sensitivity": tokens per single-layer measurement (a prefix of the text)

    def __post_init__(self):
        if (self.max_ppl_increase is None) == (self.target_sparsity is None):
            raise ActsparseError("set exactly one of max_ppl_increase and target_sparsity")
        if self.max_ppl_increase is not None and not (0 <= self.max_ppl_increase < math.inf):
            raise ActsparseError(f"max_ppl_increase must be >= 0, got {self.max_ppl_increase}")
        if self.target_sparsity is not None and not (0 < self.target_sparsity < 1):
            raise ActsparseError(f"target_sparsity must be in (0, 1), got {self.target_sparsity}")
        if self.context < 2 or self.max_tokens < 2 or self.search_steps < 1 or self.samples_per_call < 1:
            raise ActsparseError("context, max_tokens >= 2; search_steps, samples_per_call >= 1")
        if self.allocation not in ALLOCATIONS:
            raise ActsparseError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        if self.target_retries < 0:
            raise ActsparseError(f"target_retries must be >= 0, got {self.target_retries}")
        if not (0 < self.sensitivity_step < 0.5) or self.sensitivity_tokens < 2:
            raise ActsparseError("sensitivity_step must be in (0, 0.5) and sensitivity_tokens >= 2")


@dataclass
class FatThresholdResult:
    thresholds: dict[str, float]  # per MLP activation (all equal with the "uniform" allocation)
    sparsity: float  # measured on the calibration text at the chosen thresholds
    perplexity: float
    base_sparsity: float  # at T = 0
    base_perplexity: float
    trials: list[dict] = field(default_factory=list)  # every (target, T, sparsity, ppl) tried
    # non-uniform allocations: each layer's sparsity at the chosen T, on the sampled activations
    layer_targets: dict[str, float] = field(default_factory=dict)
    sensitivity: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # "sensitivity": (level, loss increase)

    @property
    def threshold(self) -> float:
        """The single T (the largest, when per layer)."""
        return max(self.thresholds.values()) if self.thresholds else 0.0


def _quantile(values: torch.Tensor, q: float) -> float:
    values = values.sort().values
    return float(values[min(int(q * values.numel()), values.numel() - 1)])


def threshold_at_level(values: torch.Tensor, level: float) -> float:
    """T that zeroes a fraction `level` of the sampled activations (0 at or below the ReLU zeros)."""
    return max(_quantile(values, level), 0.0)


def greedy_levels(costs: dict[str, list[tuple[float, float]]], target: float) -> dict[str, float]:
    """Per-layer sparsity levels whose mean reaches `target` at a small summed cost.

    ``costs[name]`` lists (level, cost) pairs in increasing level, the first being the layer's
    starting point. The cost of a layer is made non-decreasing along its levels (measured costs
    are noisy); then, while the mean level is below `target`, the layer whose next level costs the
    least per point of sparsity gained moves up one level. Layers at their last level stay there;
    if every layer is at its last level the target is out of reach and the last levels are returned.
    """
    curves = {}
    for name, pairs in costs.items():
        best, curve = float("-inf"), []
        for level, cost in pairs:
            best = max(best, cost)
            curve.append((level, best))
        curves[name] = curve
    at = {name: 0 for name in curves}
    total = sum(c[0][0] for c in curves.values())
    n = len(curves)
    while total / n < target - 1e-12:
        step = None
        for name, curve in curves.items():
            i = at[name]
            if i + 1 < len(curve):
                (l0, c0), (l1, c1) = curve[i], curve[i + 1]
                rate = (c1 - c0) / max(l1 - l0, 1e-9)
                if step is None or rate < step[0]:
                    step = (rate, name)
        if step is None:
            break
        name = step[1]
        total += curves[name][at[name] + 1][0] - curves[name][at[name]][0]
        at[name] += 1
    return {name: curves[name][i][0] for name, i in at.items()}


@torch.no_grad()
def select_fat_threshold_(model: nn.Module, tokenizer, text: str,
                          config: FatThresholdConfig | None = None) -> FatThresholdResult:
    """Choose FATReLU thresholds on ``text`` by ``config``'s rule and set them on ``model`` in place."""
    config = config or FatThresholdConfig()
    names = list(fat_thresholds(model))
    if not names:
        raise ActsparseError("the model is not relufied: call relufy_(model, ReluConfig()) first")
    ids = tokenize(tokenizer, text)[: config.max_tokens]
    evaluate = lambda: evaluate_relu(model, tokenizer, "", context=config.context,  # noqa: E731
                                     max_tokens=config.max_tokens, ids=ids)
    set_fat_thresholds_(model, 0.0)
    with ActivationTap(model, count_zeros=False, sample_per_call=config.samples_per_call) as tap:
        base = evaluate()
    samples = tap.layer_samples()
    pooled = torch.cat(list(samples.values()))
    sensitivity = _layer_sensitivity(model, tokenizer, ids, samples, base, config) \
        if config.allocation == "sensitivity" else {}

    def thresholds_for(target: float) -> dict[str, float]:
        if config.allocation == "equal":
            return {n: threshold_at_level(samples[n], target) for n in names}
        if config.allocation == "sensitivity":
            levels = greedy_levels(sensitivity, target)
            return {n: 0.0 if levels[n] <= sensitivity[n][0][0] else threshold_at_level(samples[n], levels[n])
                    for n in names}  # a layer left at its start keeps T = 0
        t = threshold_at_level(pooled, target)
        return {n: t for n in names}

    trials = []

    def trial(target: float):
        th = thresholds_for(target)
        set_fat_thresholds_(model, th)
        r = evaluate()
        trials.append({"target": target, "threshold": max(th.values()), "sparsity": r.sparsity,
                       "perplexity": r.perplexity})
        return th, r

    if config.target_sparsity is not None:
        # Quantiles of sampled activations map a target to thresholds only approximately (on
        # SmolLM2, 85% gave 84.8%): aim higher by the shortfall until the measured sparsity reaches it.
        goal = aim = config.target_sparsity
        best, r = trial(aim)
        for _ in range(config.target_retries):
            if r.sparsity >= goal or aim >= MAX_LAYER_SPARSITY:
                break
            aim = min(aim + (goal - r.sparsity), MAX_LAYER_SPARSITY)
            best, r = trial(aim)
    else:
        limit = base.perplexity * (1 + config.max_ppl_increase)
        best, r = {n: 0.0 for n in names}, base
        lo, hi = base.sparsity, 1.0
        for _ in range(config.search_steps):
            mid = 0.5 * (lo + hi)
            th, rm = trial(mid)
            if rm.perplexity <= limit:
                lo = mid
                if rm.sparsity >= r.sparsity:
                    best, r = th, rm
            else:
                hi = mid
    set_fat_thresholds_(model, best)
    layer_targets = {} if config.allocation == "uniform" else {
        n: float((samples[n] <= best[n]).float().mean()) if best[n] > 0 else base.layer_sparsity.get(n, 0.0)
        for n in names}
    return FatThresholdResult(thresholds=best, sparsity=r.sparsity, perplexity=r.perplexity,
                              base_sparsity=base.sparsity, base_perplexity=base.perplexity, trials=trials,
                              layer_targets=layer_targets, sensitivity=sensitivity)


def _layer_sensitivity(model: nn.Module, tokenizer, ids: torch.Tensor, samples: dict[str, torch.Tensor],
                       base, config: FatThresholdConfig) -> dict[str, list[tuple[float, float]]]:
    """{layer: [(sparsity level, held-out loss increase with only this layer cut there)]}, the first
    pair being the layer at T = 0 (its ReLU sparsity, cost 0). Thresholds are reset to 0 after."""
    sub = ids[: max(config.sensitivity_tokens, config.context)]
    names = list(samples)
    loss0 = evaluate_relu(model, tokenizer, "", context=config.context, max_tokens=sub.numel(), ids=sub).nll
    out = {}
    for name in names:
        start = base.layer_sparsity.get(name, 0.0)
        pairs = [(start, 0.0)]
        level = (math.floor(start / config.sensitivity_step) + 1) * config.sensitivity_step
        while level <= MAX_LAYER_SPARSITY + 1e-9:
            set_fat_thresholds_(model, {name: threshold_at_level(samples[name], level)})
            r = evaluate_relu(model, tokenizer, "", context=config.context, max_tokens=sub.numel(), ids=sub)
            pairs.append((round(level, 6), r.nll - loss0))
            level += config.sensitivity_step
        set_fat_thresholds_(model, {name: 0.0})
        out[name] = pairs
    return out
