"""The whole ProSparse-style recipe in one call (what ``actsparse relufy`` runs).

relufy -> fine-tune (progressive L1, optional distillation from the original model) -> choose the
FATReLU threshold on held-out calibration text -> save an HF folder + ``actsparse_relu.json``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import nn

from ..errors import ActsparseError
from .fat import FatThresholdConfig, FatThresholdResult, select_fat_threshold_
from .modules import ReluConfig, relufy_, save_relufied
from .train import TrainConfig, TrainHistory, train_relu


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


def relufy_and_train(model: nn.Module, tokenizer, text: str, out_dir: str | os.PathLike,
                     train: TrainConfig, relu: ReluConfig | None = None,
                     fat: FatThresholdConfig | None = None, holdout_fraction: float = 0.05,
                     resume: bool = False, progress: bool = True) -> RelufyResult:
    """Relufy ``model`` in place, fine-tune it on ``text``, pick the FATReLU threshold, save it.

    text: calibration/training text; its last ``holdout_fraction`` (cut at a line break) is held
        out of training and used only to choose the FATReLU threshold (``fat``; None = keep T = 0).
    out_dir: receives ``checkpoints/checkpoint.pt`` during training and, at the end, an HF folder
        (activation "relu") with ``actsparse_relu.json`` (thresholds, configs, training summary).
    resume: continue from ``out_dir/checkpoints`` after an interruption.
    With ``train.distill_alpha > 0`` a frozen copy of the original model is the teacher.
    """
    relu = relu or ReluConfig()
    out_dir = Path(out_dir)
    train_text, holdout_text = split_holdout(text, holdout_fraction if fat is not None else 0.0)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if train.distill_alpha > 0 else None
    relufy_(model, relu)
    history = train_relu(model, tokenizer, train_text, train, checkpoint_dir=out_dir / "checkpoints",
                         resume=resume, teacher=teacher, progress=progress)
    del teacher
    fat_result = select_fat_threshold_(model, tokenizer, holdout_text, fat) if fat is not None else None
    metadata = {
        "relu_config": asdict(relu),
        "train_config": asdict(train),
        "fat_config": asdict(fat) if fat is not None else None,
        "fat_result": asdict(fat_result) if fat_result is not None else None,
        "final_lm_loss": history.lm_loss[-1] if history.lm_loss else None,
        "final_train_sparsity": history.sparsity[-1] if history.sparsity else None,
        "tokens": history.tokens,
    }
    save_relufied(model, tokenizer, out_dir, metadata=json.loads(json.dumps(metadata, default=str)))
    return RelufyResult(out_dir=out_dir, history=history, fat=fat_result)
