"""Quality of a sparsified model against its dense self, on held-out text.

For every non-overlapping window of the evaluation text we run the dense model once and each
threshold set once on the same weights (thresholds are buffers, so switching is free), and
accumulate: perplexity, KL(dense || sparse) of the next-token distributions, top-1 agreement with
the dense model, and the sparsity actually achieved at every input site.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .calibrate import tokenize_windows
from .sparsify import (apply_thresholds_, sparse_linears, swap_linears_, threshold_modules, track_sparsity,
                       zero_thresholds)


@dataclass
class QualityMetrics:
    ppl: float
    nll: float
    kl: float = 0.0
    top1: float = 1.0
    sparsity: float = 0.0
    per_site: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"ppl": self.ppl, "nll": self.nll, "kl": self.kl, "top1_agreement": self.top1,
                "sparsity": self.sparsity, "per_site_sparsity": self.per_site}


class _Acc:
    def __init__(self):
        self.nll = self.kl = self.top1 = 0.0
        self.n = 0
        self.zeros: dict[str, float] = {}
        self.seen: dict[str, float] = {}


@torch.no_grad()
def perplexity(model: nn.Module, tokenizer, text: str, context: int = 1024, max_tokens: int | None = None,
               progress: bool = True) -> dict:
    """Perplexity over non-overlapping windows of ``context`` tokens (each predicts its own tokens)."""
    windows = tokenize_windows(tokenizer, text, context, max_tokens, "evaluation")
    device = next(model.parameters()).device
    nll, n = 0.0, 0
    for w in tqdm(windows, desc="perplexity", unit="window", disable=not progress):
        ids = w[None].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll += F.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum").item()
        n += ids.shape[1] - 1
    return {"ppl": math.exp(nll / n), "nll": nll / n, "tokens": int(windows.numel()), "predictions": n}


def _cache_budget(device: torch.device) -> int:
    """Bytes we may spend keeping the dense log-probabilities of every window."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 4 << 30


@torch.no_grad()
def evaluate(model: nn.Module, tokenizer, text: str, threshold_sets: dict[str, dict[str, torch.Tensor]],
             context: int = 1024, max_tokens: int | None = None, progress: bool = True,
             on_result=None) -> dict:
    """Dense metrics and, for each named threshold set, quality against dense and achieved sparsity.

    The dense model runs once per window; its log-probabilities are kept (when they fit) so each
    threshold set is loaded once and run over every window. ``on_result(name, metrics)`` is called
    as each set finishes (e.g. to save partial results).
    """
    windows = tokenize_windows(tokenizer, text, context, max_tokens, "evaluation")
    device = next(model.parameters()).device
    if not sparse_linears(model):
        swap_linears_(model)
    original = {n: m.thresholds.clone() for n, m in threshold_modules(model).items()}
    site_of = {lin: site for site, lins in _site_map(model).items() for lin in lins}
    weights = {n: m.weight.numel() for n, m in sparse_linears(model).items()}
    vocab = model.get_output_embeddings().weight.shape[0]
    cache = windows.shape[0] * (context - 1) * vocab * 4 <= _cache_budget(device)
    out = {"tokens": int(windows.numel()), "context": context, "configs": {}}
    try:
        apply_thresholds_(model, zero_thresholds(model))
        dense, dense_logp = _Acc(), []
        for w in tqdm(windows, desc="evaluate dense", unit="window", disable=not progress):
            ids = w[None].to(device)
            logp_d = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
            dense.nll += F.nll_loss(logp_d, ids[0, 1:], reduction="sum").item()
            dense.n += ids.shape[1] - 1
            if cache:
                dense_logp.append(logp_d)
        out["dense"] = QualityMetrics(ppl=math.exp(dense.nll / dense.n), nll=dense.nll / dense.n).to_dict()

        for name, thresholds in threshold_sets.items():
            acc = _Acc()
            apply_thresholds_(model, {k: v.to(device) for k, v in thresholds.items()})
            with track_sparsity(model) as report:
                for i, w in enumerate(tqdm(windows, desc=name, unit="window", disable=not progress)):
                    ids = w[None].to(device)
                    targets = ids[0, 1:]
                    if cache:
                        logp_d = dense_logp[i]
                    else:  # recompute the dense reference for this window
                        apply_thresholds_(model, zero_thresholds(model))
                        with _paused(model):
                            logp_d = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
                        apply_thresholds_(model, thresholds)
                    logp = F.log_softmax(model(input_ids=ids, use_cache=False).logits[0, :-1].float(), -1)
                    acc.nll += F.nll_loss(logp, targets, reduction="sum").item()
                    acc.kl += (logp_d.exp() * (logp_d - logp)).sum().item()
                    acc.top1 += (logp.argmax(-1) == logp_d.argmax(-1)).sum().item()
                    acc.n += targets.numel()
                stats = report()
            per_site: dict[str, float] = {}
            for lin, frac in stats.per_linear.items():
                per_site.setdefault(site_of[lin], frac)
            model_wide = sum(stats.per_linear[n] * weights[n] for n in weights) / sum(weights.values())
            out["configs"][name] = QualityMetrics(
                ppl=math.exp(acc.nll / acc.n), nll=acc.nll / acc.n, kl=acc.kl / acc.n, top1=acc.top1 / acc.n,
                sparsity=model_wide, per_site=per_site,
            ).to_dict()
            if on_result is not None:
                on_result(name, out)
    finally:
        apply_thresholds_(model, original)
    return out


@contextlib.contextmanager
def _paused(model: nn.Module):
    """Stop sparsity counting for a dense reference pass inside a tracked loop."""
    mods = [m for m in sparse_linears(model).values() if m.track]
    for m in mods:
        m.track = False
    try:
        yield
    finally:
        for m in mods:
            m.track = True


def _site_map(model: nn.Module) -> dict[str, tuple[str, ...]]:
    from .models import input_sites

    return {s.name: s.linears for s in input_sites(model)}
