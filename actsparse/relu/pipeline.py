"""The whole ProSparse-style recipe in one call (what ``actsparse relufy`` runs).

relufy -> (optional) sample more text from the original model -> (optional) layer-wise MLP
distillation -> fine-tune (progressive L1, optional distillation from the original model) ->
choose the FATReLU threshold on held-out calibration text -> save an HF folder +
``actsparse_relu.json``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ActsparseError
from .fat import FatThresholdConfig, FatThresholdResult, select_fat_threshold_
from .layerwise import LayerwiseConfig, LayerwiseHistory, distill_mlps_
from .measure import tokenize
from .modules import ReluConfig, relufy_, save_relufied
from .synth import SampleConfig, sample_teacher_windows
from .train import TrainConfig, TrainHistory, atomic_save, train_relu


def split_holdout(text: str, holdout_fraction: float) -> tuple[str, str]:
    """Split ``text`` at the line break nearest the ``1 - holdout_fraction`` point: (train, holdout)."""
    if not 0 <= holdout_fraction < 1:
        raise ActsparseError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    if holdout_fraction == 0:
        return text, ""
    cut = int(len(text) * (1 - holdout_fraction))
    nl = text.rfind("\n", 0, cut)
    cut = nl + 1 if nl > 0 else cut
    return text[:cut], text[cut:]


@dataclass
class RelufyResult:
    out_dir: Path
    history: TrainHistory
    fat: FatThresholdResult | None
    layerwise: LayerwiseHistory | None = None


def relufy_and_train(model: nn.Module, tokenizer, text: str, out_dir: str | os.PathLike,
                     train: TrainConfig, relu: ReluConfig | None = None,
                     fat: FatThresholdConfig | None = None, holdout_fraction: float = 0.05,
                     resume: bool = False, progress: bool = True,
                     layerwise: LayerwiseConfig | None = None,
                     sample: SampleConfig | None = None) -> RelufyResult:
    """Relufy ``model`` in place, fine-tune it on ``text``, pick the FATReLU threshold, save it.

    text: calibration/training text; its last ``holdout_fraction`` (cut at a line break) is held
        out of training and used only to choose the FATReLU threshold (``fat``; None = keep T = 0).
    out_dir: receives ``checkpoints/checkpoint.pt`` during training and, at the end, an HF folder
        (activation "relu") with ``actsparse_relu.json`` (thresholds, configs, training summary).
    resume: continue from ``out_dir/checkpoints`` after an interruption.
    layerwise: first fit every relufied MLP to the original one (:func:`distill_mlps_`), on the
        same training text; its result is kept in ``checkpoints/layerwise.pt``, so a resumed run
        does not repeat it.
    sample: first sample this much text from the original model (prompted by training-text
        prefixes) and train on it together with the training text (layer-wise stage included);
        kept in ``checkpoints/samples.pt`` and reused on resume. Useful with distillation only.
    With ``train.distill_alpha > 0`` or ``train.hidden_distill > 0`` (or ``layerwise``) a frozen
    copy of the original model is the teacher.
    """
    relu = relu or ReluConfig()
    out_dir = Path(out_dir)
    train_text, holdout_text = split_holdout(text, holdout_fraction if fat is not None else 0.0)
    need_teacher = train.distill_alpha > 0 or train.hidden_distill > 0 or layerwise is not None
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if need_teacher or sample else None
    ckpt_dir = out_dir / "checkpoints"
    lw_path = ckpt_dir / "layerwise.pt"
    resume_training = resume and (ckpt_dir / "checkpoint.pt").exists()
    if resume and not resume_training and not (layerwise is not None and lw_path.exists()):
        raise ActsparseError(f"nothing to resume: no checkpoint in {ckpt_dir}")
    extra = None
    if sample is not None:
        samples_path = ckpt_dir / "samples.pt"
        if resume and samples_path.exists():
            extra = torch.load(samples_path, weights_only=True)
        else:
            if sample.seq_len != train.seq_len:
                raise ActsparseError(f"sample.seq_len {sample.seq_len} differs from train.seq_len {train.seq_len}")
            extra = sample_teacher_windows(teacher, tokenize(tokenizer, train_text), sample, progress=progress)
            atomic_save(extra, samples_path)
        if not need_teacher:
            teacher = None
    relufy_(model, relu)
    lw_history = None
    if layerwise is not None and not resume_training:
        if resume:  # interrupted after the layer-wise stage, before the first training checkpoint
            model.load_state_dict(torch.load(lw_path, map_location="cpu", weights_only=True))
        else:
            lw_history = distill_mlps_(model, teacher, tokenizer, train_text, layerwise, progress=progress,
                                       extra_windows=extra)
            atomic_save(model.state_dict(), lw_path)
    history = train_relu(model, tokenizer, train_text, train, checkpoint_dir=ckpt_dir,
                         resume=resume_training, teacher=teacher, progress=progress, extra_windows=extra)
    del teacher
    fat_result = select_fat_threshold_(model, tokenizer, holdout_text, fat) if fat is not None else None
    metadata = {
        "relu_config": asdict(relu),
        "train_config": asdict(train),
        "layerwise_config": asdict(layerwise) if layerwise is not None else None,
        "sample_config": asdict(sample) if sample is not None else None,
        "layerwise_final_rel_error": lw_history.rel_error[-1] if lw_history else None,
        "fat_config": asdict(fat) if fat is not None else None,
        "fat_result": asdict(fat_result) if fat_result is not None else None,
        "final_lm_loss": history.lm_loss[-1] if history.lm_loss else None,
        "final_train_sparsity": history.sparsity[-1] if history.sparsity else None,
        "tokens": history.tokens,
    }
    save_relufied(model, tokenizer, out_dir, metadata=json.loads(json.dumps(metadata, default=str)))
    return RelufyResult(out_dir=out_dir, history=history, fat=fat_result, layerwise=lw_history)
