"""The fine-tune's language-model loss in chunks of tokens: cross-entropy and KL to the teacher
without the whole ``[tokens, vocab]`` logits tensor.

The plain path (``model(ids).logits``, a float cast, two log-softmaxes, the KL and the logged
cross-entropy, and their backward) passes over 8k x 49k fp32 logits a dozen times per SmolLM2 step,
and at a 128k-256k vocabulary (Llama 3, Gemma) the copies alone take gigabytes. Here the decoder
runs without its head; each chunk of tokens gets its logits (student and teacher), its loss, and the
gradient of the loss with respect to those logits in closed form, which is folded into the gradients
of the hidden states and the head weight at once (as Liger-Kernel's fused linear cross-entropy
does). Only one chunk of logits is alive at a time, and backward has no logits left to go through.

Gradients, for the mean over N tokens (z: student logits, q = softmax(z / tau), p = the teacher's):
- cross-entropy: (softmax(z) - onehot(label)) / N
- tau^2 * KL(p || q): tau * (q - p) / N
- Gemma's soft-capping z = c * tanh(raw / c): times 1 - tanh(raw / c)^2
"""
from __future__ import annotations

import torch
import torch.nn as nn

# fp32 logits elements per chunk (512 MiB); the chunk in tokens follows from the vocabulary
CHUNK_ELEMENTS = 1 << 27


def auto_chunk(vocab: int) -> int:
    """Tokens per chunk for a vocabulary: as many as fit ``CHUNK_ELEMENTS`` logits, at least 1."""
    return max(1, CHUNK_ELEMENTS // vocab)


def lm_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear, float | None] | None:
    """(decoder without the head, the head, the final soft-cap) of a Hugging Face causal LM, or None
    where the model is not built that way (then the caller keeps the plain path)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(head, nn.Linear) or head.bias is not None or decoder is None or decoder is model:
        return None
    config = getattr(model, "config", None)
    if getattr(config, "logit_scale", None) not in (None, 1.0):  # a head that scales its logits: not ours
        return None
    return decoder, head, getattr(config, "final_logit_softcapping", None)


def _logits(h: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, softcap: float | None):
    raw = (h.to(dtype) @ weight.t()).float()  # weight already in dtype
    if softcap is None:
        return raw, None
    t = torch.tanh(raw / softcap)
    return t * softcap, t


class _ChunkedLMLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, t_h, t_weight, labels, alpha, tau, chunk, softcap, dtype):
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        ctx.weight_dtype = weight.dtype
        weight = weight.to(dtype)
        t_weight = t_weight.to(dtype) if alpha > 0 else None
        ce_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        kl_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, n, chunk):
            sl = slice(start, min(n, start + chunk))
            z, tanh = _logits(h[sl], weight, dtype, softcap)  # [c, V] fp32
            lab = labels[sl]
            logp = torch.log_softmax(z, -1)
            ce_sum += -logp.gather(1, lab[:, None]).sum()
            grad = None
            if alpha < 1:
                grad = logp.exp_()  # softmax(z), in place of logp (not needed any more)
                grad[torch.arange(grad.shape[0], device=grad.device), lab] -= 1
                grad *= (1 - alpha) / n
            del logp
            if alpha > 0:
                with torch.no_grad():
                    zt, _ = _logits(t_h[sl], t_weight, dtype, softcap)
                    log_pt = torch.log_softmax(zt / tau, -1)
                    del zt
                log_q = torch.log_softmax(z / tau, -1)
                pt = log_pt.exp()
                kl_sum += (pt * (log_pt - log_q)).sum()
                del log_pt
                g_kl = log_q.exp_().sub_(pt).mul_(alpha * tau / n)  # alpha * tau * (q - p) / N
                del pt
                grad = g_kl if grad is None else grad.add_(g_kl)
                del g_kl
            del z
            if tanh is not None:
                grad *= 1 - tanh * tanh
            g = grad.to(dtype)
            if grad_h is not None:
                grad_h[sl] = (g @ weight).to(h.dtype)
            if grad_w is not None:
                grad_w += (g.t() @ h[sl].to(dtype)).float()
        lm = ce_sum / n
        kl = kl_sum / n * tau * tau
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(lm, kl)
        return (1 - alpha) * lm + alpha * kl, lm, kl

    @staticmethod
    def backward(ctx, g_loss, g_lm, g_kl):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * g_loss if grad_h is not None else None
        gw = (grad_w * g_loss).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None, None


def chunked_lm_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, alpha: float = 0.0,
                    tau: float = 1.0, teacher_h: torch.Tensor | None = None,
                    teacher_weight: torch.Tensor | None = None, chunk: int | None = None,
                    softcap: float | None = None, dtype: torch.dtype | None = None):
    """``(loss, lm, kl)`` with ``loss = (1 - alpha) * lm + alpha * kl``, where ``lm`` is the mean
    cross-entropy of ``h @ weight.T`` against ``labels`` and ``kl`` is ``tau^2 *
    KL(softmax(teacher / tau) || softmax(student / tau))`` averaged over tokens (what
    ``F.kl_div(..., log_target=True, reduction="batchmean") * tau**2`` gives). ``lm`` and ``kl``
    are detached; only ``loss`` has a gradient.

    h: [N, D] final hidden states of the student (after the last norm); weight: [V, D] the head.
    teacher_h / teacher_weight: the teacher's, needed when ``alpha > 0``.
    chunk: tokens per chunk (default :func:`auto_chunk`); dtype: the matmuls' dtype (default h's;
    pass bfloat16 to match bf16 autocast, under which the plain path computes its logits).
    """
    if h.dim() != 2 or labels.shape != h.shape[:1]:
        raise ValueError(f"h must be [N, D] and labels [N], got {tuple(h.shape)} and {tuple(labels.shape)}")
    if alpha > 0 and (teacher_h is None or teacher_weight is None):
        raise ValueError("alpha > 0 needs teacher_h and teacher_weight")
    chunk = chunk or auto_chunk(weight.shape[0])
    dtype = dtype or h.dtype
    with torch.autocast(device_type=h.device.type, enabled=False):  # the dtypes are chosen here
        return _ChunkedLMLoss.apply(h, weight, teacher_h, teacher_weight, labels, float(alpha), float(tau),
                                    int(chunk), softcap, dtype)
