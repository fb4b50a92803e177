"""Layer-wise MLP distillation: fit each relufied MLP to the original MLP before end-to-end training.

Swapping SiLU for ReLU breaks small SwiGLU models (SmolLM2-135M: perplexity 23 -> 3800) because the
negative lobe of SiLU carries much of the MLP output: 40-65% of each middle layer's output energy
is lost. End-to-end fine-tuning learns back from one label per token, which few tokens cannot do.
Here every token gives each layer a ``d_model``-dimensional regression target instead: the teacher
(original model) runs on the text, each of its MLPs records its input ``x_i`` and output ``y_i``,
and the student's relufied MLP ``i`` is trained on the same ``x_i`` to minimise

    ||mlp_i(x_i) - y_i||^2 / E[y_i^2]  +  lambda(step) * mean|act(gate(x_i))|

All layers train in one pass and independently (each sees the teacher's inputs, so errors do not
compound here; the end-to-end stage that follows, :func:`train_relu` with distillation, fixes the
compounding). Only the MLP weights of the student move.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ActsparseError
from ..models import decoder_layers
from .measure import ActivationTap, tokenize
from .modules import ReLUAfterNorm, mlp_input_norm_name
from .train import L1Schedule, PackedText, check_positive_ints, warmup_cosine


@dataclass
class LayerwiseConfig:
    """Hyper-parameters of :func:`distill_mlps_`. One step sees ``batch_size * seq_len`` tokens."""

    steps: int
    seq_len: int = 1024
    batch_size: int = 8
    lr: float = 1e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decay to min_lr_ratio * lr after the warm-up
    l1: L1Schedule | None = None  # L1 on each layer's act(gate(x)); None = off
    bf16: bool = True  # autocast on CUDA (weights and Adam state stay fp32)
    seed: int = 0
    log_every: int = 10

    def __post_init__(self):
        if isinstance(self.l1, dict):
            self.l1 = L1Schedule(**self.l1)
        check_positive_ints(self, "steps", "seq_len", "batch_size", "log_every")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ActsparseError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ActsparseError(f"warmup_steps must be in [0, steps), got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ActsparseError("min_lr_ratio must be in [0, 1]")
        if self.l1 is not None and not isinstance(self.l1, L1Schedule):
            raise ActsparseError("l1 must be an L1Schedule or None")
        if self.l1 is not None and self.l1.total_steps > self.steps:
            raise ActsparseError(f"the L1 schedule spans {self.l1.total_steps} steps but there are {self.steps}")

    def lr_factor(self, step: int) -> float:
        return warmup_cosine(step, self.warmup_steps, self.steps, self.min_lr_ratio)


@dataclass
class LayerwiseHistory:
    """Per step: mean relative squared error over layers, L1 factor, sparsity; final per-layer error."""

    step: list[int] = field(default_factory=list)
    rel_error: list[float] = field(default_factory=list)
    l1_factor: list[float] = field(default_factory=list)
    sparsity: list[float] = field(default_factory=list)
    initial_layer_error: list[float] = field(default_factory=list)  # before the first update
    final_layer_error: list[float] = field(default_factory=list)  # on the last step's batch
    seconds: float = 0.0
    tokens: int = 0


def distill_mlps_(student: nn.Module, teacher: nn.Module, tokenizer, text: str, config: LayerwiseConfig,
                  progress: bool = True, extra_windows: torch.Tensor | None = None) -> LayerwiseHistory:
    """Train the MLPs of ``student`` (relufied, see :func:`relufy_`) in place to reproduce the MLPs
    of ``teacher`` (the original model, same architecture, frozen) on ``text``; returns the history.

    Attention, norms and embeddings of the student are not changed. The student must be float32
    (Adam keeps fp32 weights; bf16 autocast is used on CUDA). ``extra_windows``: [M, seq_len] token
    ids used together with ``text`` (e.g. teacher samples).
    """
    _, s_layers = decoder_layers(student)
    _, t_layers = decoder_layers(teacher)
    if len(s_layers) != len(t_layers):
        raise ActsparseError(f"student has {len(s_layers)} layers, teacher {len(t_layers)}")
    params = [p for layer in s_layers for p in layer.mlp.parameters()]
    if any(p.dtype != torch.float32 for p in params):
        raise ActsparseError("distill the MLPs in float32 (load the model with dtype=float32)")
    device = params[0].device
    data = PackedText(tokenize(tokenizer, text), config.seq_len, config.seed, extra=extra_windows)

    # with relu_after_norm the student's MLP sees relu(norm(x)) where the teacher's sees norm(x)
    relu_in = [isinstance(getattr(layer, mlp_input_norm_name(layer)), ReLUAfterNorm) for layer in s_layers]
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(i):
        def hook(module, inputs, out):
            captured[i] = (inputs[0].detach(), out.detach())
        return hook

    handles = [layer.mlp.register_forward_hook(capture(i)) for i, layer in enumerate(t_layers)]
    teacher.eval().requires_grad_(False)
    trainable_before = {id(p): p.requires_grad for p in student.parameters()}
    student.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    for layer in s_layers:
        layer.mlp.train()
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, config.lr_factor)
    use_autocast = config.bf16 and device.type == "cuda"
    n_layers = len(s_layers)
    history = LayerwiseHistory()
    scale = None  # E[y_i^2] of each layer, from the first batch (fixed for the run)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=config.steps, desc="layer-wise MLP distillation", unit="step", dynamic_ncols=True)
    torch.manual_seed(config.seed)
    try:
        with ActivationTap(student, track_l1=True, count_zeros=True) as tap:
            for step in range(config.steps):
                t0 = time.perf_counter()
                factor = config.l1.factor(step) if config.l1 is not None else 0.0
                ids = data.batch(step * config.batch_size, config.batch_size).to(device)
                captured.clear()
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                    teacher(input_ids=ids, use_cache=False)
                if len(captured) != n_layers:
                    raise ActsparseError("the teacher's MLP hooks did not fire in every layer")
                if scale is None:
                    scale = [captured[i][1].float().pow(2).mean().clamp_min(1e-12) for i in range(n_layers)]
                tap.reset_counts()
                errors = []
                for i, layer in enumerate(s_layers):
                    x, y = captured[i]
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                        out = layer.mlp(torch.relu(x) if relu_in[i] else x)
                    err = (out.float() - y.float()).pow(2).mean() / scale[i]
                    l1 = tap.pop_l1()
                    loss = err + factor * l1 if factor > 0 else err
                    (loss / n_layers).backward()
                    errors.append(err.detach())
                errors = torch.stack(errors).tolist()  # one host sync per step
                if step == 0:
                    history.initial_layer_error = errors
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                mean_err = sum(errors) / n_layers
                if not math.isfinite(mean_err):
                    raise ActsparseError(f"layer-wise distillation diverged at step {step}; lower lr")
                history.step.append(step)
                history.rel_error.append(mean_err)
                history.l1_factor.append(factor)
                history.sparsity.append(tap.sparsity())
                history.final_layer_error = errors
                history.seconds += time.perf_counter() - t0
                history.tokens += ids.numel()
                if bar is not None:
                    bar.update(1)
                    if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                        bar.set_postfix(rel_err=f"{mean_err:.4f}", lam=f"{factor:.3g}",
                                        sparsity=f"{history.sparsity[-1]:.3f}")
    finally:
        for h in handles:
            h.remove()
        for p in student.parameters():
            p.requires_grad_(trainable_before[id(p)])
        if bar is not None:
            bar.close()
    student.eval()
    return history
