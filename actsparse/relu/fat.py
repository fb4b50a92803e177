"""Choosing the FATReLU threshold on calibration text (the last step of ProSparse).

After ReLU + L1 training most of ``a = relu(gate(x))`` is zero, and many of the survivors are tiny.
Raising the cut from 0 to T drops those too. Two rules, both measured on *held-out calibration*
text (never the evaluation text):

* ``max_ppl_increase=tol``: the largest T whose perplexity is at most ``(1 + tol)`` times the
  perplexity at T = 0. T is searched through the sparsity it gives: candidate sparsity levels are
  bisected between the ReLU sparsity and 1, each mapped to T by the quantile of sampled activations;
  this assumes perplexity grows with T (it does in practice; the search keeps the best T that
  passed, so a non-monotone bump can only make it conservative).
* ``target_sparsity=s``: the smallest T whose sampled quantile reaches sparsity ``s`` (perplexity is
  reported, not constrained).

``per_layer=False`` (ProSparse) uses one T for every layer; ``per_layer=True`` gives each layer the
T that reaches the same sparsity in that layer (activation scales differ between layers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ActsparseError
from .measure import ActivationTap, evaluate_relu, tokenize
from .modules import fat_thresholds, set_fat_thresholds_


@dataclass
class FatThresholdConfig:
    """Rule for :func:`select_fat_threshold_`; set exactly one of the two targets."""

    max_ppl_increase: float | None = 0.01  # relative perplexity increase allowed vs T = 0
    target_sparsity: float | None = None  # fraction of zeros of act(gate(x)) to reach
    per_layer: bool = False
    context: int = 1024
    max_tokens: int = 32768
    search_steps: int = 8
    samples_per_call: int = 4096  # activation values sampled per layer per forward (for quantiles)

    def __post_init__(self):
        if (self.max_ppl_increase is None) == (self.target_sparsity is None):
            raise ActsparseError("set exactly one of max_ppl_increase and target_sparsity")
        if self.max_ppl_increase is not None and not (0 <= self.max_ppl_increase < math.inf):
            raise ActsparseError(f"max_ppl_increase must be >= 0, got {self.max_ppl_increase}")
        if self.target_sparsity is not None and not (0 < self.target_sparsity < 1):
            raise ActsparseError(f"target_sparsity must be in (0, 1), got {self.target_sparsity}")
        if self.context < 2 or self.max_tokens < 2 or self.search_steps < 1 or self.samples_per_call < 1:
            raise ActsparseError("context, max_tokens >= 2; search_steps, samples_per_call >= 1")


@dataclass
class FatThresholdResult:
    thresholds: dict[str, float]  # per MLP activation (all equal unless per_layer)
    sparsity: float  # measured on the calibration text at the chosen thresholds
    perplexity: float
    base_sparsity: float  # at T = 0
    base_perplexity: float
    trials: list[dict] = field(default_factory=list)  # every (target, T, sparsity, ppl) tried

    @property
    def threshold(self) -> float:
        """The single T (the largest, when per layer)."""
        return max(self.thresholds.values()) if self.thresholds else 0.0


def _quantile(values: torch.Tensor, q: float) -> float:
    values = values.sort().values
    return float(values[min(int(q * values.numel()), values.numel() - 1)])


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

    def thresholds_for(target: float) -> dict[str, float]:
        if config.per_layer:
            return {n: max(_quantile(samples[n], target), 0.0) for n in names}
        t = max(_quantile(pooled, target), 0.0)
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
        best, r = trial(config.target_sparsity)
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
    return FatThresholdResult(thresholds=best, sparsity=r.sparsity, perplexity=r.perplexity,
                              base_sparsity=base.sparsity, base_perplexity=base.perplexity, trials=trials)
