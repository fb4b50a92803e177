"""One plot with every criterion on the same axes (issue #4's report), from the two GPU quality runs.

    PYTHONPATH=. python benchmarks/plot_criteria.py \
        --runs benchmarks/results/quality_smollm2_h100.json benchmarks/results/quality_rotated_smollm2_h100.json \
        --out docs/criteria_all_smollm2.png

Both runs use the same model, texts, token budgets and dense perplexity (checked); the greedy
allocation of each criterion at s in {0.4, 0.5, 0.6, 0.7} is plotted against achieved sparsity.
"""

from __future__ import annotations

import argparse
import json

from actsparse.plots import plot_quality


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--allocation", default="greedy")
    ap.add_argument("--sparsities", default="0.4,0.5,0.6,0.7")
    args = ap.parse_args(argv)
    wanted = {float(s) for s in args.sparsities.split(",")}
    merged, dense = {"configs": {}}, None
    for path in args.runs:
        run = json.load(open(path))
        if dense is not None and abs(run["dense"]["ppl"] - dense) > 1e-6 * dense:
            raise SystemExit(f"{path}: dense perplexity {run['dense']['ppl']} differs from {dense}: not the same setup")
        dense = run["dense"]["ppl"]
        merged["dense"] = run["dense"]
        for name, m in run["configs"].items():
            method, s = name.split("@")
            if method.endswith(f"-{args.allocation}") and float(s) in wanted:
                merged["configs"][name] = m
    plot_quality(merged, args.out, title=f"SmolLM2-135M on wiki_eval: every criterion ({args.allocation} allocation)")
    print(json.dumps({"out": args.out, "methods": sorted({n.split("@")[0] for n in merged["configs"]}), "dense_ppl": dense}))


if __name__ == "__main__":
    main()
