"""Fine-tuning a relufied model: packed LM loss, ProSparse progressive L1, optional distillation.

Loss per micro-batch::

    (1 - alpha) * CE(student) + alpha * KL(teacher || student) + beta * H + lambda(step) * L1

with ``H`` = mean over layers of ``||h_student - h_teacher||^2 / E[h_teacher^2]`` (hidden-state
distillation, ``hidden_distill = beta``; a d_model-dimensional target per token and layer, which
helps when the text is short), ``L1`` = mean over layers of ``mean|act(gate(x))|`` (the input-side
sparsity of ``down``), and ``lambda`` following :class:`L1Schedule`. ProSparse (Song et al., 2024)
raises lambda in stages with increasing peaks, smoothly inside each stage, because a large L1
factor from the first step destroys the model before it adapts to ReLU, and a sudden jump in
lambda gives a loss spike.

Resumable: checkpoints (model, optimizer, LR scheduler, step, RNG, configs, history) are written
atomically, and the batch of step ``s`` is a pure function of ``(seed, s)``, so an interrupted run
resumed from its checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ActsparseError
from .fat import threshold_at_level
from .loss import auto_chunk, chunked_lm_loss, lm_parts
from .measure import ActivationTap, tokenize
from .modules import FATReLU, activation_modules, fat_thresholds, set_fat_thresholds_

CHECKPOINT_FILE = "checkpoint.pt"


def check_positive_ints(obj, *names: str) -> None:
    """Config validation shared by the ReLU-path dataclasses: each named field is an int > 0."""
    for name in names:
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise ActsparseError(f"{name} must be a positive integer, got {v!r}")


def warmup_cosine(step: int, warmup_steps: int, steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warm-up over ``warmup_steps``, then cosine decay to ``min_lr_ratio``."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    p = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))


def atomic_save(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``: a reader (or a
    resumed run) never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class L1Schedule:
    """Staged L1 factor: ``stages = [(steps, peak), ...]``, peaks non-decreasing.

    Inside stage k the factor rises from the previous stage's peak (0 before the first stage) to
    ``peak_k`` along a quarter sine (ProSparse) or a half cosine (``shape="cosine"``, flat at both
    ends), reaching ``peak_k`` exactly at the stage's end; after the last stage it stays at the last
    peak. A first stage with peak 0 is a plain fine-tuning phase with L1 off.
    """

    stages: list[tuple[int, float]]
    shape: str = "sine"

    def __post_init__(self):
        if not isinstance(self.stages, (list, tuple)) or not self.stages:
            raise ActsparseError("L1Schedule needs at least one (steps, peak) stage")
        stages = []
        prev = 0.0
        for stage in self.stages:
            if not isinstance(stage, (list, tuple)) or len(stage) != 2:
                raise ActsparseError(f"an L1 stage is a pair (steps, peak), got {stage!r}")
            steps, peak = stage
            if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
                raise ActsparseError(f"L1 stage steps must be a positive integer, got {steps!r}")
            if isinstance(peak, bool) or not isinstance(peak, (int, float)) or not math.isfinite(peak) or peak < 0:
                raise ActsparseError(f"L1 stage peak must be a finite number >= 0, got {peak!r}")
            if peak < prev:
                raise ActsparseError(f"L1 stage peaks must not decrease ({prev} then {peak})")
            prev = float(peak)
            stages.append((int(steps), float(peak)))
        self.stages = stages
        if self.shape not in ("sine", "cosine"):
            raise ActsparseError(f"L1Schedule shape must be 'sine' or 'cosine', got {self.shape!r}")

    @property
    def total_steps(self) -> int:
        return sum(s for s, _ in self.stages)

    def factor(self, step: int) -> float:
        """The L1 factor used at optimizer step ``step`` (0-based)."""
        start, prev = 0, 0.0
        for steps, peak in self.stages:
            if step < start + steps:
                p = max(step - start, 0) / steps  # in [0, 1)
                w = math.sin(0.5 * math.pi * p) if self.shape == "sine" else 0.5 * (1 - math.cos(math.pi * p))
                return prev + (peak - prev) * w
            start, prev = start + steps, peak
        return prev

    @classmethod
    def even(cls, total_steps: int, peaks: list[float], warmup_steps: int = 0, shape: str = "sine") -> "L1Schedule":
        """Split ``total_steps - warmup_steps`` evenly over ``peaks`` (after an L1-off warm-up)."""
        if warmup_steps < 0 or total_steps - warmup_steps < len(peaks) or not peaks:
            raise ActsparseError("L1Schedule.even: not enough steps for the stages")
        n = total_steps - warmup_steps
        sizes = [n // len(peaks) + (1 if i < n % len(peaks) else 0) for i in range(len(peaks))]
        stages = ([(warmup_steps, 0.0)] if warmup_steps else []) + list(zip(sizes, peaks))
        return cls(stages=stages, shape=shape)


@dataclass
class FatRamp:
    """FATReLU thresholds raised *during* fine-tuning, so the model adapts to the cut.

    ProSparse picks the FATReLU threshold after training, and the model never sees the cut (on
    SmolLM2 the cut from 74% to 85% sparsity cost 3.7 ppl). Here, every ``every`` optimizer steps
    the thresholds are re-set from the current batch: T is the quantile of the sampled
    pre-activations ``gate(x)`` that zeroes a fraction ``level(step)`` of ``relu(gate(x))`` (one T
    for every layer by default, ProSparse's rule; per layer with ``per_layer``). The level rises
    from the sparsity measured at the ramp's start to ``target`` between the fractions ``start``
    and ``end`` of the steps (cubic, fast first, as in gradual magnitude pruning), then the target
    is held: the thresholds keep following the model as it changes.
    """

    target: float  # sparsity of act(gate(x)) over all layers at the end of the ramp
    start: float = 0.2  # fraction of the steps where the ramp starts
    end: float = 0.7  # fraction of the steps where it reaches the target
    every: int = 10  # optimizer steps between threshold updates
    samples: int = 32768  # pre-activations sampled per layer per update
    per_layer: bool = False  # each layer cut to the level (else one T for all layers)

    def __post_init__(self):
        if not (isinstance(self.target, (int, float)) and 0 < self.target < 1):
            raise ActsparseError(f"FatRamp.target must be in (0, 1), got {self.target!r}")
        if not 0 <= self.start < self.end <= 1:
            raise ActsparseError(f"FatRamp needs 0 <= start < end <= 1, got {self.start}, {self.end}")
        check_positive_ints(self, "every", "samples")

    def first_step(self, steps: int) -> int:
        return int(self.start * steps)

    def updates_at(self, step: int, steps: int) -> bool:
        first = self.first_step(steps)
        return step >= first and (step - first) % self.every == 0

    def level(self, step: int, steps: int, from_level: float) -> float:
        """Target sparsity at optimizer step ``step``, from ``from_level`` at the ramp's start."""
        first, last = self.first_step(steps), max(int(self.end * steps), self.first_step(steps) + 1)
        p = min(max((step - first) / (last - first), 0.0), 1.0)
        return from_level + (self.target - from_level) * (1 - (1 - p) ** 3)


@dataclass
class ReluAnneal:
    """A smooth way from the original activation to ReLU during fine-tuning.

    The swap SiLU -> ReLU costs SmolLM2-135M nearly all of its quality at once (perplexity 23 ->
    3818: SiLU's negative lobe carries much of the MLP output), and the fine-tune then spends its
    tokens repairing it. Instead, for the first fraction ``end`` of the steps every FATReLU computes
    ``x * sigmoid(beta * x)``, which is SiLU at beta = 1 (GELU is close to beta = 1.702), with beta
    rising geometrically from ``beta_start`` to ``beta_end`` (at beta = 64 it is within 0.0044 of
    ReLU everywhere); after that the activation is the exact (FAT)ReLU, so the student starts as the
    teacher. Measured on SmolLM2 (CPU scale, docs/RESULTS.md): no gain over the direct swap, which
    distillation repairs within a few steps; kept as an option, off by default.
    """

    end: float = 0.2  # fraction of the steps annealed; the FatRamp must not start before it
    beta_start: float = 1.0
    beta_end: float = 64.0

    def __post_init__(self):
        if not 0 < self.end <= 1:
            raise ActsparseError(f"ReluAnneal.end must be in (0, 1], got {self.end!r}")
        if not (0 < self.beta_start < self.beta_end and math.isfinite(self.beta_end)):
            raise ActsparseError(f"ReluAnneal needs 0 < beta_start < beta_end < inf, got {self.beta_start}, "
                                 f"{self.beta_end}")

    def beta(self, step: int, steps: int) -> float | None:
        """beta at optimizer step ``step`` of ``steps``; None once the activation is ReLU."""
        last = max(1, int(self.end * steps))
        if step >= last:
            return None
        return self.beta_start * (self.beta_end / self.beta_start) ** (step / last)


@dataclass
class TrainConfig:
    """Fine-tuning hyper-parameters. One optimizer step sees ``batch_size * seq_len`` tokens."""

    steps: int
    seq_len: int = 1024
    batch_size: int = 16  # sequences per optimizer step
    micro_batch_size: int = 16  # sequences per forward/backward; batch_size must be a multiple
    lr: float = 3e-4
    lr_schedule: str = "cosine"  # "cosine" (to min_lr_ratio * lr) or "constant", after warm-up
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 = off
    l1: L1Schedule | None = None  # None = no L1 term
    distill_alpha: float = 0.0  # weight of KL(teacher || student); 0 = off
    distill_temperature: float = 1.0
    hidden_distill: float = 0.0  # weight of the per-layer hidden-state MSE to the teacher; 0 = off
    fat_ramp: FatRamp | None = None  # FATReLU thresholds raised during training; None = T stays as is
    relu_anneal: ReluAnneal | None = None  # smooth SiLU -> ReLU over the first steps; None = ReLU from step 0
    bf16: bool = True  # autocast to bf16 on CUDA (weights and optimizer stay fp32)
    compile: bool = False  # torch.compile each decoder layer (student and teacher) for the run; same result
    # tokens per chunk of the loss (relu/loss.py: no [tokens, vocab] logits tensor); None = by the
    # vocabulary, 0 = the plain path through model(...).logits. The same loss either way.
    loss_chunk: int | None = None
    checkpoint_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end / stop
    checkpoint_minutes: float = 0.0  # also after this much wall time since the last one; 0 = off
    seed: int = 0
    log_every: int = 10

    def __post_init__(self):
        if isinstance(self.l1, dict):
            self.l1 = L1Schedule(**self.l1)
        if isinstance(self.fat_ramp, dict):
            self.fat_ramp = FatRamp(**self.fat_ramp)
        if isinstance(self.relu_anneal, dict):
            self.relu_anneal = ReluAnneal(**self.relu_anneal)
        check_positive_ints(self, "steps", "seq_len", "batch_size", "micro_batch_size")
        if self.seq_len < 2:
            raise ActsparseError("seq_len must be >= 2")
        if self.batch_size % self.micro_batch_size:
            raise ActsparseError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size {self.micro_batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ActsparseError(f"lr must be > 0, got {self.lr}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ActsparseError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ActsparseError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ActsparseError("min_lr_ratio must be in [0, 1]")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ActsparseError("weight_decay and grad_clip must be >= 0")
        if not 0 <= self.distill_alpha <= 1:
            raise ActsparseError(f"distill_alpha must be in [0, 1], got {self.distill_alpha}")
        if not (self.hidden_distill >= 0 and math.isfinite(self.hidden_distill)):
            raise ActsparseError(f"hidden_distill must be a finite number >= 0, got {self.hidden_distill}")
        if not self.distill_temperature > 0:
            raise ActsparseError("distill_temperature must be > 0")
        if self.l1 is not None and not isinstance(self.l1, L1Schedule):
            raise ActsparseError("l1 must be an L1Schedule or None")
        if self.fat_ramp is not None and not isinstance(self.fat_ramp, FatRamp):
            raise ActsparseError("fat_ramp must be a FatRamp or None")
        if self.relu_anneal is not None and not isinstance(self.relu_anneal, ReluAnneal):
            raise ActsparseError("relu_anneal must be a ReluAnneal or None")
        if self.compile and self.relu_anneal is not None:
            raise ActsparseError("compile and relu_anneal do not go together (the anneal changes a python float "
                                 "in every layer at every step, which would recompile the layers each step)")
        if self.relu_anneal is not None and self.fat_ramp is not None and self.fat_ramp.start < self.relu_anneal.end:
            raise ActsparseError(f"the FATReLU ramp starts at {self.fat_ramp.start} of the steps, before the "
                                 f"ReLU anneal ends ({self.relu_anneal.end}): thresholds need the ReLU")
        if self.l1 is not None and self.l1.total_steps > self.steps:
            raise ActsparseError(f"the L1 schedule spans {self.l1.total_steps} steps but training has {self.steps}")
        if self.loss_chunk is not None and self.loss_chunk < 0:
            raise ActsparseError(f"loss_chunk must be >= 0 (0 = plain path) or None (automatic), got {self.loss_chunk}")
        if self.checkpoint_every < 0 or self.log_every <= 0 or not self.checkpoint_minutes >= 0:
            raise ActsparseError("checkpoint_every and checkpoint_minutes must be >= 0 and log_every > 0")
        self.betas = tuple(self.betas)

    @property
    def batch_tokens(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def grad_accum(self) -> int:
        return self.batch_size // self.micro_batch_size

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` at optimizer step ``step``: linear warm-up, then cosine or constant."""
        if self.lr_schedule == "constant" and step >= self.warmup_steps:
            return 1.0
        return warmup_cosine(step, self.warmup_steps, self.steps, self.min_lr_ratio)


# Fields that must match when resuming (logging/checkpoint cadence may change).
_RESUME_KEYS = ("steps", "seq_len", "batch_size", "micro_batch_size", "lr", "lr_schedule", "warmup_steps",
                "min_lr_ratio", "weight_decay", "betas", "grad_clip", "l1", "distill_alpha",
                "distill_temperature", "hidden_distill", "fat_ramp", "relu_anneal", "bf16", "seed")


@dataclass
class TrainHistory:
    """Per-step figures of a run (one entry per optimizer step)."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)  # total loss
    lm_loss: list[float] = field(default_factory=list)  # cross-entropy of the student
    l1: list[float] = field(default_factory=list)  # mean over layers of mean|a|
    l1_factor: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    hidden: list[float] = field(default_factory=list)  # mean relative hidden-state error (hidden_distill)
    sparsity: list[float] = field(default_factory=list)  # zeros of act(gate(x)) in the step's batch
    lr: list[float] = field(default_factory=list)
    fat_level: list[float] = field(default_factory=list)  # FatRamp: the sparsity aimed at (nan before the ramp)
    fat_threshold: list[float] = field(default_factory=list)  # FatRamp: the largest T in force during the step
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    seconds: float = 0.0  # total wall time of the optimizer steps (this run and resumed parts)
    tokens: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else float("nan")


class PackedText:
    """The text as ``seq_len``-token windows; the window order of each epoch is a seeded permutation,
    so the batch of any step is a pure function of ``(seed, step)``."""

    def __init__(self, ids: torch.Tensor, seq_len: int, seed: int, extra: torch.Tensor | None = None):
        n = ids.numel() // seq_len
        if n == 0 and extra is None:
            raise ActsparseError(f"the training text has {ids.numel()} tokens, fewer than seq_len={seq_len}")
        self.windows = ids[: n * seq_len].view(n, seq_len)  # [W, T]
        if extra is not None:  # more windows, e.g. text sampled from the teacher (see synth.py)
            if extra.dim() != 2 or extra.shape[1] != seq_len:
                raise ActsparseError(f"extra windows must be [M, {seq_len}], got {tuple(extra.shape)}")
            self.windows = torch.cat([self.windows, extra.to(self.windows.dtype)])
        self.seed = seed
        self._perms: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.windows.shape[0]

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(len(self), generator=g)
        return self._perms[epoch]

    def batch(self, first_sample: int, size: int) -> torch.Tensor:
        """Samples ``first_sample .. first_sample + size - 1`` of the endless epoch stream. -> [size, T]"""
        rows = [self._perm(i // len(self))[i % len(self)] for i in range(first_sample, first_sample + size)]
        return self.windows[torch.stack(rows)]


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _config_dict(config: TrainConfig) -> dict:
    d = asdict(config)
    d["betas"] = list(d["betas"])
    return d


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, config: TrainConfig,
                    history: TrainHistory) -> None:
    """Write a training checkpoint atomically (tmp file in the same folder, then ``os.replace``)."""
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "step": step,
        "rng": _rng_state(),
        "train_config": _config_dict(config),
        "relu_config": getattr(model.config, "actsparse_relu", None),
        "history": asdict(history),
    }
    atomic_save(payload, path)


def _make_optimizer(model: nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, fused=device.type == "cuda")


def train_relu(model: nn.Module, tokenizer, text: str, config: TrainConfig,
               checkpoint_dir: str | os.PathLike | None = None, resume: bool = False,
               teacher: nn.Module | None = None, stop_after: int | None = None,
               progress: bool = True, extra_windows: torch.Tensor | None = None,
               stop_at: float | None = None) -> TrainHistory:
    """Fine-tune ``model`` in place on ``text`` (packed into ``seq_len`` windows); returns the history.

    The model is usually relufied first (:func:`relufy_`); the same function trains the SiLU control.
    checkpoint_dir: where ``checkpoint.pt`` is written every ``checkpoint_every`` steps, when
        ``stop_after`` is reached, and at the end. ``resume=True`` continues from it (an error if it
        is missing or was written with other hyper-parameters).
    teacher: the original model, required when ``distill_alpha > 0`` (kept frozen, same device).
    stop_after: stop once this many optimizer steps are done in total (a time-sliced job); a later
        call with ``resume=True`` finishes the run with the same result as an uninterrupted one.
    extra_windows: [M, seq_len] token ids trained on together with ``text`` (e.g. teacher samples,
        :func:`sample_teacher_windows`); a resumed run must be given the same ones.
    stop_at: a ``time.monotonic()`` deadline: once a step ends past it, a checkpoint is written and
        training stops (a job with a wall-clock limit); resume as with ``stop_after``. Needs
        ``checkpoint_dir``.
    """
    use_teacher = config.distill_alpha > 0 or config.hidden_distill > 0
    if use_teacher and teacher is None:
        raise ActsparseError("distill_alpha > 0 or hidden_distill > 0 needs the teacher (original) model")
    if stop_after is not None and stop_after <= 0:
        raise ActsparseError("stop_after must be a positive number of steps")
    if stop_at is not None and checkpoint_dir is None:
        raise ActsparseError("stop_at needs a checkpoint_dir (a run stopped by the clock resumes from it)")
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if resume and (ckpt_path is None or not ckpt_path.exists()):
        raise ActsparseError(f"nothing to resume: no {CHECKPOINT_FILE} in {checkpoint_dir}")

    if not any(p.requires_grad for p in model.parameters()):
        raise ActsparseError("no parameter of the model requires grad: call model.requires_grad_(True) first")
    if any(p.dtype != torch.float32 for p in model.parameters() if p.requires_grad):
        raise ActsparseError("train in float32 (load the model with dtype=float32): AdamW keeps fp32 weights, "
                             "and bf16 autocast is used on CUDA")
    device = next(model.parameters()).device
    data = PackedText(tokenize(tokenizer, text), config.seq_len, config.seed, extra=extra_windows)
    optimizer = _make_optimizer(model, config, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
    history = TrainHistory()
    start = 0
    if resume:
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)  # RNG states must stay on the CPU
        saved = state["train_config"]
        ours = _config_dict(config)
        diff = [k for k in _RESUME_KEYS if saved.get(k) != ours.get(k)]
        if diff:
            raise ActsparseError(f"cannot resume {ckpt_path}: it was written with other {', '.join(diff)}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        history = TrainHistory(**state["history"])
        _set_rng_state(state["rng"])
    else:
        torch.manual_seed(config.seed)
    end = config.steps if stop_after is None else min(config.steps, stop_after)

    use_autocast = config.bf16 and device.type == "cuda"
    autocast = lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_autocast)  # noqa: E731
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    model.train()
    bar = None
    if progress and end > start:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)

    ramp = _Ramp(model, config, device, history) if config.fat_ramp is not None else None
    annealed = _annealed_modules(model, fresh=start == 0) if config.relu_anneal is not None else []
    compiled = _compile_layers(model, teacher) if config.compile else []
    chunked = _chunked_parts(model, teacher if use_teacher else None, config)
    lm_dtype = torch.bfloat16 if use_autocast else None  # the dtype of the logits matmul under autocast
    last_checkpoint = time.monotonic()
    try:
        with ActivationTap(model, track_l1=True, count_zeros=True) as tap:
            for step in range(start, end):
                t0 = time.perf_counter()
                if annealed:  # a pure function of the step, so a resumed run continues the same path
                    beta = config.relu_anneal.beta(step, config.steps)
                    for m in annealed:
                        m.beta = beta
                if ramp is not None:
                    ramp.begin_step(step)
                factor = config.l1.factor(step) if config.l1 is not None else 0.0
                sums = torch.zeros(5, device=device)  # loss, lm, l1, kl, hidden
                tap.reset_counts()
                hidden_states = config.hidden_distill > 0
                for micro in range(config.grad_accum):
                    first = step * config.batch_size + micro * config.micro_batch_size
                    ids = data.batch(first, config.micro_batch_size).to(device)  # [b, T]
                    with autocast():
                        out = (model if chunked is None else chunked[0])(
                            input_ids=ids, use_cache=False, output_hidden_states=hidden_states)
                    if ramp is not None:
                        ramp.stop_sampling()  # one micro-batch's pre-activations are enough
                    l1 = tap.pop_l1()
                    hid = torch.zeros((), device=device)
                    t_out = None
                    if use_teacher:
                        with torch.no_grad(), autocast():
                            t_out = (teacher if chunked is None else chunked[1])(
                                input_ids=ids, use_cache=False, output_hidden_states=hidden_states)
                    loss, lm, kl = _lm_loss(out, t_out, ids, config, chunked, lm_dtype)
                    if hidden_states:
                        # every layer's output (embeddings excluded), relative to the teacher's energy
                        hid = torch.stack([(s.float() - t.float()).pow(2).mean() / t.float().pow(2).mean().clamp_min(1e-12)
                                           for s, t in zip(out.hidden_states[1:], t_out.hidden_states[1:])]).mean()
                        loss = loss + config.hidden_distill * hid
                    if factor > 0:
                        loss = loss + factor * l1
                    (loss / config.grad_accum).backward()
                    sums += torch.stack([loss.detach(), lm.detach(), l1.detach(), kl.detach(), hid.detach()]) \
                        / config.grad_accum
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
                lr = optimizer.param_groups[0]["lr"]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if ramp is not None:
                    ramp.end_step(step)  # the new thresholds apply from the next step

                loss_v, lm_v, l1_v, kl_v, hid_v = sums.tolist()  # one host sync per step
                if not math.isfinite(loss_v):
                    raise ActsparseError(f"training diverged at step {step} (loss {loss_v}); lower lr or the L1 peaks")
                history.step.append(step)
                history.loss.append(loss_v)
                history.lm_loss.append(lm_v)
                history.l1.append(l1_v)
                history.l1_factor.append(factor)
                history.kl.append(kl_v)
                history.hidden.append(hid_v)
                history.sparsity.append(tap.sparsity())
                history.lr.append(lr)
                history.step_seconds.append(time.perf_counter() - t0)
                history.seconds += history.step_seconds[-1]
                history.tokens += config.batch_tokens
                if bar is not None:
                    bar.update(1)
                    if (step + 1) % config.log_every == 0 or step + 1 == end:
                        bar.set_postfix(lm=f"{lm_v:.3f}", l1=f"{l1_v:.4f}", lam=f"{factor:.3g}",
                                        sparsity=f"{history.sparsity[-1]:.3f}")
                done = step + 1
                now = time.monotonic()
                out_of_time = stop_at is not None and done < end and now > stop_at
                if ckpt_path is not None and (
                    (config.checkpoint_every and done % config.checkpoint_every == 0) or done == end or out_of_time
                    or (config.checkpoint_minutes and now - last_checkpoint >= 60 * config.checkpoint_minutes)
                ):
                    save_checkpoint(ckpt_path, model, optimizer, scheduler, done, config, history)
                    last_checkpoint = time.monotonic()
                if out_of_time:
                    break
    finally:
        _uncompile(compiled)
    if bar is not None:
        bar.close()
    for m in annealed:  # a run stopped mid-anneal (stop_after) resumes it; the model handed back is ReLU
        m.beta = None
    model.eval()
    return history


def _chunked_parts(model: nn.Module, teacher: nn.Module | None, config: TrainConfig):
    """(student decoder, teacher decoder or None, student head, teacher head or None, soft-cap, chunk)
    for the chunked loss, or None for the plain path (``loss_chunk=0``, or a model not built as a
    decoder plus a linear head)."""
    if config.loss_chunk == 0:
        return None
    parts = lm_parts(model)
    t_parts = lm_parts(teacher) if teacher is not None else None
    if parts is None or (teacher is not None and (t_parts is None or t_parts[2] != parts[2])):
        return None
    chunk = config.loss_chunk or auto_chunk(parts[1].weight.shape[0])
    return (parts[0], t_parts[0] if t_parts else None, parts[1], t_parts[1] if t_parts else None, parts[2], chunk)


def _lm_loss(out, t_out, ids: torch.Tensor, config: TrainConfig, chunked, dtype):
    """(loss, lm, kl): ``(1 - distill_alpha) * cross-entropy + distill_alpha * tau^2 KL(teacher ||
    student)``; lm and kl carry no gradient where their weight is 0."""
    labels = ids[:, 1:].flatten()
    alpha, tau = config.distill_alpha, config.distill_temperature
    if chunked is not None:
        _, _, head, t_head, softcap, chunk = chunked
        last = lambda o: o.last_hidden_state[:, :-1].flatten(0, 1)  # noqa: E731  [b*(T-1), D]
        return chunked_lm_loss(last(out), head.weight, labels, alpha=alpha, tau=tau,
                               teacher_h=last(t_out) if alpha > 0 else None,
                               teacher_weight=t_head.weight if alpha > 0 else None,
                               chunk=chunk, softcap=softcap, dtype=dtype)
    logits = out.logits[:, :-1].flatten(0, 1).float()  # [b*(T-1), V]
    # weight 0 in the loss (pure distillation): logged only, no backward through it
    lm = F.cross_entropy(logits.detach() if alpha == 1 else logits, labels)
    if alpha == 0:
        return lm, lm.detach(), torch.zeros((), device=ids.device)
    t_logits = t_out.logits[:, :-1].flatten(0, 1).float()
    kl = F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(t_logits / tau, -1),
                  log_target=True, reduction="batchmean") * tau**2
    return (1 - alpha) * lm + alpha * kl, lm.detach(), kl.detach()


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    layers = getattr(getattr(model, "model", model), "layers", None)
    if layers is None:
        raise ActsparseError(f"compile: no decoder layers (model.model.layers) in {type(model).__name__}")
    return list(layers)


def _compile_layers(model: nn.Module, teacher: nn.Module | None) -> list[nn.Module]:
    """``torch.compile`` every decoder layer of the student (and teacher) in place ("regional"
    compilation: the layers share one compiled graph, so compiling costs about one layer's time).
    The activation hooks (L1, zero counts, FatRamp samples) run eagerly between the compiled parts.
    Returns the layers to hand to :func:`_uncompile`."""
    layers = _decoder_layers(model) + (_decoder_layers(teacher) if teacher is not None else [])
    for layer in layers:
        layer.compile()
    return layers


def _uncompile(layers: list[nn.Module]) -> None:
    """Undo :func:`_compile_layers`: the model handed back runs eagerly (as it does without compile)."""
    for layer in layers:
        layer._compiled_call_impl = None  # what nn.Module.compile() set


def _annealed_modules(model: nn.Module, fresh: bool) -> list[FATReLU]:
    """The FATReLUs a ReluAnneal drives; a fresh run (not a resumed one, whose FatRamp may have
    raised them) must start with thresholds 0, i.e. from the original activation."""
    acts = list(activation_modules(model).values())
    if not acts or not all(isinstance(m, FATReLU) for m in acts):
        raise ActsparseError("relu_anneal needs a relufied model (FATReLU activations): call relufy_ first")
    if fresh and any(float(m.threshold) != 0.0 for m in acts):
        raise ActsparseError("relu_anneal starts from the original activation: FATReLU thresholds must be 0")
    return acts


class _Ramp:
    """The FatRamp of one training run: samples ``gate(x)`` (the FATReLU inputs) in the first
    micro-batch of an update step, then sets the thresholds after the optimizer step."""

    def __init__(self, model: nn.Module, config: TrainConfig, device: torch.device, history: TrainHistory):
        self.model, self.ramp, self.device = model, config.fat_ramp, device
        self.steps, self.seed = config.steps, config.seed
        self.acts = activation_modules(model)
        if not all(isinstance(m, FATReLU) for m in self.acts.values()):
            raise ActsparseError("fat_ramp needs a relufied model (FATReLU activations): call relufy_ first")
        self.history = history
        self.thresholds = fat_thresholds(model)  # kept here, so a step reads no threshold back from the device
        started = [v for v in history.fat_level if math.isfinite(v)]  # a resumed run keeps its start
        self.from_level = started[0] if started else None
        self.level = history.fat_level[-1] if history.fat_level else float("nan")
        self.samples: dict[str, torch.Tensor] = {}
        self.handles = []

    def begin_step(self, step: int) -> None:
        self.samples.clear()
        if self.ramp.updates_at(step, self.steps):
            gen = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + step)
            for name, module in self.acts.items():
                self.handles.append(module.register_forward_hook(self._hook(name, gen)))

    def _hook(self, name: str, gen: torch.Generator):
        @torch.compiler.disable
        def hook(module, inputs, out):
            g = inputs[0].detach().reshape(-1)  # gate(x), [B*T*F]
            idx = torch.randint(0, g.numel(), (self.ramp.samples,), device=g.device, generator=gen)
            self.samples[name] = g[idx].float().clamp_min(0.0)  # relu(gate(x)): T below 0 cuts nothing
        return hook

    def stop_sampling(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def end_step(self, step: int) -> None:
        self.history.fat_threshold.append(max(self.thresholds.values()))
        if self.samples:
            if self.from_level is None:  # the sparsity the model has when the ramp starts
                self.from_level = float(torch.stack([(v <= self.thresholds[n]).float().mean()
                                                     for n, v in self.samples.items()]).mean())
            self.level = self.ramp.level(step, self.steps, self.from_level)
            if self.ramp.per_layer:
                self.thresholds = {n: threshold_at_level(v, self.level) for n, v in self.samples.items()}
            else:
                t = threshold_at_level(torch.cat(list(self.samples.values())), self.level)
                self.thresholds = {n: t for n in self.samples}
            set_fat_thresholds_(self.model, self.thresholds)
            self.samples.clear()
        self.history.fat_level.append(self.level)
