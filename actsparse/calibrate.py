"""Calibration: run text through the model and record how large the inputs of each linear layer are.

We keep a log-spaced histogram of |x| per input site (never the activations themselves), which is
enough to read off the threshold that zeroes any fraction ``s`` of them. Optionally (the default)
calibration also runs TEAL's greedy block-wise allocation (``actsparse.allocate``), whose result,
a table of per-site sparsities for every block at model-wide levels 0, 0.05, ..., is stored in the
same file so thresholds for any target sparsity are computed instantly later.

File format: one safetensors file; tensors ``hist/<site>/<stat>`` (float64 counts) and
``alloc/<criterion>`` ([levels, blocks, sites] float32), metadata key ``actsparse`` (JSON naming
the model, its config hash and weight fingerprint, the text and the token count).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from .errors import ActsparseError
from .io import load_tensors, save_tensors
from .models import SITES, InputSite, config_hash, input_sites, model_type, weight_fingerprint

# Log-spaced bins for |x|: bin 0 holds [0, LO), bins 1..N cover [LO, HI) geometrically, bin N+1 holds >= HI.
HIST_LO, HIST_HI, HIST_BINS = 1e-6, 1e4, 4096
_LOG_LO = math.log(HIST_LO)
_LOG_STEP = (math.log(HIST_HI) - math.log(HIST_LO)) / HIST_BINS


def histogram_add(counts: torch.Tensor, values: torch.Tensor) -> None:
    """Add ``|values|`` to ``counts`` ([HIST_BINS + 2] float64) in place."""
    v = values.detach().abs().flatten().float()
    idx = torch.floor((torch.log(v.clamp_min(HIST_LO * 0.5)) - _LOG_LO) / _LOG_STEP).long() + 1
    idx = torch.where(v < HIST_LO, torch.zeros_like(idx), idx.clamp(1, HIST_BINS + 1))
    counts += torch.bincount(idx, minlength=HIST_BINS + 2).to(counts.device, torch.float64)


def histogram_quantile(counts: torch.Tensor, q: float) -> float:
    """The value t with a fraction ``q`` of the recorded magnitudes at or below it.

    Interpolates linearly inside bin 0 and geometrically inside the log-spaced bins; q = 0 gives
    exactly 0 so that sparsity 0 keeps every non-zero input.
    """
    if q <= 0.0:
        return 0.0
    counts = counts.double().cpu()
    total = float(counts.sum())
    if total <= 0:
        raise ActsparseError("empty histogram: the calibration recorded no activations")
    cum = torch.cumsum(counts, 0)
    target = min(q, 1.0) * total
    b = int(torch.searchsorted(cum, torch.tensor([target], dtype=torch.float64)).item())
    b = min(b, HIST_BINS + 1)
    below = float(cum[b - 1]) if b > 0 else 0.0
    frac = (target - below) / max(float(counts[b]), 1e-300)
    frac = min(max(frac, 0.0), 1.0)
    if b == 0:
        return frac * HIST_LO
    if b == HIST_BINS + 1:
        return HIST_HI
    lo = _LOG_LO + (b - 1) * _LOG_STEP
    return math.exp(lo + frac * _LOG_STEP)


@dataclass
class CalibrationConfig:
    """How much text to run, and whether to compute the greedy allocation."""

    tokens: int = 131072  # token budget taken from the start of the text
    seq_len: int = 1024
    batch_size: int = 1
    greedy: bool = True
    greedy_tokens: int = 2048  # tokens of block inputs used by the greedy allocation
    greedy_step: float = 0.025  # block-sparsity increment per greedy step
    criteria: tuple[str, ...] = ("magnitude",)

    def __post_init__(self):
        if self.seq_len < 2:
            raise ActsparseError(f"seq_len must be >= 2, got {self.seq_len}")
        if self.tokens < self.seq_len:
            raise ActsparseError(f"token budget ({self.tokens}) must be at least seq_len ({self.seq_len})")
        if not 0 < self.greedy_step <= 0.25:
            raise ActsparseError(f"greedy_step must be in (0, 0.25], got {self.greedy_step}")
        self.criteria = tuple(self.criteria)
        from .criteria import get_criterion

        for c in self.criteria:
            get_criterion(c)


@dataclass
class Calibration:
    """Histograms of activation statistics per input site, plus greedy allocation tables."""

    meta: dict
    histograms: dict[str, torch.Tensor]  # "<site name>/<stat>" -> counts [HIST_BINS + 2]
    allocations: dict[str, torch.Tensor] = field(default_factory=dict)  # criterion -> [L, blocks, 4]
    extras: dict[str, torch.Tensor] = field(default_factory=dict)  # criterion-specific tensors

    # -- queries --------------------------------------------------------------------------------
    def histogram(self, site: InputSite | str, stat: str) -> torch.Tensor:
        name = site.name if isinstance(site, InputSite) else site
        key = f"{name}/{stat}"
        if key not in self.histograms:
            raise ActsparseError(
                f"calibration has no '{stat}' statistics for {name}; re-run `actsparse calibrate` "
                f"with the criterion that needs them"
            )
        return self.histograms[key]

    def quantile(self, site: InputSite | str, stat: str, q: float) -> float:
        return histogram_quantile(self.histogram(site, stat), q)

    @property
    def levels(self) -> list[float]:
        return list(self.meta.get("alloc_levels", []))

    def check_model(self, model: nn.Module) -> None:
        """Refuse a calibration made for another model (architecture or weights)."""
        want = config_hash(model.config)
        if self.meta.get("config_hash") != want:
            raise ActsparseError(
                f"calibration was made for another model ({self.meta.get('model')}, config "
                f"{self.meta.get('config_hash')}); this model's config hash is {want}"
            )
        fp = weight_fingerprint(model)
        if self.meta.get("weight_fingerprint") not in (None, fp):
            raise ActsparseError(
                f"calibration was made for a model with the same shape but other weights "
                f"({self.meta.get('model')}); re-calibrate this model"
            )

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path) -> None:
        tensors = {f"hist/{k}": v.double().contiguous() for k, v in self.histograms.items()}
        tensors.update({f"alloc/{k}": v.float().contiguous() for k, v in self.allocations.items()})
        tensors.update({f"extra/{k}": v.contiguous() for k, v in self.extras.items()})
        save_tensors(path, tensors, self.meta)

    @classmethod
    def load(cls, path) -> "Calibration":
        tensors, meta = load_tensors(path, "calibration")
        hist = {k[5:]: v for k, v in tensors.items() if k.startswith("hist/")}
        alloc = {k[6:]: v for k, v in tensors.items() if k.startswith("alloc/")}
        extras = {k[6:]: v for k, v in tensors.items() if k.startswith("extra/")}
        if not hist:
            raise ActsparseError(f"calibration file {path} holds no histograms")
        return cls(meta=meta, histograms=hist, allocations=alloc, extras=extras)


def tokenize_windows(tokenizer, text: str, seq_len: int, max_tokens: int | None, what: str) -> torch.Tensor:
    """Tokenize ``text`` into non-overlapping windows [n, seq_len] (the tail that doesn't fill one is dropped)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel() // seq_len
    if n == 0:
        raise ActsparseError(
            f"{what} text is too short: {ids.numel()} tokens, need at least one window of {seq_len}"
        )
    return ids[: n * seq_len].view(n, seq_len)


def _text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def calibrate(model: nn.Module, tokenizer, text: str, config: CalibrationConfig | None = None,
              text_name: str = "<text>", progress: bool = True) -> Calibration:
    """Record |activation| histograms at every input site (and the greedy allocation tables).

    ``text`` is the calibration text itself (use :func:`actsparse.io.read_text` for a file).
    """
    from .allocate import capture_block_io, greedy_allocation
    from .criteria import get_criterion

    config = config or CalibrationConfig()
    sites = input_sites(model)
    device = next(model.parameters()).device
    windows = tokenize_windows(tokenizer, text, config.seq_len, config.tokens, "calibration")
    criteria = [get_criterion(c) for c in config.criteria]

    histograms: dict[str, torch.Tensor] = {}
    extras: dict[str, torch.Tensor] = {}
    for crit in criteria:
        extras.update(crit.prepare(model, sites))
    recorders = []
    for crit in criteria:
        recorders += crit.recorders(model, sites, extras)  # [(module, hook_kind, stat_key, fn)]

    handles = []
    for module, key, fn in recorders:
        if key in histograms:  # criteria that share a statistic (e.g. magnitude and cats on q/k/v) record it once
            continue
        histograms[key] = torch.zeros(HIST_BINS + 2, dtype=torch.float64)

        def hook(mod, args, output=None, key=key, fn=fn):
            histogram_add(histograms[key], fn(args, output))

        handles.append(module.register_forward_hook(hook))
    try:
        bar = tqdm(range(0, len(windows), config.batch_size), desc="calibrate", unit="batch",
                   disable=not progress)
        for start in bar:
            batch = windows[start : start + config.batch_size].to(device)
            model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()

    meta = {
        "kind": "calibration",
        "actsparse_version": __version__,
        "model": getattr(model, "name_or_path", None) or model_type(model.config),
        "model_type": model_type(model.config),
        "config_hash": config_hash(model.config),
        "weight_fingerprint": weight_fingerprint(model),
        "text": text_name,
        "text_sha256": _text_digest(text),
        "tokens": int(windows.numel()),
        "seq_len": config.seq_len,
        "criteria": list(config.criteria),
        "sites": [s.name for s in sites],
        "site_weights": {s.name: s.weight_numel for s in sites},
        "hist": {"lo": HIST_LO, "hi": HIST_HI, "bins": HIST_BINS},
        "config": json.loads(json.dumps(asdict(config))),
    }
    calib = Calibration(meta=meta, histograms=histograms, extras=extras)
    if config.greedy:
        n_seq = max(1, config.greedy_tokens // config.seq_len)
        seqs = windows[:n_seq]
        if config.greedy_tokens < config.seq_len:
            seqs = windows[:1, : config.greedy_tokens]
        block_io = capture_block_io(model, seqs.to(device))
        levels = [round(x * 0.05, 4) for x in range(0, 19)]  # 0, 0.05, ..., 0.9
        for crit in criteria:
            calib.allocations[crit.name] = greedy_allocation(
                model, block_io, calib, crit, levels, step=config.greedy_step, progress=progress
            )
        calib.meta["alloc_levels"] = levels
        calib.meta["greedy_tokens"] = int(seqs.numel())
    return calib


__all__ = ["Calibration", "CalibrationConfig", "calibrate", "histogram_add", "histogram_quantile",
           "tokenize_windows", "SITES"]
