"""From a calibration and a target model-wide sparsity to per-linear thresholds, and their file format.

Model-wide sparsity is the fraction of decoder weight bytes that are skipped: each input site's
sparsity weighted by the elements of every weight it feeds (q/k/v count k and v at their GQA size).
``uniform`` puts every site at the target; ``greedy`` reads TEAL's block-wise allocation table that
calibration stored (per block, per site sparsities at levels 0, 0.05, ..., 0.9) and interpolates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import ActsparseError
from .io import load_tensors, save_tensors
from .models import SITES, config_hash, input_sites, weight_fingerprint


@dataclass
class ThresholdSet:
    thresholds: dict[str, torch.Tensor]  # linear qualified name -> [in_features] fp32
    meta: dict = field(default_factory=dict)

    def save(self, path) -> None:
        save_thresholds(path, self.thresholds, self.meta)


def site_sparsities(model: nn.Module, calib, sparsity: float, allocation: str, criterion: str) -> dict[str, float]:
    """Target sparsity of every input site (keyed by site name)."""
    if not 0.0 <= sparsity < 1.0:
        raise ActsparseError(f"sparsity must be in [0, 1), got {sparsity}")
    from .criteria import get_criterion

    sites = input_sites(model)
    crit = get_criterion(criterion)
    if allocation == "uniform":
        return crit.uniform_allocation(sites, float(sparsity))
    if allocation != "greedy":
        raise ActsparseError(f"allocation must be 'uniform' or 'greedy', got '{allocation}'")
    table = calib.allocations.get(criterion)
    if table is None:
        raise ActsparseError(
            f"calibration has no greedy allocation for criterion '{criterion}'; re-run calibrate with it "
            "(greedy on) or use allocation 'uniform'"
        )
    levels = torch.tensor(calib.levels, dtype=torch.float64)
    if sparsity > float(levels[-1]) + 1e-9:
        raise ActsparseError(f"the greedy table stops at sparsity {float(levels[-1])}; use 'uniform' above it")
    hi = int(torch.searchsorted(levels, torch.tensor([sparsity], dtype=torch.float64)).item())
    hi = min(max(hi, 1), len(levels) - 1)
    lo = hi - 1
    w = (sparsity - float(levels[lo])) / float(levels[hi] - levels[lo])
    w = min(max(w, 0.0), 1.0)
    alloc = (1 - w) * table[lo].double() + w * table[hi].double()  # [blocks, 4]
    out = {}
    for s in sites:
        out[s.name] = float(alloc[s.layer, SITES.index(s.site)])
    reached = sum(out[s.name] * crit.site_weight(s) for s in sites) / sum(s.weight_numel for s in sites)
    if reached < sparsity - 0.01:  # a criterion that cannot skip every weight (CATS reads the gate)
        raise ActsparseError(f"criterion '{criterion}' reaches at most model-wide sparsity {reached:.3f}")
    return out


def compute_thresholds(model: nn.Module, calib, sparsity: float, allocation: str = "greedy",
                       criterion: str = "magnitude") -> ThresholdSet:
    """Per-linear thresholds that reach model-wide ``sparsity`` on the calibration text."""
    from .criteria import get_criterion

    crit = get_criterion(criterion)
    per_site = site_sparsities(model, calib, sparsity, allocation, criterion)
    thresholds = {}
    for site in input_sites(model):
        t = crit.site_thresholds(calib, site, per_site[site.name])
        thresholds.update(crit.threshold_entries(site, t))
    meta = {
        "kind": "thresholds",
        "model": calib.meta.get("model"),
        "config_hash": calib.meta.get("config_hash"),
        "weight_fingerprint": calib.meta.get("weight_fingerprint"),
        "sparsity": sparsity,
        "allocation": allocation,
        "criterion": criterion,
        "site_sparsity": per_site,
        "calibration_text": calib.meta.get("text"),
    }
    return ThresholdSet(thresholds, meta)


@torch.no_grad()
def refine_thresholds(model: nn.Module, tokenizer, text: str, calib, ts: ThresholdSet, tokens: int = 16384,
                      seq_len: int | None = None, iterations: int = 1, progress: bool = False) -> ThresholdSet:
    """Re-read each site's threshold from its inputs *under* the sparsity of the sites upstream.

    Calibration histograms come from the dense model, but zeroing inputs upstream shrinks the
    activations downstream, so dense-calibrated thresholds overshoot the target (a few points at
    s = 0.7 on small models). Running the sparsified model over calibration text and re-taking each
    site's quantile at its own target fixes that; one iteration is usually enough.
    """
    from .calibrate import HIST_BINS, Calibration, histogram_add, tokenize_windows
    from .criteria import get_criterion
    from .sparsify import apply_thresholds_, threshold_modules

    crit = get_criterion(ts.meta["criterion"])
    seq_len = seq_len or int(calib.meta.get("seq_len", 1024))
    windows = tokenize_windows(tokenizer, text, seq_len, tokens, "calibration")
    device = next(model.parameters()).device
    sites = input_sites(model)
    crit.install_(model)  # SparseLinears (and the criterion's other modules) if missing
    saved = {n: m.thresholds.clone() for n, m in threshold_modules(model).items()}
    targets = ts.meta["site_sparsity"]
    thresholds = dict(ts.thresholds)
    try:
        for _ in range(iterations):
            apply_thresholds_(model, thresholds)
            hists: dict[str, torch.Tensor] = {}
            handles = []
            for module, key, fn in crit.recorders(model, sites, calib.extras):
                hists[key] = torch.zeros(HIST_BINS + 2, dtype=torch.float64)

                def hook(mod, args, output=None, key=key, fn=fn):
                    histogram_add(hists[key], fn(args, output))

                handles.append(module.register_forward_hook(hook))
            try:
                for w in windows:
                    model(input_ids=w[None].to(device), use_cache=False)
            finally:
                for h in handles:
                    h.remove()
            sparse_calib = Calibration(meta=calib.meta, histograms=hists, extras=calib.extras)
            thresholds = {}
            for site in sites:
                t = crit.site_thresholds(sparse_calib, site, targets[site.name])
                thresholds.update(crit.threshold_entries(site, t))
    finally:
        apply_thresholds_(model, saved)
    meta = dict(ts.meta, refined_tokens=int(windows.numel()), refine_iterations=iterations)
    return ThresholdSet(thresholds, meta)


def save_thresholds(path, thresholds: dict[str, torch.Tensor], meta: dict | None = None) -> None:
    meta = dict(meta or {})
    meta.setdefault("kind", "thresholds")
    save_tensors(path, {k: v.detach().float().cpu().contiguous() for k, v in thresholds.items()}, meta)


def load_thresholds(path, model: nn.Module | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Load a thresholds file; with ``model``, also check it was made for that model."""
    tensors, meta = load_tensors(path, "thresholds")
    if model is not None:
        if meta.get("config_hash") not in (None, config_hash(model.config)):
            raise ActsparseError(f"thresholds in {path} were made for another model ({meta.get('model')})")
        if meta.get("weight_fingerprint") not in (None, weight_fingerprint(model)):
            raise ActsparseError(f"thresholds in {path} were made for a model with other weights")
    return tensors, meta
