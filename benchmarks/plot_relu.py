"""ReLU path on SmolLM2-135M: eval perplexity against MLP-intermediate sparsity, one series per run.

    PYTHONPATH=. python benchmarks/plot_relu.py --out docs/relu_smollm2.png

Reads the raw records of `benchmarks/relu_smollm2.py` (docs/RESULTS.md "ReLU path"): run 2 of the
previous session (logit distillation only) and runs 3-13 (layer-wise MLP distillation, hidden-state
distillation, sampled text, lower L1 peaks, per-layer FATReLU allocation, the FATReLU ramp, the
learning rate, longer training). Every ReLU stage of a run (e2e fine-tunes and their FATReLU
variants) is one point, the line joins the points that no sparser point of the run beats; the goal region
(<= 1.1 x the control's perplexity, the controls recorded with the runs; the degraded controls of
run 12 at lr 6e-4 and of run 13 at 2400 steps, worse than the untouched model, are left out) and
the goal sparsity are marked.
"""

from __future__ import annotations

import argparse
import json

RUNS = [  # (file, label)
    ("benchmarks/results/relu_smollm2_h100.json", "run 2: logit KL only"),
    ("benchmarks/results/relu_smollm2_h100_lw1.json", "run 3: + layer-wise 400, hidden KD"),
    ("benchmarks/results/relu_smollm2_h100_lw2.json", "run 4: layer-wise 800, L1 0.5"),
    ("benchmarks/results/relu_smollm2_h100_lw3.json", "run 5: layer-wise 1200, L1 2"),
    ("benchmarks/results/relu_smollm2_h100_lw4.json", "run 6: layer-wise 2000, L1 4"),
    ("benchmarks/results/relu_smollm2_h100_lw5.json", "run 7: run 5 + 512k sampled tokens"),
    ("benchmarks/results/relu_smollm2_h100_lw6.json", "run 8: run 7 with 4M sampled tokens, 1400 steps"),
    ("benchmarks/results/relu_smollm2_h100_run9a.json", "run 9: run 7, L1 peaks 8 and 4, FATReLU allocations"),
    ("benchmarks/results/relu_smollm2_h100_run9b.json", "run 9: run 7, L1 peaks 2 and 1"),
    ("benchmarks/results/relu_smollm2_h100_run10.json", "run 10: run 8 with L1 peak 2"),
    ("benchmarks/results/relu_smollm2_h100_run11a.json", "run 11: run 10 + FATReLU ramp to 85%"),
    ("benchmarks/results/relu_smollm2_h100_run11b.json", "run 11: run 10 + FATReLU ramp to 87%"),
    ("benchmarks/results/relu_smollm2_h100_run11c.json", "run 11: ramp to 87%, L1 off"),
    ("benchmarks/results/relu_smollm2_h100_run12a.json", "run 12: run 11c at lr 3e-4"),
    ("benchmarks/results/relu_smollm2_h100_run12b.json", "run 12: run 11c at lr 6e-4"),
    ("benchmarks/results/relu_smollm2_h100_run13.json", "run 13: run 12 lr 6e-4, 2400 steps"),
]


def main(argv=None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/relu_smollm2.png")
    args = ap.parse_args(argv)
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [1.35, 1]})
    colors = plt.get_cmap("tab20").colors
    controls, summary = [], {}
    for i, (path, label) in enumerate(RUNS):
        doc = json.load(open(path))
        pts = sorted((r["eval_sparsity"], r["eval_ppl"]) for n, r in doc["stages"].items() if n.startswith("relu_"))
        if "silu_finetune_control" in doc["stages"]:  # run 13 ran its control in another call
            controls.append(doc["stages"]["silu_finetune_control"]["eval_ppl"])
        # every stage as a point; the line joins the stages no sparser stage beats (the run's frontier)
        frontier, best = [], float("inf")
        for sp, ppl in sorted(pts, reverse=True):
            if ppl < best:
                frontier.append((sp, ppl))
                best = ppl
        color = colors[(2 * i) % 20 + (2 * i) // 20]  # the saturated tab20 colors first
        for a in (ax, zoom):
            a.plot([100 * s for s, _ in frontier[::-1]], [p for _, p in frontier[::-1]], "-", lw=1.5, color=color,
                   label=label if a is ax else None)
            a.plot([100 * s for s, _ in pts], [p for _, p in pts], "o", ms=4, color=color)
        at85 = [p for s, p in pts if s >= 0.845]
        summary[label] = min(at85) if at85 else None
    orig = json.load(open(RUNS[0][0]))["stages"]["original_silu"]["eval_ppl"]
    for a in (ax, zoom):
        a.axhline(orig, color="gray", lw=1, ls=":", label=f"original SiLU model ({orig:.1f})" if a is ax else None)
        a.axhspan(0, 1.1 * max(controls), color="green", alpha=0.08,
                  label=f"goal: <= 1.1 x control (controls {min(controls):.1f}-{max(controls):.1f})"
                  if a is ax else None)
        a.axvline(85, color="green", lw=1, ls="--")
        a.grid(True, which="both", alpha=0.3)
    zoom.set_xlim(78, 87)
    zoom.set_ylim(20, 45)
    zoom.set_xlabel("MLP-intermediate sparsity on wiki_eval (%)")
    zoom.set_ylabel("wiki_eval perplexity")
    zoom.set_title("near the goal (linear scale)")
    ax.set_yscale("log")
    ax.set_ylim(15, 400)
    ax.set_xlabel("MLP-intermediate sparsity on wiki_eval (%)")
    ax.set_ylabel("wiki_eval perplexity (log)")
    ax.set_title("Relufied SmolLM2-135M: perplexity vs sparsity, by recipe (H100)")
    ax.legend(fontsize=7.5, loc="upper left")
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(json.dumps({"out": args.out, "best_ppl_at_85pct": summary}))


if __name__ == "__main__":
    main()
