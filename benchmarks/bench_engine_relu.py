"""Benchmark: batch-1 decode of a ReLU (ProSparse-style) model in the engine: dense, vs ProSparse's
step 3 alone (the down projection skips the zero rows of h), vs steps 2 and 3
(``Transformer.sparsify_relu_``: sparse_gate_up reads the up rows of kept neurons only), vs the
same with an fp32 residual stream the down products are added into (``set_fused_residual_``).

A random-weight model of a named shape with a ReLU MLP gets per-layer FATReLU thresholds at the
s-quantile of its own gate values (384 calibration tokens), so that a fraction s of h is exactly 0.
All modes compute the same function (same FATReLU thresholds). Attention linears and lm_head stay
dense, and without an activation predictor the gate rows are read whole, so this is the speed a
relufied model gets in the engine today. Bound: weight bytes read per token / measured copy
bandwidth.

    PYTHONPATH=. python benchmarks/bench_engine_relu.py --shape llama2-7b --out benchmarks/results/engine_relu_h100.json

Gate: every sparse down projection (and, with step 2, every sparse_gate_up call) inside the
compiled decode step against the pure-PyTorch reference on the input it received. The last line
is one JSON document.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import time

import torch
import torch.nn.functional as F

from actsparse.engine import NAMED_CONFIGS, Generator, ModelArgs, random_model
from benchmarks.bench_engine import (
    copy_bandwidth, emit_json, git_commit, log, rel_err, sync, timed_generate, weight_bytes,
)


@torch.no_grad()
def fat_thresholds(gen: Generator, calib: torch.Tensor, sparsities) -> dict[float, list[float]]:
    """Per layer, the s-quantile of gate = x @ W_gate^T over the calibration tokens."""
    model = gen.model
    F_ = model.args.intermediate_size
    inputs = gen._record_inputs(calib)
    out = {s: [] for s in sparsities}
    for i, layer in enumerate(model.layers):
        w13 = layer.feed_forward.w13
        w_gate = (w13.weight if w13.weight is not None else w13.weight_t.t())[:F_]
        gate = F.linear(inputs[f"layers.{i}.feed_forward.w13"][0], w_gate).float().flatten()
        gate = gate[torch.randperm(gate.numel(), device=gate.device)[: 1 << 22]]  # torch.quantile's limit
        for s in sparsities:
            out[s].append(torch.quantile(gate, s).item())
    return out


def set_fat(model, thresholds: list[float]) -> None:
    for layer, t in zip(model.layers, thresholds):
        layer.feed_forward.set_act_threshold_(max(t, 0.0))


@torch.no_grad()
def down_input_sparsity(gen: Generator, tokens: torch.Tensor, start: int) -> float:
    inputs = gen._record_inputs(tokens)
    zeros = [(inputs[f"layers.{i}.feed_forward.w2"][:, start:] == 0).float().mean().item()
             for i in range(len(gen.model.layers))]
    return sum(zeros) / len(zeros)


def gate_up_err(ff, x, h, F_) -> float:
    """h from sparse_gate_up vs the reference, leaving out neurons whose gate lies within 1e-3
    (relative to the gate's scale) of the FATReLU threshold: there the kernel's fp32 summation order
    may keep a neuron the reference drops, or the reverse, and either answer is right."""
    from actsparse.kernels.sparse_mlp import sparse_gate_up_reference

    w_gate, w_up = ff.w13.weight[:F_], ff.w13.weight[F_:]
    gate = x.double() @ w_gate.double().t()  # [M, F]
    near = (gate - ff.gate_thresholds.double()).abs() <= 1e-3 * gate.abs().amax(dim=-1, keepdim=True)
    ref = sparse_gate_up_reference(x, w_gate, w_up, ff.gate_thresholds, "relu")
    return rel_err(torch.where(near, 0, h.double()), torch.where(near, 0, ref.double()))


@torch.no_grad()
def gate_in_compiled_step(model, prompt, max_seq) -> dict:
    from actsparse.kernels.sparse_gemv import sparse_gemv_reference

    ffs = [layer.feed_forward for layer in model.layers]
    F_ = model.args.intermediate_size
    for ff in ffs:
        ff.w2.record_io, ff.w13.record_io = [], []
    try:
        gen = Generator(model, batch_size=1, max_seq_len=max_seq, cuda_graph=False)
        gen.generate(prompt, 2)
        errs = [rel_err(y, sparse_gemv_reference(x, ff.w2.weight_t, ff.w2.thresholds))
                for ff in ffs for x, y in ff.w2.record_io]
        errs += [gate_up_err(ff, x, h, F_) for ff in ffs for x, h in ff.w13.record_io]
        calls = sum(len(ff.w2.record_io) + len(ff.w13.record_io) for ff in ffs)
    finally:
        for ff in ffs:
            ff.w2.record_io = ff.w13.record_io = None
    worst = max(errs)
    return {"rel_err": worst, "limit": 1e-2, "calls": calls, "passed": bool(worst <= 1e-2)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--sparsities", default="0.67,0.89")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--calib-tokens", type=int, default=384)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = args.device
    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32  # CPU: a smoke run
    sparsities = [float(s) for s in args.sparsities.split(",")]
    T, N = args.prompt_len, args.new_tokens
    max_seq = -(-max(T + N, args.calib_tokens) // 64) * 64
    t_start = time.perf_counter()
    result = {"benchmark": "bench_engine_relu", "shape": args.shape, "hidden_act": "relu",
              "gpu": torch.cuda.get_device_name() if device != "cpu" else "cpu", "torch": torch.__version__,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "commit": os.environ.get("ACTSPARSE_COMMIT") or git_commit(), "prompt_len": T, "new_tokens": N}
    copy_bw = copy_bandwidth(device)
    result["copy_TBps"] = copy_bw / 1e12
    model = random_model(ModelArgs.from_hf_config({**NAMED_CONFIGS[args.shape], "hidden_act": "relu"}),
                         device=device, dtype=dtype, seed=0)
    sync(device)
    block_bytes, head_bytes = weight_bytes(model)
    down_bytes = sum(layer.feed_forward.w2.weight_bytes for layer in model.layers)
    up_bytes = sum(layer.feed_forward.w13.weight_bytes for layer in model.layers) // 2
    result.update(block_weight_GB=block_bytes / 1e9, down_weight_GB=down_bytes / 1e9, lm_head_GB=head_bytes / 1e9,
                  dense_bound_tok_s=copy_bw / (block_bytes + head_bytes))
    g = torch.Generator(device="cpu").manual_seed(1234)
    V = model.args.vocab_size
    prompt = torch.randint(0, V, (1, T), generator=g).to(device)
    calib = torch.randint(0, V, (1, args.calib_tokens), generator=g).to(device)
    thresholds = fat_thresholds(Generator(model, 1, max_seq, compile=False, cuda_graph=False), calib, sparsities)
    result["fat_thresholds_layer0"] = {str(s): t[0] for s, t in thresholds.items()}

    rows = {str(s): {} for s in sparsities}
    for mode in ("dense", "sparse_down", "sparse_mlp", "sparse_mlp_fused"):
        if mode != "dense":
            model.sparsify_relu_(gate_up=mode != "sparse_down")
            model.set_fused_residual_(True if mode == "sparse_mlp_fused" else "auto")  # auto: off here
        for s in sparsities:
            set_fat(model, thresholds[s])
            gc.collect()
            gen = Generator(model, batch_size=1, max_seq_len=max_seq)
            rate, tokens, detail = timed_generate(gen, prompt, N, args.repeats)
            row = rows[str(s)]
            row[mode] = {"tok_s": rate, **detail}
            if mode == "dense":
                row["h_sparsity"] = down_input_sparsity(gen, tokens, T)
                row["dense_pct_of_bound"] = 100 * rate / result["dense_bound_tok_s"]
            else:
                skipped = (down_bytes + (up_bytes if mode != "sparse_down" else 0)) * row["h_sparsity"]
                bound = copy_bw / (block_bytes - skipped + head_bytes)
                row[mode].update(gate=gate_in_compiled_step(model, prompt, max_seq),
                                 speedup=rate / row["dense"]["tok_s"], bound_tok_s=bound,
                                 bound_speedup=bound / result["dense_bound_tok_s"])
            m = row[mode]
            log(f"{mode:12s} s={s}: {rate:7.1f} tok/s" + (f" ({m['speedup']:.3f}x dense, bound "
                f"{m['bound_speedup']:.3f}x; gate {m['gate']['rel_err']:.1e} over {m['gate']['calls']} calls)"
                if mode != "dense" else
                f" (h sparsity {row['h_sparsity']:.3f}, {row['dense_pct_of_bound']:.1f}% of bound)"))
            del gen
    result["by_s"] = rows
    result["gates_passed"] = all(r[m]["gate"]["passed"] for r in rows.values() for m in r if m.startswith("sparse"))
    result["total_s"] = time.perf_counter() - t_start
    emit_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
