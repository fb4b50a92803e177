"""Prefill + decode for the engine: static KV cache, compiled glue, one CUDA graph per decode step.

Decode at batch 1 is bound by the bytes of the weights, so everything else must cost next to
nothing: the whole decode step (embedding, 32 blocks, lm_head, sampling, and the bookkeeping that
feeds the sampled token back in) is captured once in a CUDA graph and replayed without a host
sync, and the small element-wise kernels between the linears (RMSNorm, RoPE, softmax, SiLU * up,
residual adds) are fused by ``torch.compile``. The linears themselves stay eager inside the graph
(``torch.compiler.disable``): cuBLAS for dense ones, and the ``sparse_gemv`` launcher for sparse
ones, so it keeps its persistent, self-zeroing workspace and runs as one kernel per linear.
Blocks are compiled one at a time (regional compilation: one compile serves all layers).

Thresholds for random-weight benchmarks come from the engine's own activations
(:meth:`Generator.calibrate`): |x| at every input site over a few hundred tokens, s-quantile per
site, so the achieved sparsity on other text is close to s (measured by
:meth:`Generator.measure_sparsity`).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..errors import ActsparseError
from .load import engine_from_hf_model, load_hf
from .model import Transformer


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None) -> torch.Tensor:
    """logits: [B, V] -> next tokens [B]. Greedy at temperature 0; else top-k softmax sampling.

    Sampling uses the exponential race (argmax of p / Exp(1) noise), which draws from p without a
    host sync and inside a CUDA graph.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    noise = torch.empty_like(probs).exponential_(1)
    return (probs / noise).argmax(dim=-1)


def _run_block(block, x, cos, sin, mask, input_pos):
    return block(x, cos, sin, mask, input_pos)


_COMPILED_BLOCKS: dict[str, object] = {}


def compiled_block_fn(gemv: str = "inductor"):
    """One compiled block function for every block and every Generator (regional compilation:
    the parameters are graph inputs, so one compile per input shape serves all layers).

    ``gemv``: "inductor" turns on coordinate-descent tuning, with which Inductor rewrites a
    one-row matmul (dense decode at batch 1) as a tuned Triton reduction; "cublas" leaves every
    dense product to cuBLAS. Sparse linears never go through Inductor (see ``Linear``).
    """
    if gemv not in ("inductor", "cublas"):
        raise ActsparseError(f"gemv must be 'inductor' or 'cublas', got '{gemv}'")
    if gemv not in _COMPILED_BLOCKS:
        import torch._dynamo.config as dynamo_config

        # entries per (batch size, dense/sparse, gemv) and resume function: the default 8 is tight
        for name in ("cache_size_limit", "recompile_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 64))
        # shape_padding off: its pass benchmarks candidate matmuls at compile time (slow, and it
        # crashed on torch 2.11 when it met a mixed-dtype product)
        options = {"coordinate_descent_tuning": gemv == "inductor", "shape_padding": False}
        _COMPILED_BLOCKS[gemv] = torch.compile(_run_block, dynamic=False, options=options)
    return _COMPILED_BLOCKS[gemv]


@dataclass
class GenerationStats:
    batch_size: int
    prompt_tokens: int  # per sequence
    new_tokens: int  # per sequence
    prefill_s: float
    decode_s: float
    prefill_tokens_per_s: float  # prompt tokens of the whole batch per second
    decode_tokens_per_s: float  # tokens per second of ONE sequence (batch tokens/s = this * batch)
    capture_s: float  # compile + CUDA-graph capture, outside both timings (0 once captured)
    sparse: bool
    backend: str  # "dense", or the sparse linears' backend ("torch" / "triton")
    gemv: str  # dense decode products: "inductor" (tuned Triton) or "cublas"
    device: str

    def to_dict(self) -> dict:
        return asdict(self)


class Generator:
    """A Transformer with its KV cache, static decode buffers and captured decode steps."""

    def __init__(self, model: Transformer, batch_size: int = 1, max_seq_len: int = 512,
                 compile: bool | None = None, cuda_graph: bool | None = None, gemv: str = "inductor",
                 keep_logits: bool = False):
        on_cuda = model.device.type == "cuda"
        self.model = model
        self.compile = on_cuda if compile is None else compile
        self.cuda_graph = on_cuda if cuda_graph is None else cuda_graph
        if self.cuda_graph and not on_cuda:
            raise ActsparseError("CUDA graphs need the model on a CUDA device")
        self.batch_size, self.max_seq_len = batch_size, max_seq_len
        model.setup_caches(batch_size, max_seq_len)
        dev = model.device
        # Static state read and advanced by the captured decode step.
        self.cur_token = torch.zeros(batch_size, 1, dtype=torch.long, device=dev)  # [B, 1]
        self.input_pos = torch.zeros(1, dtype=torch.long, device=dev)  # [1]
        self.step = torch.zeros(1, dtype=torch.long, device=dev)  # [1] index into out_tokens
        self.out_tokens = torch.zeros(batch_size, max_seq_len, dtype=torch.long, device=dev)  # [B, S]
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self._stream = torch.cuda.Stream(dev) if self.cuda_graph else None
        self._block_fn = compiled_block_fn(gemv) if self.compile else None
        self.gemv = gemv if self.compile else "cublas"
        # keep_logits: the decode step also copies its logits here (for checks; one small copy)
        self.keep_logits = keep_logits
        self.logits = None

    # ---------------------------------------------------------------------------------- steps

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor, temperature: float = 0.0, top_k: int | None = None) -> torch.Tensor:
        """prompt: [B, T] -> first new token [B]; fills the cache at positions 0..T-1 (eager)."""
        B, T = prompt.shape
        if B != self.batch_size:
            raise ActsparseError(f"prompt batch {B} != generator batch {self.batch_size}")
        input_pos = torch.arange(T, device=prompt.device)
        logits = self.model(prompt, input_pos, last_only=True)[:, -1]  # [B, V]
        return sample(logits, temperature, top_k)

    def _decode_step(self, temperature: float, top_k: int | None) -> None:
        """One token: reads cur_token/input_pos, writes out_tokens[:, step], advances the state."""
        logits = self.model(self.cur_token, self.input_pos, block_fn=self._block_fn)[:, -1]  # [B, V]
        if self.keep_logits:
            if self.logits is None:
                self.logits = torch.empty_like(logits)
            self.logits.copy_(logits)
        nxt = sample(logits, temperature, top_k)  # [B]
        self.out_tokens.index_copy_(1, self.step, nxt[:, None])
        self.cur_token.copy_(nxt[:, None])
        self.input_pos.add_(1)
        self.step.add_(1)

    def _graph(self, temperature: float, top_k: int | None) -> torch.cuda.CUDAGraph:
        mode = self.model.sparse_key()
        key = (temperature, top_k, mode, self.keep_logits)
        if key not in self._graphs:
            # another mode (dense -> sparse) means other weight tensors: drop graphs that read the old ones
            self._graphs = {k: g for k, g in self._graphs.items() if k[2] == mode}
            saved = [t.clone() for t in (self.cur_token, self.input_pos, self.step)]
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):  # warm up (compile, autotune) on the capture stream
                for _ in range(3):
                    self._decode_step(temperature, top_k)
                    # warm-up writes cache rows ahead of the real position: rewinding is enough,
                    # since a row is always rewritten before the step that attends to it
                    for t, s in zip((self.cur_token, self.input_pos, self.step), saved):
                        t.copy_(s)
            torch.cuda.current_stream().wait_stream(self._stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self._stream):
                self._decode_step(temperature, top_k)
            self._graphs[key] = graph
        return self._graphs[key]

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, stop_token: int | None = None,
                 check_every: int = 32) -> tuple[torch.Tensor, GenerationStats]:
        """prompt: [B, T] -> (tokens [B, T + n], stats); n <= max_new_tokens (stops when every
        sequence has produced ``stop_token``, checked every ``check_every`` steps)."""
        B, T = prompt.shape
        if max_new_tokens < 1:
            raise ActsparseError("max_new_tokens must be >= 1")
        if T + max_new_tokens > self.max_seq_len:
            raise ActsparseError(f"prompt ({T}) + new tokens ({max_new_tokens}) exceed max_seq_len {self.max_seq_len}")
        prompt = prompt.to(self.model.device)
        sync = torch.cuda.synchronize if self.model.device.type == "cuda" else (lambda: None)

        t0 = time.perf_counter()
        self.cur_token.copy_(prompt[:, -1:])
        self.input_pos.fill_(T)
        self.step.zero_()
        capture_s = 0.0
        if self.cuda_graph:  # capture before prefill: warm-up writes only rows >= T, rewritten later
            graph_count = len(self._graphs)
            graph = self._graph(temperature, top_k)
            sync()
            capture_s = time.perf_counter() - t0 if len(self._graphs) > graph_count else 0.0

        sync()
        t0 = time.perf_counter()
        first = self.prefill(prompt, temperature, top_k)  # [B]
        self.out_tokens[:, 0] = first
        self.cur_token.copy_(first[:, None])
        self.input_pos.fill_(T)
        self.step.fill_(1)
        sync()
        t1 = time.perf_counter()
        n = 1
        while n < max_new_tokens:
            for _ in range(min(check_every, max_new_tokens - n)):
                graph.replay() if self.cuda_graph else self._decode_step(temperature, top_k)
                n += 1
            if stop_token is not None and bool((self.out_tokens[:, :n] == stop_token).any(dim=1).all()):
                break
        sync()
        t2 = time.perf_counter()

        tokens = torch.cat([prompt, self.out_tokens[:, :n]], dim=1)
        decode_s = t2 - t1
        stats = GenerationStats(
            batch_size=B, prompt_tokens=T, new_tokens=n, prefill_s=t1 - t0, decode_s=decode_s,
            prefill_tokens_per_s=B * T / (t1 - t0),
            decode_tokens_per_s=(n - 1) / decode_s if n > 1 else float("nan"),
            capture_s=capture_s, sparse=self.model.is_sparse(), backend=self.model.backend(),
            gemv=self.gemv, device=str(self.model.device),
        )
        return tokens, stats

    # ------------------------------------------------------------------------ sparsity helpers

    @torch.no_grad()
    def _record_inputs(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inputs of every block linear for ``tokens`` [B, T] (one eager prefill): name -> [B, T, K]."""
        if tokens.shape[1] > self.max_seq_len:
            raise ActsparseError(f"{tokens.shape[1]} tokens exceed max_seq_len {self.max_seq_len}")
        if tokens.shape[0] > self.batch_size:
            raise ActsparseError(f"batch {tokens.shape[0]} exceeds the generator's batch {self.batch_size}")
        linears = {name: (lin, hf) for name, lin, hf in self.model.block_linears()}
        for lin, _ in linears.values():
            lin.record = []
        try:
            # the KV cache is written at 0..T-1; the next prefill rewrites what it uses
            self.model(tokens.to(self.model.device), torch.arange(tokens.shape[1], device=self.model.device))
            return {name: lin.record[0] for name, (lin, _) in linears.items()}
        finally:
            for lin, _ in linears.values():
                lin.record = None

    @torch.no_grad()
    def calibrate(self, tokens: torch.Tensor, sparsities: Sequence[float]) -> dict[float, dict[str, torch.Tensor]]:
        """Per-site thresholds: the s-quantile of |x| over ``tokens`` [B, T], for each s.

        Returns {s: {HF linear name: fp32 [K]}} (one value repeated, TEAL style; identical for
        linears that share an input). Run it on the dense model: thresholds describe dense inputs.
        """
        inputs = self._record_inputs(tokens)
        q = torch.tensor([float(s) for s in sparsities], dtype=torch.float32)
        out: dict[float, dict[str, torch.Tensor]] = {float(s): {} for s in sparsities}
        for name, lin, hf_names in self.model.block_linears():
            mags = inputs[name].abs().float().flatten()
            if mags.numel() > (1 << 24):  # torch.quantile's size limit: a strided subsample
                mags = mags[:: -(-mags.numel() // (1 << 24))]
            values = torch.quantile(mags, q.to(mags.device)).cpu()
            for s, v in zip(out, values):
                t = torch.full((lin.in_features,), float(v) if s > 0 else 0.0, dtype=torch.float32)
                for hf in hf_names:
                    out[s][hf] = t
        return out

    @torch.no_grad()
    def measure_sparsity(self, tokens: torch.Tensor, start: int) -> dict:
        """Achieved sparsity of a sparse model on ``tokens`` [B, T] at positions >= ``start``.

        ``input_sparsity``: fraction of inputs zeroed; ``rows_skipped``: fraction of weight rows a
        batched GEMV skips (an input zeroed in every batch row), weighted by each linear's weight
        bytes; ``bytes_skipped``: the same as a fraction of all weight bytes read per token,
        lm_head included (the embedding is a lookup, not read whole).
        """
        inputs = self._record_inputs(tokens)
        per_site: dict[str, list[float]] = {}
        zeroed = rows = skipped_bytes = block_bytes = 0.0
        for name, lin, _ in self.model.block_linears():
            if not lin.sparse:
                raise ActsparseError("measure_sparsity needs a sparse model")
            x = inputs[name][:, start:]  # [B, T', K]
            keep = x.abs().float() > lin.thresholds  # [B, T', K]
            frac_zero = 1.0 - keep.float().mean().item()
            frac_rows = 1.0 - keep.any(dim=0).float().mean().item()
            nbytes = lin.weight_bytes
            per_site.setdefault(name.rsplit(".", 1)[-1], []).append(frac_zero)
            zeroed += frac_zero * nbytes
            rows += frac_rows * nbytes
            block_bytes += nbytes
            skipped_bytes += frac_rows * nbytes
        head = self.model.output.weight
        total_bytes = block_bytes + head.numel() * head.element_size()
        return {
            "input_sparsity": zeroed / block_bytes,
            "rows_skipped": rows / block_bytes,
            "bytes_skipped": skipped_bytes / total_bytes,
            "per_site": {k: sum(v) / len(v) for k, v in per_site.items()},
        }


# ------------------------------------------------------------------------------------------------
# One-call text generation (what `actsparse generate` runs on a GPU)
# ------------------------------------------------------------------------------------------------


def _as_thresholds(thresholds) -> dict[str, torch.Tensor] | None:
    if thresholds is None or isinstance(thresholds, dict):
        return thresholds
    try:
        from ..thresholds import load_thresholds
    except ImportError:
        from safetensors.torch import load_file

        return load_file(str(thresholds))
    return load_thresholds(thresholds)[0]


@torch.no_grad()
def generate(model_path_or_engine, tokenizer, prompt: str, max_new_tokens: int = 64, thresholds=None,
             temperature: float = 0.0, top_k: int | None = None, device: str = "cuda",
             dtype: torch.dtype = torch.bfloat16, prefill_dense: bool = False,
             compile: bool | None = None, relu_kernels: bool = True) -> tuple[str, dict]:
    """Generate text with the engine; returns (new text, stats with prefill and decode tokens/s).

    ``model_path_or_engine``: a Hugging Face folder (or ``smollm2-135m``), a loaded HF model, an
    engine :class:`Transformer` or a :class:`Generator`. ``thresholds``: a dict
    {HF linear name: [K]} or a thresholds file; given, decode runs the sparse kernels.
    ``tokenizer`` may be None for a folder (its own tokenizer is loaded). ``relu_kernels``: a
    model with a ReLU MLP (e.g. from ``actsparse relufy``) decodes with ProSparse's steps 2 and 3
    (:meth:`Transformer.sparsify_relu_`: the same function, fewer weight bytes).
    """
    from ..models import resolve_model_path

    if isinstance(model_path_or_engine, Generator):
        gen = model_path_or_engine
        model = gen.model
    else:
        if isinstance(model_path_or_engine, Transformer):
            model = model_path_or_engine
        elif isinstance(model_path_or_engine, (str, os.PathLike)):
            path = resolve_model_path(model_path_or_engine)
            model = load_hf(path, device=device, dtype=dtype)
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        else:  # a Hugging Face model, possibly sparsified with actsparse.sparsify_
            model, found, pd = engine_from_hf_model(model_path_or_engine, device=device, dtype=dtype)
            thresholds = thresholds if thresholds is not None else found
            prefill_dense = prefill_dense or pd
        gen = None
    if tokenizer is None:
        raise ActsparseError("generate needs a tokenizer")
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]  # [1, T]
    thresholds = _as_thresholds(thresholds)
    if thresholds is not None:
        if model.is_sparse():
            model.set_thresholds_(thresholds)
        else:
            model.sparsify_(thresholds)
    if relu_kernels and model.args.hidden_act == "relu" and not model.args.mlp_bias:
        ff = model.layers[0].feed_forward
        if ff.gate_up_backend is None and not ff.w2.skip_zeros:
            model.sparsify_relu_(gate_up=ff.w13.weight is not None)
    model.prefill_dense = prefill_dense
    if gen is None:
        max_seq = -(-(ids.shape[1] + max_new_tokens) // 64) * 64
        gen = Generator(model, batch_size=1, max_seq_len=max_seq, compile=compile)
    tokens, stats = gen.generate(ids, max_new_tokens, temperature, top_k,
                                 stop_token=getattr(tokenizer, "eos_token_id", None))
    new = tokens[0, ids.shape[1]:].tolist()
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos in new:
        new = new[: new.index(eos)]
    text = tokenizer.decode(new, skip_special_tokens=True)
    out = stats.to_dict()
    out.update(engine="actsparse", text=text, tokens_per_s=stats.decode_tokens_per_s)
    return text, out


def generate_from_hf(hf_model, tokenizer, prompt: str, config=None, max_new_tokens: int = 64,
                     temperature: float = 0.0, top_k: int | None = None) -> dict:
    """For ``actsparse generate --engine fast``: sparsify ``hf_model`` with ``config`` (a
    :class:`~actsparse.sparsify.TealConfig`, may be None), then run the engine on its weights and
    thresholds. Returns the stats dict with the text under ``"text"``."""
    if config is not None:
        from ..sparsify import sparsify_

        sparsify_(hf_model, config)
    device = str(next(hf_model.parameters()).device)
    _, stats = generate(hf_model, tokenizer, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                        device=device, dtype=next(hf_model.parameters()).dtype)
    return stats
