"""Building engine models: from Hugging Face folders or loaded models, or with random weights.

Everything is built on ``meta`` first and filled with ``load_state_dict(assign=True)``, so no
weight is ever initialised twice or staged on the CPU: an 8B model in bf16 goes straight from the
safetensors files (or ``torch.randn`` on the GPU) into place. Shapes come from the config; the
checkpoint decides which biases exist (Qwen2's q/k/v biases have no config field).
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import torch

from ..errors import ActsparseError
from .model import ModelArgs, Transformer




def _hf_to_engine_state_dict(tensors: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Rename Hugging Face tensors to engine names, concatenating q/k/v and gate/up along N."""
    sd = {"tok_embeddings.weight": tensors["model.embed_tokens.weight"], "norm.weight": tensors["model.norm.weight"]}
    if not args.tie_word_embeddings:
        sd["output.weight"] = tensors["lm_head.weight"]
    for i in range(args.n_layer):
        p, e = f"model.layers.{i}", f"layers.{i}"
        sd[f"{e}.attention_norm.weight"] = tensors[f"{p}.input_layernorm.weight"]
        sd[f"{e}.ffn_norm.weight"] = tensors[f"{p}.post_attention_layernorm.weight"]
        fused = {
            "attention.wqkv": [f"{p}.self_attn.{n}_proj" for n in "qkv"],
            "attention.wo": [f"{p}.self_attn.o_proj"],
            "feed_forward.w13": [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"],
            "feed_forward.w2": [f"{p}.mlp.down_proj"],
        }
        for ours, theirs in fused.items():
            for kind in ("weight", "bias"):
                parts = [tensors.get(f"{n}.{kind}") for n in theirs]
                if all(t is not None for t in parts):
                    sd[f"{e}.{ours}.{kind}"] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return sd


def _read_safetensors(path: Path, device, dtype) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ActsparseError(f"no *.safetensors files in {path}")
    tensors = {}
    for f in files:  # sharded checkpoints: every shard, whatever the index says
        with safe_open(f, framework="pt", device=str(device)) as fh:
            for key in fh.keys():
                name = key if key.startswith(("model.", "lm_head.")) else f"model.{key}"
                tensors[name] = fh.get_tensor(key).to(dtype)
    return tensors


def load_hf(path: str | os.PathLike, device="cuda", dtype=torch.bfloat16) -> Transformer:
    """Load a Llama/Mistral/Qwen2 Hugging Face folder (config.json + *.safetensors) onto ``device``."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise ActsparseError(f"{path} is not a Hugging Face model folder (no config.json)")
    args = ModelArgs.from_hf_config(json.loads((path / "config.json").read_text()))
    tensors = _read_safetensors(path, device, dtype)
    # The checkpoint decides the biases (Qwen2 q/k/v biases have no config field).
    args.qkv_bias = "model.layers.0.self_attn.q_proj.bias" in tensors
    args.o_bias = "model.layers.0.self_attn.o_proj.bias" in tensors
    args.mlp_bias = "model.layers.0.mlp.down_proj.bias" in tensors
    if "lm_head.weight" not in tensors:
        args.tie_word_embeddings = True
    with torch.device("meta"):
        model = Transformer(args, dtype=dtype)
    try:
        _assign_weights(model, _hf_to_engine_state_dict(tensors, args))
    except KeyError as exc:
        raise ActsparseError(f"cannot load {path} into the engine: missing tensor {exc}") from exc
    from ..relu.modules import read_relu_info  # noqa: PLC0415

    info = read_relu_info(path)  # a relufied model (actsparse.relu.save_relufied)
    if info is not None:
        _apply_relu_info(model, info["fat_thresholds"], info["relu_after_norm"])
    return model


_NO_RELU_AFTER_NORM = ("the decode engine does not run models relufied with relu_after_norm; "
                       "use the Hugging Face path (engine 'hf')")


def _apply_relu_info(model: Transformer, fat_thresholds: dict[str, float], relu_after_norm: bool) -> None:
    """FATReLU thresholds of a relufied model onto the engine's MLPs (``model.layers.<i>.mlp.act_fn``)."""
    if relu_after_norm:
        raise ActsparseError(_NO_RELU_AFTER_NORM)
    for name, t in fat_thresholds.items():
        parts = name.split(".")
        if len(parts) != 5 or parts[:2] != ["model", "layers"] or parts[3:] != ["mlp", "act_fn"]:
            raise ActsparseError(f"unexpected FATReLU site name {name!r}")
        model.layers[int(parts[2])].feed_forward.set_act_threshold_(float(t))


@torch.no_grad()
def random_model(name_or_args: str | ModelArgs, device="cuda", dtype=torch.bfloat16, seed: int = 0,
                 std: float = 0.02) -> Transformer:
    """A random-weight model of a named shape, created directly on ``device`` (no CPU copy)."""
    args = ModelArgs.from_name(name_or_args) if isinstance(name_or_args, str) else name_or_args
    with torch.device("meta"):
        model = Transformer(args, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if name == "output.weight" and args.tie_word_embeddings:
            continue
        if name.endswith("norm.weight"):
            sd[name] = torch.ones(p.shape, device=device, dtype=dtype)
        else:
            sd[name] = (torch.randn(p.shape, device=device, dtype=dtype, generator=gen) * std)
    _assign_weights(model, sd)
    return model


def _assign_weights(model: Transformer, sd: dict[str, torch.Tensor]) -> None:
    """``load_state_dict(assign=True)`` onto a ``meta`` model, then re-tie the embeddings if tied."""
    tied = model.args.tie_word_embeddings
    sd = {k: v for k, v in sd.items() if not (tied and k == "output.weight")}
    missing, unexpected = model.load_state_dict(sd, assign=True, strict=False)
    if set(missing) != ({"output.weight"} if tied else set()) or unexpected:
        raise ActsparseError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
    if tied:
        model.output.weight = model.tok_embeddings.weight
    model.requires_grad_(False).eval()


def hf_config(args: ModelArgs):
    """The ``transformers`` config of the same architecture (for baselines and tests)."""
    from transformers import AutoConfig

    config = dict(args.extra)
    return AutoConfig.for_model(config.pop("model_type", args.model_type), **config)


def hf_state_dict_views(model: Transformer) -> dict[str, torch.Tensor]:
    """Hugging Face names -> views of a dense engine's weights (no copy: fused rows are contiguous)."""
    args = model.args
    # detach(): new tensors on the same storage, so the HF model gets Parameters of its own and a later
    # hf.float() cannot turn the engine's bf16 embeddings and norms into fp32 (it did, once)
    sd = {"model.embed_tokens.weight": model.tok_embeddings.weight.detach(),
          "model.norm.weight": model.norm.weight.detach(), "lm_head.weight": model.output.weight.detach()}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}"
        sd[f"{p}.input_layernorm.weight"] = layer.attention_norm.weight.detach()
        sd[f"{p}.post_attention_layernorm.weight"] = layer.ffn_norm.weight.detach()
        splits = [
            (layer.attention.wqkv, [f"{p}.self_attn.{n}_proj" for n in "qkv"], [args.q_size, args.kv_size, args.kv_size]),
            (layer.attention.wo, [f"{p}.self_attn.o_proj"], [args.dim]),
            (layer.feed_forward.w13, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], [args.intermediate_size] * 2),
            (layer.feed_forward.w2, [f"{p}.mlp.down_proj"], [args.dim]),
        ]
        for linear, names, sizes in splits:
            if linear.sparse:
                raise ActsparseError("hf_state_dict_views needs a dense engine")
            for kind in ("weight", "bias"):
                t = getattr(linear, kind)
                if t is not None:
                    for n, part in zip(names, t.detach().split(sizes, dim=0)):
                        sd[f"{n}.{kind}"] = part
    return sd


def engine_from_hf_model(hf_model, device=None, dtype=None) -> tuple[Transformer, dict[str, torch.Tensor] | None, bool]:
    """A dense engine from a loaded Hugging Face model (plain or with actsparse SparseLinear layers).

    Returns (engine, thresholds found in SparseLinear buffers or None, prefill_dense flag).
    """
    from ..relu.modules import ReLUAfterNorm  # noqa: PLC0415

    args = ModelArgs.from_hf_config(hf_model.config.to_dict())
    if any(isinstance(m, ReLUAfterNorm) for m in hf_model.modules()):
        raise ActsparseError(_NO_RELU_AFTER_NORM)
    tensors, thresholds, fat, prefill_dense = {}, {}, {}, False
    for name, t in hf_model.state_dict().items():
        if name.endswith(".thresholds"):
            thresholds[name[: -len(".thresholds")]] = t.detach().float().cpu()
        elif name.endswith("mlp.act_fn.threshold"):  # FATReLU of a relufied model
            fat[name[: -len(".threshold")]] = float(t)
        elif not name.endswith("._weight_t"):
            tensors[name] = t.detach()
    for mod in hf_model.modules():
        prefill_dense |= bool(getattr(mod, "prefill_dense", False))
    device = device or next(hf_model.parameters()).device
    dtype = dtype or next(hf_model.parameters()).dtype
    tensors = {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}
    args.qkv_bias = "model.layers.0.self_attn.q_proj.bias" in tensors
    args.o_bias = "model.layers.0.self_attn.o_proj.bias" in tensors
    args.mlp_bias = "model.layers.0.mlp.down_proj.bias" in tensors
    with torch.device("meta"):
        model = Transformer(args, dtype=dtype)
    _assign_weights(model, _hf_to_engine_state_dict(tensors, args))
    _apply_relu_info(model, fat, False)
    gate = [n for n, t in thresholds.items() if n.endswith(".act_fn") and bool((t != 0).any())]
    if gate:
        raise ActsparseError(
            f"the decode engine does not run gate-aware (CATS) thresholds yet ({gate[0]}); "
            "use the Hugging Face path (engine 'hf') for this model")
    thresholds = {n: t for n, t in thresholds.items() if not n.endswith(".act_fn")}
    if thresholds and all(bool((t == 0).all()) for t in thresholds.values()):
        thresholds = {}
    return model, (thresholds or None), prefill_dense


def hf_model_from_engine(model: Transformer):
    """A ``transformers`` model sharing a dense engine's weights (views, no copy): the baseline."""
    from transformers import AutoModelForCausalLM

    config = hf_config(model.args)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    missing, unexpected = hf.load_state_dict(hf_state_dict_views(model), assign=True, strict=False)
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise ActsparseError(f"engine weights do not fit {type(hf).__name__}: {missing} {unexpected}")
    if model.args.tie_word_embeddings:
        hf.lm_head.weight = hf.model.embed_tokens.weight
    # non-persistent buffers (RoPE inverse frequencies) were created on meta: rebuild them
    with torch.device(model.device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)
    return hf.eval()
