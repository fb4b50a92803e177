"""Relufication: swap the MLP activation of a Hugging Face decoder for ReLU / FATReLU.

Why ReLU: SiLU and GELU outputs are almost never exactly zero, so the rows of ``down_proj`` (and,
with a fused gate/up kernel, the rows of ``up_proj``) must all be read at every decode step. After
ReLU, most of ``act(gate(x))`` is exactly zero and a sparse kernel skips the weights those zeros
multiply. FATReLU (ProSparse) raises the cut from 0 to a small ``T`` to drop the many tiny positive
values that ReLU lets through.

Every supported family computes its MLP as ``down(act_fn(gate(x)) * up(x))`` with ``act_fn`` a
module attribute, so relufication is a module swap of ``mlp.act_fn``. The threshold lives in a
registered buffer, so it travels with ``state_dict``.

``relu_after_norm=True`` is stage 2 of "ReLU strikes back" (Mirzadeh et al., 2023): a ReLU after the
norm that feeds attention and after the norm that feeds the MLP, so the inputs of q/k/v and of
gate/up become sparse too. Which norm feeds the MLP differs by family: Llama/Mistral/Qwen use
``post_attention_layernorm``; Gemma2/3 use ``pre_feedforward_layernorm`` (their
``post_attention_layernorm`` normalises the attention *output* before the residual add).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ActsparseError
from ..models import decoder_layers

RELU_CONFIG_FILE = "actsparse_relu.json"


class FATReLU(nn.Module):
    """Forced-activation-threshold ReLU: ``x if x > threshold else 0``.

    ``threshold`` is a 0-d fp32 buffer (part of ``state_dict``). With threshold 0 this is exactly
    ``torch.relu`` on every finite input. The comparison is strict, like the keep rule of
    ``CONTRACTS.md`` (an element equal to the threshold is zeroed).
    """

    def __init__(self, threshold: float = 0.0):
        super().__init__()
        _check_threshold(threshold)
        self.register_buffer("threshold", torch.tensor(float(threshold), dtype=torch.float32))
        # Training only (ReluAnneal): while set, the module computes x * sigmoid(beta * x), SiLU at
        # beta = 1 and ReLU as beta grows, and ignores the threshold. Not saved: the trained model is
        # the ReLU one.
        self.beta: float | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.beta is not None:
            return x * torch.sigmoid(self.beta * x)
        # x: [..., F]; multiply by the mask so the gradient is 1 where kept and 0 elsewhere.
        return x * (x > self.threshold)

    def extra_repr(self) -> str:
        return f"threshold={self.threshold.item():.6g}"


class ReLUAfterNorm(nn.Module):
    """``relu(norm(x))``: makes the input of the linears that follow the norm sparse.

    The original norm is kept as the child ``norm`` so any family's norm (Llama's ``w * x_hat`` or
    Gemma's ``(1 + w) * x_hat`` in fp32) keeps its own arithmetic. Its state_dict keys gain a
    ``.norm`` segment; :func:`hf_state_dict` maps them back for saving a plain HF folder.
    """

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(x))


@dataclass
class ReluConfig:
    """How :func:`relufy_` changes a model.

    threshold: FATReLU threshold T for every MLP (0.0 = plain ReLU). ``layer_thresholds`` overrides
        it per MLP activation, keyed by qualified module name (``model.layers.3.mlp.act_fn``).
    relu_after_norm: also insert ReLU after the attention-input and MLP-input norms.
    """

    threshold: float = 0.0
    layer_thresholds: dict[str, float] | None = None
    relu_after_norm: bool = False

    def __post_init__(self):
        _check_threshold(self.threshold)
        if self.layer_thresholds is not None:
            if not isinstance(self.layer_thresholds, dict):
                raise ActsparseError("layer_thresholds must be a dict {module name: threshold}")
            for name, t in self.layer_thresholds.items():
                if not isinstance(name, str):
                    raise ActsparseError(f"layer_thresholds keys must be module names, got {name!r}")
                _check_threshold(t, name)
        if not isinstance(self.relu_after_norm, bool):
            raise ActsparseError("relu_after_norm must be True or False")


def _check_threshold(t, what: str = "threshold") -> None:
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ActsparseError(f"FATReLU {what} must be a finite number >= 0, got {t!r}")


def mlp_input_norm_name(layer: nn.Module) -> str:
    """Attribute name of the norm whose output feeds gate/up (family dependent, see module doc)."""
    return "pre_feedforward_layernorm" if hasattr(layer, "pre_feedforward_layernorm") else "post_attention_layernorm"


def activation_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified name: mlp.act_fn module}`` for every decoder block, in forward order."""
    prefix, layers = decoder_layers(model)
    return {f"{prefix}.{i}.mlp.act_fn": layer.mlp.act_fn for i, layer in enumerate(layers)}


@torch.no_grad()
def relufy_(model: nn.Module, config: ReluConfig | None = None) -> nn.Module:
    """Replace every MLP activation by FATReLU (ReLU at threshold 0), in place; returns ``model``.

    Idempotent: on an already relufied model it only updates thresholds and adds missing norm
    ReLUs. The model config records the change (``hidden_act``/``hidden_activation`` = "relu" and
    ``actsparse_relu``) so :func:`save_relufied` / :func:`load_relufied` can rebuild it.
    """
    config = config or ReluConfig()
    prefix, layers = decoder_layers(model)
    known = set(activation_modules(model))
    unknown = set(config.layer_thresholds or {}) - known
    if unknown:
        raise ActsparseError(f"layer_thresholds names no MLP activation: {sorted(unknown)[:3]}")
    for i, layer in enumerate(layers):
        name = f"{prefix}.{i}.mlp.act_fn"
        t = (config.layer_thresholds or {}).get(name, config.threshold)
        act = layer.mlp.act_fn
        if isinstance(act, FATReLU):
            act.threshold.fill_(t)
        else:
            device = layer.mlp.gate_proj.weight.device
            layer.mlp.act_fn = FATReLU(t).to(device)
        if config.relu_after_norm:
            for norm_name in ("input_layernorm", mlp_input_norm_name(layer)):
                norm = getattr(layer, norm_name)
                if not isinstance(norm, ReLUAfterNorm):
                    setattr(layer, norm_name, ReLUAfterNorm(norm))
    hf_config = model.config
    for field in ("hidden_act", "hidden_activation"):
        if getattr(hf_config, field, None) is not None:
            setattr(hf_config, field, "relu")
    recorded = asdict(config)
    recorded["layer_thresholds"] = fat_thresholds(model)
    recorded["relu_after_norm"] = config.relu_after_norm or has_relu_after_norm(model)
    hf_config.actsparse_relu = recorded
    return model


def has_relu_after_norm(model: nn.Module) -> bool:
    return any(isinstance(m, ReLUAfterNorm) for m in model.modules())


def fat_thresholds(model: nn.Module) -> dict[str, float]:
    """``{qualified name of mlp.act_fn: T}`` for every FATReLU of the model."""
    return {n: float(m.threshold) for n, m in activation_modules(model).items() if isinstance(m, FATReLU)}


@torch.no_grad()
def set_fat_thresholds_(model: nn.Module, thresholds: float | dict[str, float]) -> nn.Module:
    """Set the FATReLU threshold of every MLP (a float) or of the named ones (a dict)."""
    acts = activation_modules(model)
    if not all(isinstance(m, FATReLU) for m in acts.values()):
        raise ActsparseError("the model is not relufied: call relufy_(model, ReluConfig()) first")
    if not isinstance(thresholds, dict):
        thresholds = {n: thresholds for n in acts}
    for name, t in thresholds.items():
        if name not in acts:
            raise ActsparseError(f"{name} is not an MLP activation of this model")
        _check_threshold(t, name)
        acts[name].threshold.fill_(float(t))
    if hasattr(model.config, "actsparse_relu"):
        model.config.actsparse_relu["layer_thresholds"] = fat_thresholds(model)
    return model


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict with HF's own key names: FATReLU buffers dropped, norm wrappers unwrapped."""
    wrapped = [n for n, m in model.named_modules() if isinstance(m, ReLUAfterNorm)]
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("mlp.act_fn.threshold"):
            continue
        for w in wrapped:
            if key.startswith(w + ".norm."):
                key = w + "." + key[len(w) + len(".norm."):]
                break
        out[key] = value
    return out


def save_relufied(model: nn.Module, tokenizer, out_dir: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Save a relufied model as a plain HF folder (activation "relu") plus ``actsparse_relu.json``.

    A plain ``from_pretrained`` of the folder gives the model with ReLU at threshold 0 and without
    the norm ReLUs; :func:`load_relufied` restores FATReLU thresholds and norm ReLUs as well.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if getattr(model.config, "quantization_config", None) is not None:  # dequantized GGUF
        del model.config.quantization_config
        model.hf_quantizer = None
    model.save_pretrained(out_dir, state_dict=hf_state_dict(model))
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    info = {
        "relu_after_norm": has_relu_after_norm(model),
        "fat_thresholds": fat_thresholds(model),
        "metadata": metadata or {},
    }
    tmp = out_dir / (RELU_CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(info, indent=2, default=str))
    os.replace(tmp, out_dir / RELU_CONFIG_FILE)
    return out_dir


def read_relu_info(path: str | os.PathLike) -> dict | None:
    """The record ``save_relufied`` wrote in ``path`` ({"fat_thresholds": {site: T},
    "relu_after_norm": bool, ...}), checked; None if ``path`` holds none."""
    info_path = Path(path) / RELU_CONFIG_FILE
    if not info_path.is_file():
        return None
    try:
        info = json.loads(info_path.read_text())
        thresholds = {str(k): float(v) for k, v in info["fat_thresholds"].items()}
        after_norm = info["relu_after_norm"]
        if not isinstance(after_norm, bool):
            raise TypeError(f"relu_after_norm must be true or false, got {after_norm!r}")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ActsparseError(f"{info_path} is not a valid actsparse ReLU record: {exc}") from exc
    return {**info, "fat_thresholds": thresholds}


def restore_relu_(model: nn.Module, path: str | os.PathLike) -> dict:
    """Apply the FATReLU thresholds and norm ReLUs recorded in ``path/actsparse_relu.json`` to a
    model loaded from that folder; returns the recorded info. (``load_model`` calls it.)"""
    info = read_relu_info(path)
    if info is None:
        raise ActsparseError(f"{path} holds no {RELU_CONFIG_FILE}: not written by save_relufied")
    relufy_(model, ReluConfig(layer_thresholds=info["fat_thresholds"], relu_after_norm=info["relu_after_norm"]))
    return info


def load_relufied(path: str | os.PathLike, dtype=torch.float32, device="cpu"):
    """Load a folder written by :func:`save_relufied`; returns ``(model, tokenizer, info)``."""
    from ..models import load_model

    info = read_relu_info(path)
    if info is None:
        raise ActsparseError(f"{path} holds no {RELU_CONFIG_FILE}: not written by save_relufied")
    model, tokenizer = load_model(path, dtype=dtype, device=device)  # restores thresholds (restore_relu_)
    return model, tokenizer, info
