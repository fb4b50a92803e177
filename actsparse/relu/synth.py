"""Text sampled from the original model, to distil on more tokens than the calibration text holds.

Distillation (KL to the teacher's logits, hidden-state and layer-wise MLP targets) needs inputs, not
labels, so any text the teacher finds plausible serves. The teacher continues short prefixes of the
training text (sampling at temperature 1 from its full distribution), which keeps the samples close
to the training domain; the evaluation text is never touched. On SmolLM2-135M the calibration file
holds 320k tokens, while sampling gives millions in a couple of minutes on one GPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ActsparseError
from .train import check_positive_ints


@dataclass
class SampleConfig:
    """``tokens``: how many tokens to produce, as ``seq_len``-token windows (prefix included)."""

    tokens: int
    seq_len: int = 1024
    prompt_len: int = 32  # tokens of training text that start each sample
    batch_size: int = 512
    temperature: float = 1.0
    seed: int = 0
    # "engine": actsparse's decode engine (static KV cache, CUDA graph on a GPU); "hf": transformers
    # `generate`; "auto": the engine on CUDA when it supports the architecture, else "hf"
    backend: str = "auto"

    def __post_init__(self):
        check_positive_ints(self, "tokens", "seq_len", "prompt_len", "batch_size")
        if self.backend not in ("auto", "engine", "hf"):
            raise ActsparseError(f"backend must be 'auto', 'engine' or 'hf', got '{self.backend}'")
        if self.prompt_len >= self.seq_len:
            raise ActsparseError(f"prompt_len {self.prompt_len} must be shorter than seq_len {self.seq_len}")
        if not self.temperature > 0:
            raise ActsparseError(f"temperature must be > 0, got {self.temperature}")


def _hf_sampler(teacher: nn.Module, config: SampleConfig, device: torch.device):
    """prompts [b, P] -> [b, seq_len] with HF ``generate`` (end-of-sequence suppressed). On CUDA it
    runs a bf16 copy of the teacher: HF ``generate`` is bound by per-step overheads, and bf16 and
    large batches are what make it faster."""
    new = config.seq_len - config.prompt_len
    gen_config = dict(do_sample=True, temperature=config.temperature, top_k=0, top_p=1.0,
                      max_new_tokens=new, min_new_tokens=new)
    eos = getattr(teacher.generation_config, "eos_token_id", None) or getattr(teacher.config, "eos_token_id", None)
    pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    sampler = copy.deepcopy(teacher).to(torch.bfloat16) if device.type == "cuda" else teacher

    def run(prompts: torch.Tensor) -> torch.Tensor:
        return sampler.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), pad_token_id=pad,
                                **gen_config)
    return run


def _engine_sampler(teacher: nn.Module, config: SampleConfig, device: torch.device, batch: int):
    """prompts [b <= batch, P] -> [b, seq_len] with the decode engine: the teacher's weights in a
    compact model with a static KV cache for ``batch`` sequences, each decode step one CUDA graph
    replay on a GPU. Samples from the full distribution (end-of-sequence not suppressed)."""
    from ..engine.generate import Generator  # noqa: PLC0415
    from ..engine.load import engine_from_hf_model  # noqa: PLC0415

    dtype = torch.bfloat16 if device.type == "cuda" else None
    model, _, _ = engine_from_hf_model(teacher, device=device, dtype=dtype)
    generator = Generator(model, batch_size=batch, max_seq_len=config.seq_len, compile=False)
    new = config.seq_len - config.prompt_len

    def run(prompts: torch.Tensor) -> torch.Tensor:
        b = prompts.shape[0]
        if b < batch:  # the last, short batch: pad with copies of its first prompt, drop them after
            prompts = torch.cat([prompts, prompts[:1].expand(batch - b, -1)])
        tokens, _ = generator.generate(prompts, new, temperature=config.temperature)
        return tokens[:b]
    return run


def _pick_sampler(teacher: nn.Module, config: SampleConfig, device: torch.device, batch: int):
    if config.backend == "hf" or (config.backend == "auto" and device.type != "cuda"):
        return _hf_sampler(teacher, config, device)
    try:
        return _engine_sampler(teacher, config, device, batch)
    except ActsparseError:
        if config.backend == "engine":
            raise
        return _hf_sampler(teacher, config, device)  # "auto": an architecture the engine does not run


@torch.no_grad()
def sample_teacher_windows(teacher: nn.Module, ids: torch.Tensor, config: SampleConfig,
                           progress: bool = True) -> torch.Tensor:
    """Windows of text sampled from ``teacher``: each starts with ``prompt_len`` tokens of ``ids``
    (the training text as one id stream; prefixes taken at seeded random offsets) and continues with
    ``seq_len - prompt_len`` sampled tokens. -> [M, seq_len] int64 on the CPU,
    ``M = ceil(tokens / seq_len)``. ``config.backend`` picks the sampler: on CUDA by default the
    decode engine (a bf16 copy of the teacher with a static KV cache and CUDA-graph steps; 8.4x
    the tokens/s of HF ``generate`` on an H100, docs/RESULTS.md), else HF ``generate``
    (end-of-sequence suppressed)."""
    ids = ids.reshape(-1)
    if ids.numel() < config.prompt_len + 1:
        raise ActsparseError(f"the text has {ids.numel()} tokens, too few for {config.prompt_len}-token prompts")
    device = next(teacher.parameters()).device
    n = -(-config.tokens // config.seq_len)
    gen = torch.Generator().manual_seed(config.seed)
    starts = torch.randint(0, ids.numel() - config.prompt_len, (n,), generator=gen)
    out = []
    was_training = teacher.training
    teacher.eval()
    run = _pick_sampler(teacher, config, device, min(config.batch_size, n))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n * config.seq_len, desc="sampling teacher text", unit="tok", unit_scale=True,
                   dynamic_ncols=True)
    torch.manual_seed(config.seed)
    for b in range(0, n, config.batch_size):
        s = starts[b:b + config.batch_size]
        prompts = torch.stack([ids[i:i + config.prompt_len] for i in s.tolist()]).to(device)
        seqs = run(prompts)
        if seqs.shape != (len(s), config.seq_len):
            raise ActsparseError(f"the teacher produced {tuple(seqs.shape)} tokens, not {(len(s), config.seq_len)}")
        out.append(seqs.cpu())
        if bar is not None:
            bar.update(seqs.numel())
    if bar is not None:
        bar.close()
    del run
    teacher.train(was_training)
    return torch.cat(out)
