"""The jobs behind each CLI command, as typed functions (the CLI only parses arguments).

Each ``run_*`` checks its outputs are writable before any long computation, writes them
atomically, and returns a JSON-serialisable summary.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .calibrate import Calibration, CalibrationConfig, calibrate
from .errors import ActsparseError
from .evaluate import evaluate
from .io import check_writable, read_text, write_json
from .models import DEFAULT_MODEL, load_model
from .rotate import prepare_model_
from .sparsify import TealConfig, sparsify_
from .thresholds import ThresholdSet, compute_thresholds, load_thresholds, refine_thresholds


def run_calibrate(model: str, text: str, out: str, config: CalibrationConfig, dtype: str = "float32",
                  device: str = "cpu", rotate: str = "none") -> dict:
    if rotate not in ("none", "heads", "full"):
        raise ActsparseError(f"rotate must be none, heads or full, got '{rotate}'")
    check_writable(out)
    body = read_text(text)
    mdl, tok = load_model(model, dtype=dtype, device=device)
    t0 = time.perf_counter()
    if rotate != "none":  # PCA rotation folded into the weights first; the calibration carries it
        from .rotate import RotationConfig, calibrate_rotated

        rot = RotationConfig(tokens=min(config.tokens, 16384), seq_len=config.seq_len, residual=rotate == "full")
        calib = calibrate_rotated(mdl, tok, body, config, rot, text_name=str(text))
    else:
        calib = calibrate(mdl, tok, body, config, text_name=str(text))
    calib.save(out)
    return {"calibration": str(out), "model": calib.meta["model"], "tokens": calib.meta["tokens"],
            "criteria": calib.meta["criteria"], "greedy": bool(calib.allocations), "rotated": rotate,
            "seconds": round(time.perf_counter() - t0, 1)}


def thresholds_for(mdl, tok, calib: Calibration, sparsity: float, allocation: str, criterion: str,
                   refine_tokens: int = 16384, text: str | None = None) -> ThresholdSet:
    """Thresholds from a calibration, refined under upstream sparsity on the calibration text."""
    ts = compute_thresholds(mdl, calib, sparsity, allocation, criterion)
    if refine_tokens > 0 and sparsity > 0:
        body = read_text(text or calib.meta["text"])
        ts = refine_thresholds(mdl, tok, body, calib, ts, tokens=refine_tokens)
    return ts


def run_sparsify(model: str, calibration: str, out: str, sparsity: float, allocation: str = "greedy",
                 criterion: str = "magnitude", refine_tokens: int = 16384, text: str | None = None) -> dict:
    TealConfig(sparsity=sparsity, allocation=allocation, criterion=criterion)  # validates early
    check_writable(out)
    calib = Calibration.load(calibration)
    mdl, tok = load_model(model)
    prepare_model_(mdl, calib)  # rotates a fresh model if the calibration was made on a rotated one
    ts = thresholds_for(mdl, tok, calib, sparsity, allocation, criterion, refine_tokens, text)
    ts.save(out)
    per_site = ts.meta["site_sparsity"]
    by_kind: dict[str, list[float]] = {}
    for name, s in per_site.items():
        by_kind.setdefault(name.rsplit(".", 1)[1], []).append(s)
    return {"thresholds": str(out), "sparsity": sparsity, "allocation": allocation, "criterion": criterion,
            "mean_site_sparsity": {k: sum(v) / len(v) for k, v in by_kind.items()}}


def threshold_sets_from(model, tok, calibration: str | None, sparsities: list[float], allocations: list[str],
                        criteria: list[str], threshold_files: list[str], refine_tokens: int = 16384) -> dict[str, dict]:
    """Named threshold sets: ``<allocation>-<criterion>@<s>`` from a calibration, and files by name."""
    sets: dict[str, dict] = {}
    if sparsities:
        if calibration is None:
            raise ActsparseError("--sparsity needs --calib (a calibration file)")
        calib = Calibration.load(calibration)
        prepare_model_(model, calib)
        for crit in criteria:
            for alloc in allocations:
                for s in sparsities:
                    TealConfig(sparsity=s, allocation=alloc, criterion=crit)
                    name = f"{crit}-{alloc}@{s:g}"
                    sets[name] = thresholds_for(model, tok, calib, s, alloc, crit, refine_tokens).thresholds
    for f in threshold_files:
        t, meta = load_thresholds(f, model=model)
        sets[f"{Path(f).stem}@{meta.get('sparsity', '?')}"] = t
    return sets


def run_eval(model: str, text: str, calibration: str | None = None, sparsities: list[float] = (),
             allocations: list[str] = ("greedy",), criteria: list[str] = ("magnitude",),
             threshold_files: list[str] = (), context: int = 1024, max_tokens: int | None = 65536,
             out: str | None = None, plot: str | None = None, dtype: str = "float32", device: str = "cpu",
             refine_tokens: int = 16384) -> dict:
    for p in (out, plot):
        if p:
            check_writable(p)
    body = read_text(text)
    mdl, tok = load_model(model, dtype=dtype, device=device)
    sets = threshold_sets_from(mdl, tok, calibration, list(sparsities), list(allocations), list(criteria),
                               list(threshold_files), refine_tokens)
    results = evaluate(mdl, tok, body, sets, context=context, max_tokens=max_tokens)
    results.update({"model": str(model), "text": str(text)})
    if out:
        write_json(out, results)
    if plot and results["configs"]:
        from .plots import plot_layer_sparsity, plot_quality

        plot_quality(results, plot, title=f"{Path(str(model)).name} on {Path(str(text)).name}")
        name = max(results["configs"], key=lambda k: results["configs"][k]["sparsity"])
        layer_png = str(Path(plot).with_name(Path(plot).stem + "_layers.png"))
        plot_layer_sparsity(results["configs"][name]["per_site_sparsity"], layer_png, title=f"achieved sparsity, {name}")
    return results


def run_generate(model: str, prompt: str, thresholds: str | None = None, calibration: str | None = None,
                 sparsity: float = 0.0, allocation: str = "greedy", criterion: str = "magnitude",
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 prefill_dense: bool = False, chat: bool = False, device: str | None = None,
                 engine: str = "auto") -> dict:
    """Generate text with the sparsified model: the fast engine on a GPU, Hugging Face on the CPU."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if engine == "auto":
        engine = "fast" if device.startswith("cuda") else "hf"
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    mdl, tok = load_model(model, dtype=dtype, device=device)
    if thresholds:
        config = TealConfig(thresholds=thresholds, prefill_dense=prefill_dense)
    elif sparsity > 0:
        config = TealConfig(sparsity=sparsity, allocation=allocation, criterion=criterion,
                            calibration=calibration, prefill_dense=prefill_dense)
    else:
        config = TealConfig(sparsity=0.0, prefill_dense=prefill_dense)
    if chat and getattr(tok, "chat_template", None):
        prompt = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    if engine == "fast":
        from .engine.generate import generate_from_hf

        return generate_from_hf(mdl, tok, prompt, config, max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k)
    sparsify_(mdl, config)
    inputs = tok(prompt, return_tensors="pt").to(device)
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=temperature > 0, pad_token_id=tok.eos_token_id)
    if temperature > 0:
        kwargs.update(temperature=temperature, top_k=top_k or 0)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = mdl.generate(**inputs, **kwargs)
    dt = time.perf_counter() - t0
    new = out[0, inputs["input_ids"].shape[1]:]
    return {"text": tok.decode(new, skip_special_tokens=True), "new_tokens": int(new.numel()),
            "tokens_per_s": new.numel() / dt, "engine": "huggingface", "device": device}


def run_demo(out_dir: str = "actsparse-demo", sparsity: float = 0.5, calib_tokens: int = 32768,
             eval_tokens: int = 16384, prompt: str = "The history of the printing press") -> dict:
    """The main job on the embedded default: SmolLM2-135M, packaged wiki text, TEAL at ``sparsity``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_writable(out / "results.json")
    cal_path = out / "calibration.safetensors"
    if not cal_path.exists():
        run_calibrate(DEFAULT_MODEL, "wiki_calib", str(cal_path),
                      CalibrationConfig(tokens=calib_tokens, seq_len=1024, greedy_tokens=512, greedy_step=0.05))
    refine = min(calib_tokens, 4096)  # a short refinement pass keeps the demo minutes long on a CPU
    run_sparsify(DEFAULT_MODEL, str(cal_path), str(out / "thresholds.safetensors"), sparsity, "greedy",
                 refine_tokens=refine)
    results = run_eval(DEFAULT_MODEL, "wiki_eval", calibration=str(cal_path), sparsities=[sparsity],
                       allocations=["uniform", "greedy"], max_tokens=eval_tokens, refine_tokens=refine,
                       out=str(out / "results.json"), plot=str(out / "quality.png"))
    gen = run_generate(DEFAULT_MODEL, prompt, thresholds=str(out / "thresholds.safetensors"), max_new_tokens=48)
    summary = {
        "output_dir": str(out),
        "dense_ppl": results["dense"]["ppl"],
        "sparse": {k: {m: v[m] for m in ("ppl", "kl", "top1_agreement", "sparsity")}
                   for k, v in results["configs"].items()},
        "generated": prompt + gen["text"],
        "tokens_per_s": gen["tokens_per_s"],
    }
    write_json(out / "summary.json", summary)
    return summary
