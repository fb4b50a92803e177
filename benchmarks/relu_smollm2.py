"""ReLU path on SmolLM2-135M: relufication, fine-tuning, progressive L1 (ProSparse), FATReLU.

Measures, on wiki_eval (perplexity over non-overlapping 1024-token windows, and the fraction of exact
zeros of the MLP intermediate activation act(gate(x)), i.e. the input-side sparsity of down_proj):

  original SiLU model | relufied, no training | relufied + fine-tune (L1 off) | + progressive L1
  (a sweep of peak factors) | + FATReLU threshold | + distillation variant | and the control: the
  SiLU model fine-tuned on the same tokens with the same budget (steps, lr, batch).

Every fine-tune sees the same batches (same seed) of wiki_calib minus its last 5%, which is held
out and is the only text used for choices (FATReLU threshold, which L1 peak is the headline);
wiki_eval is used for reporting only. The number of steps is sized from a throughput probe so the
whole script fits a time budget (``--train-budget-s``), capped at ``--max-epochs`` passes over the
training text. Results go to ``$OUT/relu_smollm2.json`` (written after every stage, so a cut-off run
still leaves its figures); the last line printed is one JSON document.

Options for the distillation recipe (docs/RESULTS.md, runs 3-7): ``--layerwise-steps N`` starts every
ReLU run from a layer-wise MLP distillation (``--layerwise-l1-peak`` adds its L1 term; measured once
as the stage ``relufied_layerwise``), ``--hidden-distill`` adds hidden-state distillation to the
e2e runs, ``--sample-tokens N`` adds text sampled from the original model to every run's training
data (the control's included; ``--sample-cache`` reuses it across runs on one machine).

    PYTHONPATH=. python3 benchmarks/relu_smollm2.py --model /tmp/m/SmolLM2-135M-Instruct.Q4_1.gguf
    PYTHONPATH=. python3 benchmarks/relu_smollm2.py --tiny   # CPU smoke test of the script itself
    # run 7, the best recipe so far:
    PYTHONPATH=. python3 benchmarks/relu_smollm2.py --model M.gguf --lr 1e-4 --max-steps 400 --peaks 8 \
        --skip-l1-off --relu-distill-alpha 1 --hidden-distill 1 --distill-alpha 0 --fat-target 0.85 \
        --no-resume-check --layerwise-steps 1200 --layerwise-l1-peak 2 --sample-tokens 524288
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from actsparse.relu import (
    FatRamp,
    FatThresholdConfig,
    L1Schedule,
    ReluAnneal,
    ReluConfig,
    TrainConfig,
    LayerwiseConfig,
    SampleConfig,
    distill_mlps_,
    evaluate_relu,
    fat_thresholds,
    relufy_,
    sample_teacher_windows,
    select_fat_threshold_,
    split_holdout,
    train_relu,
)
from actsparse.relu.measure import tokenize
from actsparse.relu.train import CHECKPOINT_FILE
from benchmarks.common import env_header

GOAL_SPARSITY = 0.85
GOAL_PPL_RATIO = 1.10  # final perplexity <= 1.10 x the SiLU control's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="GGUF file, HF folder or 'smollm2-135m'")
    p.add_argument("--tiny", action="store_true", help="tiny random Llama + byte tokenizer (CPU smoke test)")
    p.add_argument("--out", default=os.environ.get("OUT", "out/relu_smollm2"))
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step")
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--max-epochs", type=float, default=5.0)
    p.add_argument("--max-steps", type=int, default=0, help="0 = sized by the time budget and max-epochs")
    p.add_argument("--train-budget-s", type=float, default=300.0, help="wall time for all fine-tunes")
    p.add_argument("--deadline-s", type=float, default=500.0, help="skip runs that would end after this")
    p.add_argument("--peaks", default="0.5,2,8,32", help="final L1 factors to sweep")
    p.add_argument("--distill-alpha", type=float, default=0.5,
                   help="an extra L1 run distilled from the original model with this weight; 0 = none")
    p.add_argument("--relu-distill-alpha", type=float, default=0.0,
                   help="distillation weight of every ReLU run (L1 off and each L1 peak); 0 = plain LM loss")
    p.add_argument("--hidden-distill", type=float, default=0.0,
                   help="ReLU runs: weight of the per-layer hidden-state MSE to the original model")
    p.add_argument("--layerwise-steps", type=int, default=0,
                   help="ReLU runs start from a layer-wise MLP distillation of this many steps (0 = off)")
    p.add_argument("--layerwise-lr", type=float, default=3e-4)
    p.add_argument("--layerwise-l1-peak", type=float, default=0.0, help="progressive L1 in the layer-wise stage")
    p.add_argument("--sample-tokens", type=int, default=0,
                   help="add this many tokens sampled from the original model (prompted by training-text "
                        "prefixes) to every run's training data, the control's included (0 = off)")
    p.add_argument("--sample-cache", default="", help="load the sampled windows from this file if it exists, "
                   "else save them there (reuse across runs on one machine)")
    p.add_argument("--skip-l1-off", action="store_true", help="no ReLU run with the L1 term off")
    p.add_argument("--control-distill", type=float, default=0.0,
                   help="KL-to-the-original weight of the SiLU control's loss (0: plain LM loss, which "
                        "over-fits past ~1400 steps of this text, run 13)")
    p.add_argument("--skip-control", action="store_true",
                   help="no SiLU control (run it in another call, e.g. for a budget that does not fit one call)")
    p.add_argument("--control-from", default="",
                   help="take the SiLU control from this earlier run's JSON (same steps and training data) "
                        "instead of training it again: a run too long for one call can be split in two")
    p.add_argument("--sample-backend", default="auto", choices=("auto", "engine", "hf"),
                   help="sampler for --sample-tokens (auto: the decode engine on CUDA)")
    p.add_argument("--fat-allocations", default="uniform",
                   help="comma list: how --fat-target is shared between layers (uniform, equal, sensitivity; "
                        "see actsparse/relu/fat.py), each reported as its own stage")
    p.add_argument("--fat-tol", type=float, default=0.01, help="FATReLU: max relative ppl increase on holdout")
    p.add_argument("--fat-target", type=float, default=0.0,
                   help="also report each L1 run with the FATReLU threshold of this holdout sparsity; 0 = no")
    p.add_argument("--fat-ramp", type=float, default=0.0,
                   help="raise the FATReLU threshold during the e2e fine-tune to this sparsity (TrainConfig.fat_ramp)")
    p.add_argument("--fat-ramp-span", default="0.2,0.7", help="fractions of the steps where the ramp starts and ends")
    p.add_argument("--fat-ramp-every", type=int, default=10, help="steps between threshold updates of the ramp")
    p.add_argument("--relu-anneal", type=float, default=0.0,
                   help="ReLU runs: anneal SiLU -> ReLU (x * sigmoid(beta x), beta 1 -> 64) over this fraction of "
                        "the e2e steps (TrainConfig.relu_anneal; 0 = ReLU from the first step)")
    p.add_argument("--layerwise-cache", default="",
                   help="load the layer-wise distilled model's weights from this file if it exists, else save them there")
    p.add_argument("--no-resume-check", action="store_true", help="skip the 6 vs 3+3 step resume check")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the throughput probes (needs --max-steps; the later calls of a time-sliced run)")
    p.add_argument("--holdout-fraction", type=float, default=0.05)
    p.add_argument("--e2e-checkpoint", default="",
                   help="each e2e run checkpoints to DIR/<run name> and resumes from it if it is there: a run "
                        "longer than one call spreads over several (on one machine)")
    p.add_argument("--e2e-checkpoint-every", type=int, default=300,
                   help="with --e2e-checkpoint: optimizer steps between checkpoints (a safety net; a run that "
                        "reaches --deadline-s checkpoints and stops by itself, 20 s before it)")
    p.add_argument("--compile", action="store_true",
                   help="TrainConfig(compile=True): torch.compile each decoder layer for the fine-tunes "
                        "(benchmarks/bench_relu_train.py measures what it gains)")
    p.add_argument("--loss-chunk", type=int, default=None,
                   help="TrainConfig.loss_chunk: tokens per chunk of the loss (default by the vocabulary; 0: the "
                        "whole logits tensor, the path of runs 1-15)")
    p.add_argument("--e2e-stop-after", type=int, default=0,
                   help="with --e2e-checkpoint: stop each e2e run after this many steps in total (a later call "
                        "resumes it); its figures come from the call that finishes it")
    args = p.parse_args(argv)
    if args.e2e_stop_after and not args.e2e_checkpoint:
        p.error("--e2e-stop-after needs --e2e-checkpoint")
    if args.no_probe and not (args.max_steps and args.no_resume_check):
        p.error("--no-probe needs --max-steps and --no-resume-check (the probes size the run and check resuming)")
    if args.max_steps and args.max_steps < 5:
        p.error("--max-steps must be >= 5 (an L1-off warm-up and four L1 stages)")
    return args


def tiny_setup():
    """A 4-layer random Llama with a byte-level tokenizer, and synthetic text (script smoke test)."""
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tk = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(sorted(alphabet))}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=tk)
    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(cfg).eval()
    words = [f"w{i}" for i in range(50)]

    def text(seed):
        return "\n".join(" ".join(words[(i * 7 + j * seed) % 50] for j in range(12)) for i in range(3000))

    return model, tok, text(3), text(5)


def headline_stage(doc) -> str | None:
    """The ReLU stage with the highest *holdout* sparsity whose holdout perplexity is within
    GOAL_PPL_RATIO of the control's (chosen without looking at the evaluation text); None if none."""
    ctrl = doc["stages"].get("silu_finetune_control")
    if ctrl is None:
        return None
    ok = [(row["holdout_sparsity"], name) for name, row in doc["stages"].items()
          if name.startswith("relu_") and row["holdout_ppl"] <= GOAL_PPL_RATIO * ctrl["holdout_ppl"]]
    return max(ok)[1] if ok else None


def summarize(doc) -> dict:
    """Goal check and the final model (thresholds + configs), from the figures in ``doc`` alone.

    final model: the headline stage if one meets the perplexity rule on holdout; else the stage with
    the lowest holdout perplexity among those reaching GOAL_SPARSITY on holdout; else the sparsest.
    """
    stages = doc["stages"]
    ctrl, orig = stages.get("silu_finetune_control"), stages.get("original_silu")
    relu = {n: r for n, r in stages.items() if n.startswith("relu_")}
    best = headline_stage(doc)
    if best is not None:
        final, rule = best, f"highest holdout sparsity with holdout ppl <= {GOAL_PPL_RATIO} x control"
    elif any(r["holdout_sparsity"] >= GOAL_SPARSITY for r in relu.values()):
        final = min((r["holdout_ppl"], n) for n, r in relu.items() if r["holdout_sparsity"] >= GOAL_SPARSITY)[1]
        rule = f"no stage within {GOAL_PPL_RATIO} x control: lowest holdout ppl at holdout sparsity >= {GOAL_SPARSITY}"
    elif relu:
        final = max((r["holdout_sparsity"], n) for n, r in relu.items())[1]
        rule = f"no stage reaches {GOAL_SPARSITY} holdout sparsity: the sparsest"
    else:
        final, rule = None, "no ReLU stage ran"
    summary = {"goal": {"sparsity": GOAL_SPARSITY, "ppl_ratio_vs_control": GOAL_PPL_RATIO},
               "control_eval_ppl": ctrl["eval_ppl"] if ctrl else None,
               "original_eval_ppl": orig["eval_ppl"] if orig else None,
               "headline": best, "final_stage": final, "final_rule": rule, "goal_met": False}
    if final is not None:
        row = stages[final]
        summary.update(eval_ppl=row["eval_ppl"], eval_sparsity=row["eval_sparsity"])
        if ctrl:
            summary["ppl_ratio_vs_control"] = row["eval_ppl"] / ctrl["eval_ppl"]
            summary["goal_met"] = (row["eval_sparsity"] >= GOAL_SPARSITY
                                   and row["eval_ppl"] <= GOAL_PPL_RATIO * ctrl["eval_ppl"])
        if orig:
            summary["ppl_ratio_vs_original"] = row["eval_ppl"] / orig["eval_ppl"]
        doc["final_model"] = {"stage": final, "relu_config": asdict(ReluConfig()),
                              "fat_thresholds": row.get("thresholds") or {  # no FATReLU stage: T = 0
                                  f"model.layers.{i}.mlp.act_fn": 0.0 for i in range(doc["model"]["layers"])},
                              "train_config": doc["runs"][final.split("+")[0]]["train_config"]}
    doc["summary"] = summary
    return summary


def subsample(values, n=60):
    step = max(1, math.ceil(len(values) / n))
    return [round(v, 5) if isinstance(v, float) else v for v in values[::step]]


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    t_mono = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    doc = {"benchmark": "relu_smollm2", **env_header(), "command": "python " + " ".join(sys.argv),
           "args": vars(args), "stages": {}, "runs": {}, "skipped": [], "log": []}
    if args.tiny:
        args.context, args.eval_tokens = 64, 2048

    def save():
        doc["elapsed_s"] = round(time.time() - t_start, 1)
        tmp = out / "relu_smollm2.json.tmp"
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n")
        os.replace(tmp, out / "relu_smollm2.json")

    def log(msg):
        line = f"[{time.time() - t_start:7.1f}s] {msg}"
        print(line, flush=True)
        doc["log"].append(line)

    # ---- model and text ------------------------------------------------------------------------
    if args.tiny:
        original, tok, calib, evaltext = tiny_setup()
        original.to(device)
    else:
        from actsparse.io import read_text
        from actsparse.models import load_model

        original, tok = load_model(args.model, dtype=torch.float32, device=device)
        calib, evaltext = read_text("wiki_calib"), read_text("wiki_eval")
    original.eval().requires_grad_(False)
    doc["model"] = {"name": getattr(original, "name_or_path", "tiny"),
                    "params": sum(p.numel() for p in original.parameters()),
                    "layers": original.config.num_hidden_layers, "intermediate_size": original.config.intermediate_size}
    train_text, holdout_text = split_holdout(calib, args.holdout_fraction)
    eval_ids = tokenize(tok, evaltext)[: args.eval_tokens]
    holdout_ids = tokenize(tok, holdout_text)
    text_tokens = tokenize(tok, train_text).numel()
    extra = None
    if args.sample_tokens:
        t0 = time.time()
        sc = SampleConfig(tokens=args.sample_tokens, seq_len=args.context, seed=0, backend=args.sample_backend)
        cache = Path(args.sample_cache) if args.sample_cache else None
        if cache is not None and cache.exists():
            extra = torch.load(cache)
            if extra.numel() < args.sample_tokens or extra.shape[1] != args.context:
                raise SystemExit(f"{cache} holds {tuple(extra.shape)} windows, not what was asked for")
            extra = extra[: -(-args.sample_tokens // args.context)]
        else:
            extra = sample_teacher_windows(original, tokenize(tok, train_text), sc, progress=False)
            if cache is not None:
                torch.save(extra, cache)
        doc["sampling"] = {"config": asdict(sc), "windows": extra.shape[0], "seconds": round(time.time() - t0, 1)}
        log(f"sampled {extra.numel()} tokens from the original model in {time.time() - t0:.0f}s")
    train_tokens = text_tokens + (extra.numel() if extra is not None else 0)
    doc["data"] = {"train_tokens": train_tokens, "train_text_tokens": text_tokens,
                   "sampled_tokens": extra.numel() if extra is not None else 0, "holdout_tokens": holdout_ids.numel(),
                   "eval_tokens": eval_ids.numel() // args.context * args.context}
    log(f"loaded; train {train_tokens} tokens, holdout {holdout_ids.numel()}, eval {eval_ids.numel()}")

    def measure(model, name, **extra):
        ev = evaluate_relu(model, tok, "", context=args.context, max_tokens=args.eval_tokens, ids=eval_ids)
        ho = evaluate_relu(model, tok, "", context=args.context, max_tokens=holdout_ids.numel(), ids=holdout_ids)
        row = {"eval_ppl": ev.perplexity, "eval_sparsity": ev.sparsity, "eval_tokens_predicted": ev.tokens,
               "holdout_ppl": ho.perplexity, "holdout_sparsity": ho.sparsity,
               "eval_layer_sparsity": [round(v, 4) for v in ev.layer_sparsity.values()], **extra}
        doc["stages"][name] = row
        log(f"{name:28s} eval ppl {ev.perplexity:9.3f}  sparsity {ev.sparsity:.4f}  | holdout ppl {ho.perplexity:9.3f}"
            f"  sparsity {ho.sparsity:.4f}")
        save()
        return row

    measure(original, "original_silu")
    relu0 = relufy_(copy.deepcopy(original), ReluConfig())
    measure(relu0, "relufied_no_training")
    del relu0

    # ---- throughput probe and step budget --------------------------------------------------------
    peaks = [float(x) for x in args.peaks.split(",") if x.strip()]

    def config(steps, l1_peak=None, distill=0.0, hidden=0.0, relu=False):
        """relu: a ReLU run of the sweep (--fat-ramp and --relu-anneal apply); False for the SiLU
        control and the resume check."""
        l1 = L1Schedule.even(steps, [l1_peak / 4, l1_peak / 2, l1_peak, l1_peak], warmup_steps=steps // 5) \
            if l1_peak else None
        fat_ramp = None
        if relu and args.fat_ramp:
            start, end = (float(v) for v in args.fat_ramp_span.split(","))
            fat_ramp = FatRamp(target=args.fat_ramp, start=start, end=end, every=args.fat_ramp_every)
        return TrainConfig(steps=steps, seq_len=args.context, batch_size=args.batch_size,
                           micro_batch_size=args.micro_batch_size, lr=args.lr, warmup_steps=max(1, steps // 20),
                           weight_decay=args.weight_decay, l1=l1, distill_alpha=distill, hidden_distill=hidden,
                           fat_ramp=fat_ramp, seed=0, log_every=10,
                           relu_anneal=ReluAnneal(end=args.relu_anneal) if relu and args.relu_anneal else None,
                           compile=args.compile, loss_chunk=args.loss_chunk,
                           # a time-sliced run also checkpoints on the way: a call cut off by its
                           # timeout loses at most that many steps (without it, one H100 call lost 2400)
                           checkpoint_every=args.e2e_checkpoint_every if args.e2e_checkpoint else 0)

    def probe(distill, checkpoint_dir=None):
        m = relufy_(copy.deepcopy(original).requires_grad_(True), ReluConfig())
        h = train_relu(m, tok, train_text, config(6, l1_peak=1.0, distill=distill), checkpoint_dir=checkpoint_dir,
                       teacher=original if distill else None, progress=False)
        return args.batch_size * args.context / statistics.median(h.step_seconds[2:]), m

    ckpt_root = Path(os.environ.get("TMPDIR", "/tmp")) / "relu_smollm2_ckpt"
    if args.no_probe:
        tps, straight = float("nan"), None
    else:
        tps, straight = probe(0.0, None if args.no_resume_check else ckpt_root / "straight")
    # Checkpoint/resume on this device: 3 steps, then resume for 3 more, against the 6 straight steps.
    if not args.no_resume_check:
        m = relufy_(copy.deepcopy(original).requires_grad_(True), ReluConfig())
        train_relu(m, tok, train_text, config(6, l1_peak=1.0), checkpoint_dir=ckpt_root / "split", stop_after=3,
                   progress=False)
        m = relufy_(copy.deepcopy(original).requires_grad_(True), ReluConfig())
        train_relu(m, tok, train_text, config(6, l1_peak=1.0), checkpoint_dir=ckpt_root / "split", resume=True,
                   progress=False)
        diffs = [(a - b).abs().max().item() for a, b in zip(straight.state_dict().values(), m.state_dict().values())]
        doc["resume_check"] = {"max_abs_weight_diff": max(diffs), "identical": max(diffs) == 0.0,
                               "note": "6 steps straight vs 3 + resume 3, bf16 autocast on this device"}
        log(f"resume check: max |w_straight - w_resumed| = {max(diffs):.3g}")
        del m
    del straight
    alpha_any = args.distill_alpha or args.relu_distill_alpha or args.hidden_distill
    tps_distill = probe(alpha_any)[0] if alpha_any > 0 and not args.no_probe else tps
    relu_teacher = bool(args.relu_distill_alpha or args.hidden_distill)
    batch_tokens = args.batch_size * args.context
    n_relu = (0 if args.skip_l1_off else 1) + len(peaks)  # relu (L1 off), one run per L1 peak
    per_step_s = batch_tokens / tps + n_relu * batch_tokens / (tps_distill if relu_teacher else tps) \
        + (batch_tokens / tps_distill if args.distill_alpha > 0 else 0)
    # the layer-wise stage costs about a teacher forward plus the MLPs' backward per step
    lw_s = args.layerwise_steps * batch_tokens / tps_distill if args.layerwise_steps else 0.0
    steps_time = int(max(0.0, args.train_budget_s - lw_s) / per_step_s) if not args.no_probe else 0
    steps_epochs = int(args.max_epochs * train_tokens / batch_tokens)
    steps = args.max_steps or max(10, min(steps_time, steps_epochs))
    doc["budget"] = {"tokens_per_s": tps, "tokens_per_s_distill": tps_distill, "batch_tokens": batch_tokens,
                     "steps_by_time": steps_time, "steps_by_epochs": steps_epochs, "steps": steps,
                     "epochs": steps * batch_tokens / train_tokens}
    log(f"throughput {tps:.0f} tok/s ({tps_distill:.0f} with distillation) -> {steps} steps "
        f"({steps * batch_tokens / train_tokens:.2f} epochs) per run")
    save()

    def fits(seconds_needed):
        return time.time() - t_start + seconds_needed < args.deadline_s

    start_model = None  # the layer-wise distilled ReLU model, when --layerwise-steps
    if args.layerwise_steps:
        n = args.layerwise_steps
        l1 = L1Schedule.even(n, [args.layerwise_l1_peak / 2, args.layerwise_l1_peak], warmup_steps=n // 5) \
            if args.layerwise_l1_peak else None
        lw_cfg = LayerwiseConfig(steps=n, seq_len=args.context, batch_size=args.batch_size, lr=args.layerwise_lr,
                                 warmup_steps=min(max(1, n // 20), n - 1), l1=l1)
        start_model = relufy_(copy.deepcopy(original), ReluConfig())
        lw_cache = Path(args.layerwise_cache) if args.layerwise_cache else None
        if lw_cache is not None and lw_cache.exists():
            cached = torch.load(lw_cache, map_location=device)
            if cached["config"] != asdict(lw_cfg) or cached["data"] != doc["data"]:
                raise SystemExit(f"{lw_cache} was written with another layer-wise config or other training data")
            start_model.load_state_dict(cached["model"])
            doc["layerwise"] = {**cached["record"], "loaded_from": str(lw_cache)}
            log(f"layer-wise MLP distillation: loaded from {lw_cache}")
        else:
            h = distill_mlps_(start_model, original, tok, train_text, lw_cfg, progress=False, extra_windows=extra)
            doc["layerwise"] = {"config": asdict(lw_cfg), "seconds": h.seconds, "tokens": h.tokens,
                                "initial_layer_error": [round(e, 4) for e in h.initial_layer_error],
                                "final_layer_error": [round(e, 4) for e in h.final_layer_error],
                                "history": {"step": subsample(h.step), "rel_error": subsample(h.rel_error),
                                            "sparsity": subsample(h.sparsity), "l1_factor": subsample(h.l1_factor)}}
            log(f"layer-wise MLP distillation: {n} steps in {h.seconds:.0f}s, mean rel. error "
                f"{sum(h.initial_layer_error) / len(h.initial_layer_error):.3f} -> {h.rel_error[-1]:.3f}")
            if lw_cache is not None:
                torch.save({"config": asdict(lw_cfg), "data": doc["data"], "record": doc["layerwise"],
                            "model": start_model.state_dict()}, lw_cache)
        measure(start_model, "relufied_layerwise", steps=n)

    def run(name, silu=False, l1_peak=None, distill=0.0, fat=True, hidden=0.0):
        cfg = config(steps, l1_peak, distill, hidden, relu=not silu)
        teacher = distill or hidden
        need = steps * batch_tokens / (tps_distill if teacher else tps) * 1.1 + (15 if fat else 5)
        ckpt_dir = Path(args.e2e_checkpoint) / name if args.e2e_checkpoint else None
        resume = ckpt_dir is not None and (ckpt_dir / CHECKPOINT_FILE).exists()
        if ckpt_dir is not None:
            log(f"{name}: {'resuming from' if resume else 'checkpointing to'} {ckpt_dir}"
                + (f", stopping at step {args.e2e_stop_after}" if args.e2e_stop_after else ""))
        if ckpt_dir is not None or args.no_probe:
            # a time-sliced run: the call's own timeout bounds it, and it resumes later; without the
            # throughput probe there is no estimate (NaN) to check against the deadline
            need = 0.0
        if not fits(need):
            doc["skipped"].append({"run": name, "needed_s": need})
            log(f"skip {name}: needs ~{need:.0f}s, past the deadline")
            save()
            return None
        if silu or start_model is None:
            model = copy.deepcopy(original).requires_grad_(True)
        else:
            model = copy.deepcopy(start_model).requires_grad_(True)
        if not silu:
            relufy_(model, ReluConfig())
        h = train_relu(model, tok, train_text, cfg, teacher=original if teacher else None, progress=False,
                       extra_windows=extra, checkpoint_dir=ckpt_dir, resume=resume,
                       stop_after=args.e2e_stop_after or None,
                       # a time-sliced run stops itself before the deadline, leaving time to save
                       stop_at=t_mono + args.deadline_s - 20 if ckpt_dir is not None else None)
        model.requires_grad_(False)
        if len(h.lm_loss) < steps:  # stopped early (step or time limit): figures come when a later call finishes it
            doc.setdefault("partial", {})[name] = {"steps_done": len(h.lm_loss), "steps": steps,
                                                   "checkpoint": str(ckpt_dir)}
            log(f"{name}: stopped at step {len(h.lm_loss)} of {steps}; resume with the same arguments")
            save()
            return None
        doc["runs"][name] = {
            "train_config": asdict(cfg), "seconds": h.seconds, "tokens": h.tokens,
            "tokens_per_s": h.tokens_per_second, "final_lm_loss": statistics.mean(h.lm_loss[-5:]),
            "final_train_sparsity": statistics.mean(h.sparsity[-5:]),
            "history": {"step": subsample(h.step), "lm_loss": subsample(h.lm_loss), "l1": subsample(h.l1),
                        "l1_factor": subsample(h.l1_factor), "sparsity": subsample(h.sparsity),
                        "kl": subsample(h.kl), "hidden": subsample(h.hidden),
                        "fat_level": subsample(h.fat_level), "fat_threshold": subsample(h.fat_threshold)},
        }
        measure(model, name, steps=steps)
        if silu or not fat:
            return model
        fat_cfg = FatThresholdConfig(max_ppl_increase=args.fat_tol, context=args.context,
                                     max_tokens=holdout_ids.numel(), search_steps=8)
        r = select_fat_threshold_(model, tok, holdout_text, fat_cfg)
        measure(model, name + "+fat", steps=steps, fat_threshold=r.threshold, fat_trials=r.trials,
                fat_holdout_base_ppl=r.base_perplexity)
        doc["stages"][name + "+fat"]["thresholds"] = fat_thresholds(model)
        if args.fat_target and (l1_peak or args.fat_ramp):
            for alloc in args.fat_allocations.split(","):
                fat_cfg = FatThresholdConfig(max_ppl_increase=None, target_sparsity=args.fat_target,
                                             allocation=alloc, context=args.context, max_tokens=holdout_ids.numel())
                t0 = time.perf_counter()
                r = select_fat_threshold_(model, tok, holdout_text, fat_cfg)
                stage = name + f"+fat@{args.fat_target:g}" + ("" if alloc == "uniform" else f"-{alloc}")
                measure(model, stage, steps=steps, fat_threshold=r.threshold, fat_allocation=alloc,
                        fat_seconds=time.perf_counter() - t0, fat_layer_targets=r.layer_targets,
                        fat_sensitivity=r.sensitivity)
                doc["stages"][stage]["thresholds"] = fat_thresholds(model)
        save()
        return model

    if args.control_from:
        earlier = json.loads(Path(args.control_from).read_text())
        for key in ("steps", "batch_tokens"):
            if earlier["budget"][key] != doc["budget"][key]:
                raise SystemExit(f"--control-from: {key} {earlier['budget'][key]} != {doc['budget'][key]}")
        if earlier["data"] != doc["data"]:
            raise SystemExit(f"--control-from: training data differ: {earlier['data']} vs {doc['data']}")
        doc["stages"]["silu_finetune_control"] = earlier["stages"]["silu_finetune_control"]
        doc["runs"]["silu_finetune_control"] = earlier["runs"]["silu_finetune_control"]
        doc["control_from"] = {"file": args.control_from, "date": earlier["date"], "commit": earlier["commit"]}
        log(f"control taken from {args.control_from} ({earlier['date']}): eval ppl "
            f"{doc['stages']['silu_finetune_control']['eval_ppl']:.3f}")
        control = True  # figures only: the cross-check below needs the model itself
    elif args.skip_control:
        log("no SiLU control in this call (--skip-control): ratios need a control of the same budget")
        control = None
    else:
        control = run("silu_finetune_control", silu=True, distill=args.control_distill)
    ra, hd = args.relu_distill_alpha, args.hidden_distill
    tag = (f"_distill{ra:g}" if ra else "") + (f"_hidden{hd:g}" if hd else "") + ("_lw" if start_model else "")
    tag += "_sampled" if extra is not None else ""
    tag += f"_ramp{args.fat_ramp:g}" if args.fat_ramp else ""
    tag += f"_anneal{args.relu_anneal:g}" if args.relu_anneal else ""
    if not args.skip_l1_off:
        run("relu_finetune_l1_off" + tag, distill=ra, hidden=hd)
    for peak in peaks:
        run(f"relu_l1_peak{peak:g}" + tag, l1_peak=peak, distill=ra, hidden=hd)  # the model is dropped: figures are in doc

    # ---- headline: chosen on the held-out calibration text only ----------------------------------
    def choose():
        return headline_stage(doc) if control is not None else None

    best = choose()
    if args.distill_alpha > 0 and peaks:
        peak = peaks[len(peaks) // 2]
        if best is not None and "peak" in best:
            peak = float(best.split("peak")[1].split("+")[0].split("_")[0])
        run(f"relu_l1_peak{peak:g}_distill{args.distill_alpha:g}", l1_peak=peak, distill=args.distill_alpha)

    summarize(doc)
    log("summary " + json.dumps(doc["summary"]))

    # Cross-check our batched evaluation with the library's perplexity on the control model.
    try:
        from actsparse.evaluate import perplexity
        if control is not None and control is not True:
            ref = perplexity(control, tok, evaltext, context=args.context, max_tokens=args.eval_tokens, progress=False)
            doc["crosscheck_control_eval_ppl_actsparse_evaluate"] = ref["ppl"]
    except ImportError:
        pass
    save()
    compact = {k: doc[k] for k in ("benchmark", "date", "commit", "gpu", "torch", "triton", "budget", "summary")
               if k in doc}
    compact["table"] = {n: {"eval_ppl": round(r["eval_ppl"], 3), "eval_sparsity": round(r["eval_sparsity"], 4),
                            "holdout_ppl": round(r["holdout_ppl"], 3)} for n, r in doc["stages"].items()}
    print(json.dumps(compact, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
