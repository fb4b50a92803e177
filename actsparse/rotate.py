"""Rotate the residual stream (LaRoSa-style PCA) so that magnitude thresholds lose less.

Zeroing the smallest ``|x_i|`` of an input removes the energy of those coordinates. In the basis of
the principal components of the inputs, energy is concentrated in fewer coordinates (the eigenvalues
majorize the diagonal of the covariance in any other basis), so the same fraction of zeros removes
less of it. LaRoSa (Liu et al., 2025) rotates each layer's input by the PCA of its calibration
activations.

Here one orthogonal ``Q`` [D, D] (eigenvectors of the second moment of the normalized residual stream,
pooled over every block's attention and MLP inputs) rotates the whole residual stream, and is folded
into the weights so that it costs nothing at run time:

1. every RMSNorm scale is folded into the linears it feeds (q/k/v, gate/up, lm_head), leaving norms
   with unit scale, which commute with ``Q`` (``rms(x Q) = rms(x)``). Gemma's ``(1 + w)`` scale is
   handled: the neutral weight is 0 there. A tied lm_head is untied first;
2. ``E <- E Q`` (embeddings), ``W <- W Q`` for the linears that read the stream (q/k/v, gate/up,
   lm_head), ``W <- Q^T W`` and ``b <- b Q`` for those that write to it (o, down).

Per-head rotations ``R_j`` (PCA of the attention output of each KV group) are folded into the output
side of v_proj and the input side of o_proj: exact because attention mixes value vectors linearly.
The input of down cannot be rotated for free: ``act(gate) * up`` is elementwise, so no rotation of
``h`` passes through it; down keeps its basis.

Costs and limits:

* LaRoSa uses a different ``Q_l`` per layer with residual adapters ``Q_l^T Q_{l+1}`` (D^2 extra
  weights per layer); one global ``Q`` is free but fits each layer less well.
* Gemma2/3 norm the attention and MLP *outputs* (post-norms) before adding them to the stream; a
  scaled norm does not commute with ``Q``, so there the post-norm's output is multiplied by ``Q`` at
  run time (:class:`RotatedNorm`, 2 D^2 extra weights per block, reported in ``Rotation.meta``).
* Qwen3/Gemma3 q/k norms act on the output side of q/k, untouched.
* Measured on SmolLM2-135M (``docs/notes/criteria.md``): the residual rotation does *not* help there.
  Each principal coordinate mixes many channels and is closer to Gaussian than the peaked raw
  channels, which outweighs the energy concentration: at equal sparsity the q/k/v and gate/up output
  errors are 25-30 % higher, and calibrated thresholds give less sparsity on new text. The heads
  rotation halves the o input's error. ``RotationConfig(residual=False)`` rotates the heads only.

A rotated model is a different model: calibrate it again. The config hash stays, the weight
fingerprint changes (heads-only rotation leaves q and down, hence the fingerprint, unchanged:
:func:`rotation_signature` also reads v and o). A calibration made on a rotated model carries ``Q``
(extras ``rotation/*``) and :func:`prepare_model_` applies it to a freshly loaded model before
thresholds are used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ActsparseError
from .models import decoder_layers, weight_fingerprint


@dataclass
class RotationConfig:
    """Calibration text used for the PCA, and whether to rotate attention heads too."""

    tokens: int = 16384
    seq_len: int = 1024
    residual: bool = True  # one PCA rotation of the residual stream (inputs of q/k/v and gate/up)
    heads: bool = True  # per-KV-group rotation of the attention output (v_proj out, o_proj in)

    def __post_init__(self):
        if self.seq_len < 2 or self.tokens < self.seq_len:
            raise ActsparseError(f"rotation needs tokens >= seq_len >= 2, got {self.tokens}, {self.seq_len}")
        if not (self.residual or self.heads):
            raise ActsparseError("a rotation needs residual=True or heads=True")


@dataclass
class Rotation:
    """The orthogonal matrices folded into a model, enough to rotate a fresh copy the same way."""

    residual: torch.Tensor | None  # Q: [D, D], columns = principal directions, descending variance
    heads: torch.Tensor | None = None  # R: [layers, kv_heads, head_dim, head_dim] or None
    meta: dict = field(default_factory=dict)  # source_fingerprint, tokens, eigenvalue spread, ...

    def extras(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.residual is not None:
            out["rotation/residual"] = self.residual.double().cpu().contiguous()
        if self.heads is not None:
            out["rotation/heads"] = self.heads.double().cpu().contiguous()
        return out

    @classmethod
    def from_calibration(cls, calib) -> "Rotation | None":
        meta = calib.meta.get("rotation")
        if not meta:
            return None
        residual, heads = calib.extras.get("rotation/residual"), calib.extras.get("rotation/heads")
        if residual is None and heads is None:
            raise ActsparseError("calibration names a rotation but holds no rotation matrix")
        return cls(residual, heads, dict(meta))


class RotatedNorm(nn.Module):
    """``norm(x) @ Q``: a Gemma post-norm whose output joins the rotated residual stream.

    Not free: a D x D product per call (the only run-time cost of rotation, Gemma2/3 only).
    """

    def __init__(self, norm: nn.Module, rotation: torch.Tensor):  # rotation: [D, D]
        super().__init__()
        self.norm = norm
        weight = next(norm.parameters())
        self.register_buffer("rotation", rotation.to(weight.device, torch.float32).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [..., D]
        y = self.norm(x)
        return (y.float() @ self.rotation).to(y.dtype)


# -- structure -----------------------------------------------------------------------------------
def _block_norms(layer: nn.Module) -> tuple[nn.Module, nn.Module, list[str]]:
    """(norm before attention, norm before the MLP, names of output post-norms) of one block."""
    if hasattr(layer, "pre_feedforward_layernorm"):  # Gemma2/3: sandwich norms
        return layer.input_layernorm, layer.pre_feedforward_layernorm, ["post_attention_layernorm",
                                                                         "post_feedforward_layernorm"]
    return layer.input_layernorm, layer.post_attention_layernorm, []


def _final_norm(model: nn.Module) -> nn.Module:
    prefix, _ = decoder_layers(model)
    return model.get_submodule(prefix.rsplit(".", 1)[0] + ".norm")


def _embedding(model: nn.Module) -> nn.Embedding:
    return model.get_input_embeddings()


@torch.no_grad()
def _norm_offset(norm: nn.Module) -> float:
    """1.0 for norms that scale by ``(1 + w)`` (Gemma), 0.0 for ``w`` (Llama): measured, not assumed."""
    w = norm.weight
    saved = w.detach().clone()
    try:
        w.zero_()
        probe = torch.ones(1, w.numel(), dtype=w.dtype, device=w.device)
        out = norm(probe)
    finally:
        w.copy_(saved)
    return 1.0 if bool(out.abs().max() > 0.5) else 0.0


@torch.no_grad()
def _fold_norm_into(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """``W <- W diag(scale)`` for every linear fed by ``norm``, then make the norm's scale 1."""
    offset = _norm_offset(norm)
    scale = norm.weight.detach().double() + offset  # [D]
    for lin in linears:
        lin.weight.copy_((lin.weight.double() * scale[None, :]).to(lin.weight.dtype))
    norm.weight.fill_(1.0 - offset)


@torch.no_grad()
def untie_lm_head_(model: nn.Module) -> None:
    """Give lm_head its own weight (the rotation treats it and the embeddings differently)."""
    head, emb = model.get_output_embeddings(), _embedding(model)
    if head is None:
        raise ActsparseError(f"{type(model).__name__} has no lm_head to rotate")
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():
        head.weight = nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
            cfg.tie_word_embeddings = False
    if hasattr(model, "get_expanded_tied_weights_keys"):  # transformers 5: forget the tie mapping too
        model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


@torch.no_grad()
def fold_norms_(model: nn.Module) -> None:
    """Fold every RMSNorm scale that feeds a linear into it (exact up to rounding; idempotent)."""
    _, layers = decoder_layers(model)
    for layer in layers:
        attn_norm, mlp_norm, _ = _block_norms(layer)
        attn, mlp = layer.self_attn, layer.mlp
        _fold_norm_into(attn_norm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_norm_into(mlp_norm, [mlp.gate_proj, mlp.up_proj])
    untie_lm_head_(model)
    _fold_norm_into(_final_norm(model), [model.get_output_embeddings()])


def _check_dense(model: nn.Module) -> None:
    from .sparsify import sparse_linears

    if sparse_linears(model) or any(getattr(m, "is_gate_threshold", False) for m in model.modules()):
        raise ActsparseError("rotate a dense model (before sparsify_ or calibration), not a sparsified one")
    _, layers = decoder_layers(model)
    if any(isinstance(getattr(layer, n, None), RotatedNorm) for layer in layers
           for n in ("post_attention_layernorm", "post_feedforward_layernorm")):
        raise ActsparseError("model is already rotated")


def _head_shape(model: nn.Module) -> tuple[int, int, int]:
    """(attention heads, KV heads, head_dim), from the modules."""
    _, layers = decoder_layers(model)
    attn = layers[0].self_attn
    cfg = model.config
    head_dim = (getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None)
                or cfg.hidden_size // cfg.num_attention_heads)
    return attn.o_proj.in_features // head_dim, attn.v_proj.out_features // head_dim, head_dim


# -- statistics ------------------------------------------------------------------------------------
def _principal_basis(second_moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal eigenvectors (columns, descending eigenvalue; sign: largest entry positive)."""
    c = 0.5 * (second_moment + second_moment.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(c)  # ascending
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    idx = evecs.abs().argmax(dim=-2, keepdim=True)
    signs = torch.sign(torch.gather(evecs, -2, idx))
    signs[signs == 0] = 1
    return evecs * signs, evals


@torch.no_grad()
def collect_statistics(model: nn.Module, tokenizer, text: str, config: RotationConfig,
                       progress: bool = False) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Second moments of the normalized residual inputs (pooled, [D, D]) and of the attention output
    per KV group ([layers, kv_heads, head_dim, head_dim]), in float64. Call after :func:`fold_norms_`."""
    from .calibrate import tokenize_windows

    _, layers = decoder_layers(model)
    n_heads, n_kv, head_dim = _head_shape(model)
    group = n_heads // n_kv
    dim = model.config.hidden_size
    device = next(model.parameters()).device
    # accumulate on the model's device: a CPU round trip per hook costs minutes on a 16k-token run
    residual = torch.zeros(dim, dim, dtype=torch.float64, device=device)
    heads = torch.zeros(len(layers), n_kv, head_dim, head_dim, dtype=torch.float64, device=device)
    windows = tokenize_windows(tokenizer, text, config.seq_len, config.tokens, "rotation")

    def add_residual(mod, args, out):
        x = out.detach().reshape(-1, dim).double()
        residual.add_(x.T @ x)

    def add_heads(mod, args, i):
        a = args[0].detach().reshape(-1, n_kv, group, head_dim).double()  # heads of a KV group
        a = a.permute(1, 0, 2, 3).reshape(n_kv, -1, head_dim)  # [kv, tokens * group, hd]
        heads[i].add_(a.transpose(1, 2) @ a)

    handles = []
    for i, layer in enumerate(layers):
        attn_norm, mlp_norm, _ = _block_norms(layer)
        if config.residual:
            handles.append(attn_norm.register_forward_hook(add_residual))
            handles.append(mlp_norm.register_forward_hook(add_residual))
        if config.heads:
            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: add_heads(m, a, i)))
    try:
        for w in tqdm(windows, desc="rotation statistics", unit="window", disable=not progress):
            model(input_ids=w[None].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return residual.cpu(), heads.cpu(), int(windows.numel())


# -- folding the rotation into the weights -----------------------------------------------------------
@torch.no_grad()
def _in_side(lin: nn.Linear, m: torch.Tensor) -> None:
    """The linear now reads ``x M`` instead of x: ``W <- W M``."""
    lin.weight.copy_((lin.weight.double() @ m.to(lin.weight.device)).to(lin.weight.dtype))


@torch.no_grad()
def _out_side(lin: nn.Linear, m: torch.Tensor) -> None:
    """The linear now writes ``y M`` instead of y: ``W <- M^T W``, ``b <- b M``."""
    m = m.to(lin.weight.device)
    lin.weight.copy_((m.T @ lin.weight.double()).to(lin.weight.dtype))
    if lin.bias is not None:
        lin.bias.copy_((lin.bias.double() @ m).to(lin.bias.dtype))


@torch.no_grad()
def apply_rotation_(model: nn.Module, rotation: Rotation) -> nn.Module:
    """Fold ``rotation`` into a dense model's weights (norms folded first). Logits are unchanged."""
    _check_dense(model)
    prefix, layers = decoder_layers(model)
    n_heads, n_kv, head_dim = _head_shape(model)
    group = n_heads // n_kv
    dim = model.config.hidden_size
    q = None if rotation.residual is None else rotation.residual.double()
    if q is not None and q.shape != (dim, dim):
        raise ActsparseError(f"rotation is {tuple(q.shape)}, the model's hidden size is {dim}")
    if rotation.heads is not None and tuple(rotation.heads.shape) != (len(layers), n_kv, head_dim, head_dim):
        raise ActsparseError(f"head rotations are {tuple(rotation.heads.shape)}, the model needs "
                             f"{(len(layers), n_kv, head_dim, head_dim)}")
    if q is not None:
        fold_norms_(model)
        emb = _embedding(model)
        emb.weight.copy_((emb.weight.double() @ q.to(emb.weight.device)).to(emb.weight.dtype))
        _in_side(model.get_output_embeddings(), q)
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        if q is not None:
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                _in_side(lin, q)
            _, _, post_norms = _block_norms(layer)
            if post_norms:  # Gemma: outputs are normed before joining the stream; rotate after the norm
                for name in post_norms:
                    setattr(layer, name, RotatedNorm(getattr(layer, name), q))
            else:
                _out_side(attn.o_proj, q)
                _out_side(mlp.down_proj, q)
        if rotation.heads is not None:
            r = rotation.heads[i].double()  # [kv, hd, hd]
            _out_side(attn.v_proj, torch.block_diag(*r))
            _in_side(attn.o_proj, torch.block_diag(*[r[h // group] for h in range(n_heads)]))
    return model


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def rotation_signature(model: nn.Module) -> str:
    """Signs of sampled q/v/o/down weights of the first and last block: tells a model from its rotated
    self even when only the heads were rotated (``models.weight_fingerprint`` reads q and down only)."""
    h = hashlib.sha256()
    _, layers = decoder_layers(model)
    for layer in (layers[0], layers[-1]):
        for name in ("self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.down_proj"):
            w = layer.get_submodule(name).weight
            sample = w.detach().flatten()[:: max(1, w.numel() // 4096)].float().cpu()
            h.update((sample > 0).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def rotate_(model: nn.Module, tokenizer, text: str, config: RotationConfig | None = None,
            progress: bool = False) -> Rotation:
    """Rotate a dense model in place by the PCA of its residual stream on ``text``; return the rotation.

    The logits do not change (up to rounding); the inputs of q/k/v, gate/up (and o, with ``heads``)
    are now expressed in principal components. Calibrate the rotated model afterwards.
    """
    config = config or RotationConfig()
    _check_dense(model)
    source, source_signature = weight_fingerprint(model), rotation_signature(model)
    if config.residual:
        fold_norms_(model)  # the statistics are those of the unit-scale norm outputs
    residual, heads, tokens = collect_statistics(model, tokenizer, text, config, progress)
    q, evals = _principal_basis(residual) if config.residual else (None, torch.ones(1))
    head_q = _principal_basis(heads)[0] if config.heads else None
    _, layers = decoder_layers(model)
    post = sum(1 for layer in layers for _ in _block_norms(layer)[2]) if config.residual else 0
    top = evals.clamp_min(0)
    meta = {
        "method": "pca-" + "+".join(n for n, on in (("residual", config.residual), ("heads", config.heads)) if on),
        "residual": bool(config.residual),
        "source_fingerprint": source,
        "source_signature": source_signature,
        "tokens": tokens,
        "text_sha256": _digest(text),
        "heads": bool(config.heads),
        # share of the residual second moment in the top half of the principal components
        "energy_top_half": float(top[: len(top) // 2].sum() / top.sum()) if config.residual else None,
        "runtime_extra_weights": post * model.config.hidden_size ** 2,  # Gemma post-norm products
    }
    rotation = Rotation(q, head_q, meta)
    apply_rotation_(model, rotation)
    meta["rotated_signature"] = rotation_signature(model)
    return rotation


def prepare_model_(model: nn.Module, calib) -> nn.Module:
    """Make a freshly loaded model match ``calib``: apply its rotation if it has one, then check."""
    rotation = Rotation.from_calibration(calib)
    if rotation is not None:
        signature = rotation_signature(model)
        if signature == rotation.meta.get("source_signature"):
            apply_rotation_(model, rotation)
        elif signature != rotation.meta.get("rotated_signature"):
            raise ActsparseError("calibration was made for a rotated copy of another model; re-calibrate this model")
    calib.check_model(model)
    return model


def calibrate_rotated(model: nn.Module, tokenizer, text: str, config=None, rotation: RotationConfig | None = None,
                      text_name: str = "<text>", progress: bool = True):
    """Rotate ``model`` in place, then calibrate it; the calibration carries the rotation."""
    from .calibrate import calibrate

    rot = rotate_(model, tokenizer, text, rotation, progress=progress)
    calib = calibrate(model, tokenizer, text, config, text_name=text_name, progress=progress)
    calib.extras.update(rot.extras())
    calib.meta["rotation"] = rot.meta
    return calib


__all__ = ["Rotation", "RotationConfig", "RotatedNorm", "apply_rotation_", "calibrate_rotated", "collect_statistics",
           "fold_norms_", "prepare_model_", "rotate_", "rotation_signature", "untie_lm_head_"]
