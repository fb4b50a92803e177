"""Quality against sparsity on a real model (issues: foundation + criteria), in one run.

Calibrates SmolLM2-135M on wiki_calib, computes thresholds for every (criterion, allocation,
sparsity) and evaluates them all on the same wiki_eval windows against the dense model:
perplexity, KL(dense || sparse), top-1 agreement, achieved sparsity (model-wide and per site).

    python benchmarks/quality_smollm2.py --model smollm2-135m --device cuda --out results/

Last line of stdout: one JSON document. Runs on the CPU too (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

import actsparse as A
from actsparse.calibrate import CalibrationConfig
from actsparse.evaluate import evaluate
from actsparse.pipeline import thresholds_for
from actsparse.plots import plot_layer_sparsity, plot_quality


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except Exception:
        return os.environ.get("ACTSPARSE_COMMIT", "unknown")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--criteria", default="magnitude", help="criteria on the model as it is")
    ap.add_argument("--rotated-criteria", default="", help="criteria on the PCA-rotated model (LaRoSa-style)")
    ap.add_argument("--sparsities", default="0.25,0.4,0.5,0.6,0.7")
    ap.add_argument("--allocations", default="uniform,greedy")
    ap.add_argument("--calib-tokens", type=int, default=131072)
    ap.add_argument("--greedy-tokens", type=int, default=2048)
    ap.add_argument("--refine-tokens", type=int, default=16384)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--out", default="results")
    ap.add_argument("--calibration", default=None, help="reuse this calibration file (unrotated criteria)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets, for a smoke run")
    args = ap.parse_args(argv)
    if args.quick:
        args.calib_tokens, args.greedy_tokens, args.refine_tokens, args.eval_tokens = 4096, 1024, 2048, 2048

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    allocations = args.allocations.split(",")
    criteria = args.criteria.split(",")
    t_start = time.time()

    calib_text, eval_text = A.read_text("wiki_calib"), A.read_text("wiki_eval")
    rotated = [c for c in args.rotated_criteria.split(",") if c]
    t_calib = t_eval = 0.0
    res = None
    for rotate, crits in ((False, criteria), (True, rotated)):
        if not crits:
            continue
        model, tok = A.load_model(args.model, dtype=args.dtype, device=args.device)
        cfg = CalibrationConfig(tokens=args.calib_tokens, greedy_tokens=args.greedy_tokens, criteria=tuple(crits))
        t0 = time.time()
        if rotate:
            from actsparse.rotate import calibrate_rotated

            calib = calibrate_rotated(model, tok, calib_text, cfg, text_name="wiki_calib")
        elif args.calibration:
            calib = A.Calibration.load(args.calibration)
            calib.check_model(model)
        else:
            calib = A.calibrate(model, tok, calib_text, cfg, text_name="wiki_calib")
        calib.save(out / ("calibration_rotated.safetensors" if rotate else "calibration.safetensors"))
        t_calib += time.time() - t0
        prefix = "rot-" if rotate else ""
        print(f"calibrated ({'rotated' if rotate else 'plain'}) [{time.time() - t_start:.0f}s]", file=sys.stderr, flush=True)
        sets = {}
        for crit in crits:
            for alloc in allocations:
                for s in sparsities:
                    sets[f"{prefix}{crit}-{alloc}@{s:g}"] = thresholds_for(
                        model, tok, calib, s, alloc, crit, args.refine_tokens, text="wiki_calib").thresholds
        t0 = time.time()
        def save_partial(name, partial, prefix=prefix):
            (out / f"quality_partial{'_rot' if prefix else ''}.json").write_text(json.dumps(partial, indent=1))
            m = partial["configs"][name]
            print(f"{name}: ppl {m['ppl']:.3f} (dense {partial['dense']['ppl']:.3f}) kl {m['kl']:.4f} "
                  f"top1 {m['top1_agreement']:.3f} sparsity {m['sparsity']:.4f}  [{time.time() - t_start:.0f}s]",
                  file=sys.stderr, flush=True)

        part = evaluate(model, tok, eval_text, sets, context=args.context, max_tokens=args.eval_tokens,
                        on_result=save_partial, progress=False)
        t_eval += time.time() - t0
        if res is None:
            res = part
        else:
            res["dense_rotated"] = part["dense"]
            res["configs"].update(part["configs"])
        del model

    res["setup"] = {
        "model": args.model, "dtype": args.dtype, "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__, "calib_tokens": calib.meta["tokens"], "greedy_tokens": args.greedy_tokens,
        "refine_tokens": args.refine_tokens, "eval_tokens": res["tokens"], "context": args.context,
        "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
        "seconds": {"calibrate": round(t_calib, 1), "evaluate": round(t_eval, 1), "total": round(time.time() - t_start, 1)},
    }
    (out / "quality.json").write_text(json.dumps(res, indent=1))
    plot_quality(res, out / "quality.png", title="SmolLM2-135M on wiki_eval")
    best = "magnitude-greedy@0.5" if "magnitude-greedy@0.5" in res["configs"] else next(iter(res["configs"]))
    plot_layer_sparsity(res["configs"][best]["per_site_sparsity"], out / "layers.png",
                        title=f"achieved sparsity per block, {best}")

    dense = res["dense"]["ppl"]
    lines = [f"dense ppl {dense:.3f}", f"{'config':32s} {'ppl':>8s} {'Δppl':>7s} {'KL':>7s} {'top1':>6s} {'sparsity':>8s}"]
    for name, m in res["configs"].items():
        lines.append(f"{name:32s} {m['ppl']:8.3f} {m['ppl'] - dense:7.3f} {m['kl']:7.4f} "
                     f"{m['top1_agreement']:6.3f} {m['sparsity']:8.4f}")
    print("\n".join(lines), file=sys.stderr)
    summary = {"dense_ppl": dense, "setup": res["setup"],
               "configs": {k: {m: v[m] for m in ("ppl", "kl", "top1_agreement", "sparsity")}
                           for k, v in res["configs"].items()}}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
