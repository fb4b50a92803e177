"""The ReLU path: relufication, FATReLU, ProSparse progressive-L1 fine-tuning.

    from actsparse.relu import ReluConfig, TrainConfig, L1Schedule, relufy_, train_relu
    relufy_(model, ReluConfig())                       # SiLU/GELU -> ReLU (FATReLU at T=0)
    train_relu(model, tok, text, TrainConfig(steps=200, l1=L1Schedule([(50, 0.0), (150, 1.0)])))
    select_fat_threshold_(model, tok, holdout_text, FatThresholdConfig(max_ppl_increase=0.01))

Few training tokens? Fit each relufied MLP to the original one first (``distill_mlps_``, or
``relufy_and_train(..., layerwise=LayerwiseConfig(steps=...))``), then train end to end with
distillation (``TrainConfig(distill_alpha=1, hidden_distill=...)``), on more text sampled from the
original model if needed (``sample_teacher_windows``, passed as ``extra_windows``).
Everything at once: :func:`relufy_and_train`.
"""

from .fat import FatThresholdConfig, FatThresholdResult, select_fat_threshold_
from .layerwise import LayerwiseConfig, LayerwiseHistory, distill_mlps_
from .measure import ActivationTap, EvalResult, evaluate_relu
from .modules import (
    FATReLU,
    ReluConfig,
    ReLUAfterNorm,
    activation_modules,
    fat_thresholds,
    hf_state_dict,
    load_relufied,
    mlp_input_norm_name,
    relufy_,
    save_relufied,
    set_fat_thresholds_,
)
from .pipeline import RelufyResult, relufy_and_train, split_holdout
from .synth import SampleConfig, sample_teacher_windows
from .train import FatRamp, L1Schedule, ReluAnneal, TrainConfig, TrainHistory, train_relu

__all__ = [
    "ActivationTap", "EvalResult", "FATReLU", "FatThresholdConfig", "FatThresholdResult", "L1Schedule",
    "LayerwiseConfig", "LayerwiseHistory", "ReLUAfterNorm", "ReluAnneal", "ReluConfig", "RelufyResult", "SampleConfig", "TrainConfig",
    "TrainHistory", "activation_modules", "distill_mlps_", "evaluate_relu", "fat_thresholds", "hf_state_dict",
    "load_relufied", "mlp_input_norm_name", "relufy_", "relufy_and_train", "sample_teacher_windows", "save_relufied",
    "select_fat_threshold_", "set_fat_thresholds_", "split_holdout", "train_relu",
]
