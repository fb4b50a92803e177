"""Observing the MLP intermediate activation ``a = act(gate(x))``: L1 terms, zero counts, samples.

``a`` is what decides which rows of ``down_proj`` (and of ``up_proj`` in a fused gate/up kernel) a
decode step must read: where ``a == 0`` the product ``a * up(x)`` is zero whatever ``up`` is. So the
"MLP-intermediate sparsity" reported here is the fraction of exact zeros of ``a``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import ActsparseError
from .modules import activation_modules


class ActivationTap:
    """Forward hooks on every ``mlp.act_fn``; use as a context manager (hooks removed on exit).

    track_l1: keep ``mean|a|`` of each layer *with* its graph, for the ProSparse L1 loss.
    count_zeros: accumulate exact-zero counts per layer (on device, no host sync).
    sample_per_call: keep this many random values of ``a`` per layer per forward (for choosing
        FATReLU thresholds by quantile); 0 = none.
    """

    def __init__(self, model: nn.Module, track_l1: bool = False, count_zeros: bool = True,
                 sample_per_call: int = 0, seed: int = 0):
        self.modules = activation_modules(model)
        self.names = list(self.modules)
        self.track_l1 = track_l1
        self.count_zeros = count_zeros
        self.sample_per_call = sample_per_call
        self._gen = torch.Generator().manual_seed(seed)
        self._handles = []
        self.l1_terms: list[torch.Tensor] = []
        self.zeros: list[torch.Tensor | int] = [0] * len(self.names)
        self.total: list[int] = [0] * len(self.names)
        self.samples: list[list[torch.Tensor]] = [[] for _ in self.names]

    def __enter__(self) -> "ActivationTap":
        for i, module in enumerate(self.modules.values()):
            self._handles.append(module.register_forward_hook(self._make_hook(i)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, index: int):
        @torch.compiler.disable  # python-side bookkeeping: a compiled layer (train_relu's compile) runs it eagerly
        def hook(module, inputs, a):
            # a: [B, T, F]
            if self.track_l1:
                self.l1_terms.append(a.abs().mean(dtype=torch.float32))
            if self.count_zeros:
                self.zeros[index] = self.zeros[index] + (a == 0).sum()
                self.total[index] += a.numel()
            if self.sample_per_call:
                flat = a.detach().reshape(-1)
                idx = torch.randint(0, flat.numel(), (self.sample_per_call,), generator=self._gen)
                self.samples[index].append(flat[idx.to(flat.device)].float().cpu())
        return hook

    def pop_l1(self) -> torch.Tensor:
        """Mean over layers of ``mean|a|`` since the last call (the tensor the L1 loss scales)."""
        if not self.l1_terms:
            raise ActsparseError("no MLP activation was recorded: did the forward pass run?")
        l1 = torch.stack(self.l1_terms).mean()
        self.l1_terms.clear()
        return l1

    def reset_counts(self) -> None:
        self.zeros = [0] * len(self.names)
        self.total = [0] * len(self.names)

    def sparsity(self) -> float:
        """Fraction of exact zeros over every layer's ``a`` seen since the last reset."""
        total = sum(self.total)
        if total == 0:
            return float("nan")
        return float(torch.as_tensor(sum(self.zeros)).item()) / total  # summed on the device: one sync

    def layer_sparsity(self) -> dict[str, float]:
        return {n: (torch.as_tensor(z).item() / t if t else float("nan"))
                for n, z, t in zip(self.names, self.zeros, self.total)}

    def layer_samples(self) -> dict[str, torch.Tensor]:
        return {n: torch.cat(s) if s else torch.empty(0) for n, s in zip(self.names, self.samples)}


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one id stream, no special tokens added. -> [N] int64."""
    ids = torch.as_tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    return ids[0] if ids.dim() == 2 else ids  # tokenizers called with return_tensors give [1, N]


@dataclass
class EvalResult:
    """Perplexity and MLP-intermediate sparsity of one model on one text."""

    perplexity: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    tokens: int  # tokens predicted
    sparsity: float  # fraction of exact zeros of act(gate(x)), all layers
    layer_sparsity: dict[str, float] = field(default_factory=dict)


@torch.no_grad()
def evaluate_relu(model: nn.Module, tokenizer, text: str, context: int = 1024, max_tokens: int = 65536,
                  batch_size: int = 8, ids: torch.Tensor | None = None) -> EvalResult:
    """Perplexity over non-overlapping ``context``-token windows of the first ``max_tokens`` tokens,
    and the MLP-intermediate sparsity measured in the same forward passes.

    Same semantics as ``actsparse.evaluate.perplexity``: the text is tokenized without special
    tokens, its first ``max_tokens`` tokens are cut into windows of ``context`` tokens (a tail
    shorter than a window is dropped), each window is scored independently and the first token of
    a window is not predicted; perplexity = exp(mean NLL over all predicted tokens). Windows are
    batched ``batch_size`` at a time; runs in the model's dtype.
    """
    if context < 2 or max_tokens < 2:
        raise ActsparseError("context and max_tokens must be >= 2")
    ids = tokenize(tokenizer, text) if ids is None else ids
    ids = ids[:max_tokens]
    n = ids.numel() // context
    if n == 0:
        raise ActsparseError(f"the evaluation text has {ids.numel()} tokens, fewer than one window of {context}")
    windows = ids[: n * context].view(n, context)  # [W, T]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, count = 0.0, 0
    with ActivationTap(model, count_zeros=True) as tap:
        for b in range(0, n, batch_size):
            batch = windows[b:b + batch_size].to(device)  # [B, T]
            logits = model(input_ids=batch, use_cache=False).logits  # [B, T, V]
            nll = nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum"
            )
            nll_sum += nll.item()
            count += batch[:, 1:].numel()
    model.train(was_training)
    mean_nll = nll_sum / count
    return EvalResult(perplexity=math.exp(mean_nll), nll=mean_nll, tokens=count,
                      sparsity=tap.sparsity(), layer_sparsity=tap.layer_sparsity())
