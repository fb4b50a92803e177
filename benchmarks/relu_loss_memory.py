"""Peak memory of the ReLU fine-tune with the plain loss (``loss_chunk=0``) against the chunked one.

Each path trains in a process of its own (peak RSS on the CPU, or peak CUDA memory, cannot be
reset within one process on the CPU), from the same relufied SmolLM2 with run 13's distillation
terms. Gate: the two paths' losses agree (rtol 1e-3 on the CPU in fp32, 2e-2 under bf16 autocast
on a GPU, where rounding differs between the paths). JSON last line.

    PYTHONPATH=. python benchmarks/relu_loss_memory.py --steps 3 --context 512 --batch-size 4
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def one(args) -> dict:
    import copy
    import resource

    import torch

    from actsparse.io import read_text
    from actsparse.models import load_model
    from actsparse.relu import ReluConfig, TrainConfig, relufy_, train_relu

    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher, tok = load_model(args.model, dtype=torch.float32, device=device)
    teacher.eval().requires_grad_(False)
    student = relufy_(copy.deepcopy(teacher), ReluConfig()).requires_grad_(True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    config = TrainConfig(steps=args.steps, seq_len=args.context, batch_size=args.batch_size,
                         micro_batch_size=args.batch_size, lr=6e-4, warmup_steps=1, distill_alpha=1.0,
                         hidden_distill=1.0, loss_chunk=None if args.one == "chunked" else 0, seed=0)
    h = train_relu(student, tok, read_text("wiki_calib")[:2_000_000], config, teacher=teacher, progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"path": args.one, "device": device, "loss": h.loss, "kl": h.kl, "step_s": h.step_seconds,
            "rss_train_gib": peak - before,
            "peak_cuda_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--one", choices=("plain", "chunked"), help=argparse.SUPPRESS)  # the child process
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return 0
    base = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--context",
            str(args.context), "--batch-size", str(args.batch_size)]
    runs = {}
    for path in ("plain", "chunked"):
        out = subprocess.run(base + ["--one", path], check=True, capture_output=True, text=True).stdout
        runs[path] = json.loads(out.strip().splitlines()[-1])
    a, b = runs["plain"]["loss"], runs["chunked"]["loss"]
    rtol = 2e-2 if runs["plain"]["device"] == "cuda" else 1e-3
    gate = len(a) == len(b) == args.steps and all(abs(x - y) <= rtol * abs(x) for x, y in zip(a, b))
    from benchmarks.common import env_header

    doc = {"benchmark": "relu_loss_memory", **env_header(), "command": "python " + " ".join(sys.argv),
           "args": vars(args), "runs": runs, "gate_losses_agree": gate}
    if gate:
        doc["rss_train_gib"] = {k: r["rss_train_gib"] for k, r in runs.items()}
        if runs["plain"]["peak_cuda_gib"] is not None:
            doc["peak_cuda_gib"] = {k: r["peak_cuda_gib"] for k, r in runs.items()}
    line = json.dumps(doc)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".tmp").write_text(line + "\n")
        Path(args.out + ".tmp").replace(args.out)
    print(line)
    return 0 if gate else 1


if __name__ == "__main__":
    sys.exit(main())
