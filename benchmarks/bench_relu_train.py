"""ReLU fine-tuning throughput, side by side: the plain loss (``loss_chunk=0``: the whole logits
tensor), the chunked loss (the default, relu/loss.py) and compiled decoder layers (``compile=True``).

One process, the same model, text and recipe for every mode (default: run 13's, i.e. a relufied
SmolLM2 distilled from the original with logit KL (alpha 1) and hidden-state MSE, 8 x 1024 tokens
per step, a FatRamp that samples pre-activations every other step). Gate, before any rate counts:
each mode's first-step loss and MLP sparsity agree with the plain mode's (tolerances below), and
compiled layers are handed back uncompiled. Then: tokens/s of each mode (median step time after
the warm-up steps, which include compilation), the ratio to the plain mode, the compile time (first
step minus the median), peak CUDA memory, and a profile of one step's CUDA kernels by kind for the
eager modes. JSON last line; ``--out`` writes it too.

    PYTHONPATH=. python benchmarks/bench_relu_train.py --model /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
    PYTHONPATH=. python benchmarks/bench_relu_train.py --tiny      # CPU smoke test of the harness
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from actsparse.relu import FatRamp, ReluConfig, TrainConfig, relufy_, train_relu
from benchmarks.common import env_header

LOSS_RTOL = 2e-2  # first-step loss, eager vs compiled (bf16 autocast on CUDA: fusion changes rounding)
SPARSITY_ATOL = 2e-3
MODES = {"plain": dict(loss_chunk=0), "chunked": dict(loss_chunk=None), "compiled": dict(loss_chunk=None, compile=True)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="GGUF file, HF folder or 'smollm2-135m'")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama + byte tokenizer (CPU)")
    p.add_argument("--steps", type=int, default=14, help="optimizer steps per mode")
    p.add_argument("--warmup", type=int, default=4, help="steps left out of the median (compilation, caches)")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--hidden-distill", type=float, default=1.0)
    p.add_argument("--distill-alpha", type=float, default=1.0)
    p.add_argument("--modes", default="plain,chunked,compiled",
                   help="comma list of plain (loss_chunk=0), chunked (default loss), compiled (+ compile=True)")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.warmup >= args.steps:
        p.error("--warmup must be below --steps")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not args.modes or args.modes[0] != "plain" or not set(args.modes) <= set(MODES):
        p.error(f"--modes must start with plain (the baseline) and name only {', '.join(MODES)}")
    return args


def setup(args):
    if args.tiny:
        from benchmarks.relu_smollm2 import tiny_setup
        model, tok, calib, _ = tiny_setup()
        args.context = min(args.context, 64)
        return model, tok, calib
    from actsparse.io import read_text
    from actsparse.models import load_model
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, tok = load_model(args.model, dtype=torch.float32, device=device)
    return model, tok, read_text("wiki_calib")


def config(args, mode: str, steps: int) -> TrainConfig:
    # the ramp updates every other step from step 1 on, so its sampling hooks run in the timed steps
    return TrainConfig(steps=steps, seq_len=args.context, batch_size=args.batch_size,
                       micro_batch_size=args.micro_batch_size, lr=6e-4, warmup_steps=1, weight_decay=0.01,
                       distill_alpha=args.distill_alpha, hidden_distill=args.hidden_distill,
                       fat_ramp=FatRamp(target=0.87, start=0.05, end=0.9, every=2), seed=0, log_every=10,
                       **MODES[mode])


def kernel_profile(student, teacher, tok, text, args, mode: str) -> list[dict]:
    """CUDA kernel time of one step (after one warm step), grouped by a coarse kind."""
    from torch.profiler import ProfilerActivity, profile
    train_relu(student, tok, text, config(args, mode, 2), teacher=teacher, progress=False, stop_after=1)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        train_relu(student, tok, text, config(args, mode, 2), teacher=teacher, progress=False, stop_after=1)
        torch.cuda.synchronize()
    kinds: dict[str, float] = {}
    for ev in prof.key_averages():
        us = getattr(ev, "self_device_time_total", 0.0)
        if us <= 0:
            continue
        name = ev.key.lower()
        kind = ("matmul (gemm)" if any(k in name for k in ("gemm", "cutlass", "sm90", "nvjet", "matmul"))
                else "attention" if any(k in name for k in ("flash", "fmha", "attention", "sdpa"))
                else "softmax / cross-entropy" if any(k in name for k in ("softmax", "nll", "cross_entropy"))
                else "optimizer" if any(k in name for k in ("adam", "multi_tensor", "foreach"))
                else "reduction" if "reduce" in name
                else "elementwise / other")
        kinds[kind] = kinds.get(kind, 0.0) + us
    total = sum(kinds.values())
    return [{"kind": k, "ms": round(v / 1e3, 2), "share": round(v / total, 3)}
            for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]


def main(argv=None) -> int:
    args = parse_args(argv)
    original, tok, text = setup(args)
    original.eval().requires_grad_(False)
    doc = {"benchmark": "relu_train", **env_header(), "command": "python " + " ".join(sys.argv),
           "args": vars(args), "gates": {}, "errors": []}
    fresh = relufy_(copy.deepcopy(original), ReluConfig())
    tokens_per_step = args.batch_size * args.context
    histories = {}
    cuda = torch.cuda.is_available()
    for mode in args.modes:
        student = copy.deepcopy(fresh).requires_grad_(True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        h = train_relu(student, tok, text, config(args, mode, args.steps), teacher=original, progress=False)
        wall = time.perf_counter() - t0
        med = statistics.median(h.step_seconds[args.warmup:])
        histories[mode] = h
        doc[mode] = {"tokens_per_s": tokens_per_step / med, "median_step_s": med, "wall_s": wall,
                     "first_step_s": h.step_seconds[0], "loss": h.loss[:3], "kl": h.kl[:3],
                     "sparsity": h.sparsity[:3],
                     "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        uncompiled = all(layer._compiled_call_impl is None for layer in
                         list(student.model.layers) + list(original.model.layers))
        doc["gates"][f"{mode}_layers_handed_back_uncompiled"] = uncompiled
        del student
    base = histories["plain"]
    doc["first_step"] = {}
    for mode in args.modes[1:]:
        h = histories[mode]
        loss_rel = abs(h.loss[0] - base.loss[0]) / abs(base.loss[0])
        sp_diff = abs(h.sparsity[0] - base.sparsity[0])
        doc["first_step"][mode] = {"loss_rel_diff": loss_rel, "sparsity_abs_diff": sp_diff}
        doc["gates"][f"{mode}_first_step_loss"] = loss_rel <= LOSS_RTOL
        doc["gates"][f"{mode}_first_step_sparsity"] = sp_diff <= SPARSITY_ATOL
    doc["gates_passed"] = all(doc["gates"].values())
    if doc["gates_passed"]:
        doc["speedup_vs_plain"] = {m: doc[m]["tokens_per_s"] / doc["plain"]["tokens_per_s"] for m in args.modes[1:]}
        if "compiled" in args.modes:
            doc["compile_overhead_s"] = doc["compiled"]["first_step_s"] - doc["compiled"]["median_step_s"]
    else:
        doc["errors"].append(f"gate failed: {doc['gates']}, first step {doc['first_step']}")
    if cuda and not args.no_profile:
        doc["step_profile"] = {m: kernel_profile(copy.deepcopy(fresh).requires_grad_(True), original, tok, text,
                                                 args, m) for m in args.modes if m != "compiled"}
    line = json.dumps(doc, default=str)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.out + ".tmp")
        tmp.write_text(line + "\n")
        tmp.replace(args.out)
    print(line, flush=True)
    return 0 if doc["gates_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
