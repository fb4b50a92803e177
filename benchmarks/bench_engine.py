"""End-to-end decode speed: our dense engine, our sparse engine at several sparsities, and HF generate.

Batch-1 decode reads every weight once per token, so the bound is (weight bytes) / (memory
bandwidth): block linears + lm_head (the embedding is a lookup), over the device-to-device copy
bandwidth measured in the same run. Sparse decode skips the weight rows of zeroed inputs, so at
sparsity s the block bytes shrink by s (lm_head stays dense).

Everything runs in one process on random bf16 weights of a named shape (default Llama-3-8B),
created directly on the GPU. Thresholds come from the engine's own activations (calibration on
random tokens, s-quantile of |x| per input site); the achieved sparsity is measured on the
decoded tokens. Correctness gates run first (engine vs Hugging Face logits; sparse kernels vs the
reference path; graph-decoded tokens vs teacher-forced argmax); results carry gates_passed.

    PYTHONPATH=. python benchmarks/bench_engine.py --out benchmarks/results/engine_h100.json

Last line of output: one JSON document.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import statistics
import time
import traceback

import torch

from actsparse.engine import Generator, hf_model_from_engine, random_model


def log(msg: str) -> None:
    print(msg, flush=True)


def _pdl_default() -> bool:
    from actsparse.kernels.sparse_gemv import pdl_default  # noqa: PLC0415

    return pdl_default()


def git_commit() -> str:
    from benchmarks.common import git_commit as common_git_commit  # noqa: PLC0415

    return common_git_commit()


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (the practical HBM ceiling)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    if torch.device(device).type != "cuda":
        t = time.perf_counter()
        dst.copy_(src)
        return 2 * nbytes / (time.perf_counter() - t)
    from triton.testing import do_bench

    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / (ms * 1e-3)


def weight_bytes(model) -> tuple[int, int]:
    """(block linear bytes, lm_head bytes): what one decode step must read."""
    block = 0
    for _, lin, _ in model.block_linears():
        w = lin.weight if lin.weight is not None else lin.weight_t
        block += w.numel() * w.element_size()
    head = model.output.weight
    return block, head.numel() * head.element_size()


def timed_generate(gen: Generator, prompt, new_tokens: int, repeats: int) -> tuple[float, torch.Tensor, dict]:
    """Median decode tokens/s (per sequence) over ``repeats`` runs after a capture run."""
    tokens, stats = gen.generate(prompt, new_tokens)  # compile + capture + warm
    capture_s = stats.capture_s
    rates, prefill = [], []
    for _ in range(repeats):
        tokens, stats = gen.generate(prompt, new_tokens)
        rates.append(stats.decode_tokens_per_s)
        prefill.append(stats.prefill_tokens_per_s)
    return statistics.median(rates), tokens, {"capture_s": capture_s, "runs_tok_s": rates,
                                               "prefill_tok_s": statistics.median(prefill)}


@torch.no_grad()
def teacher_forced_agreement(model_fn, tokens: torch.Tensor, prompt_len: int) -> float:
    """Fraction of decoded tokens that are the argmax of reference logits on the same sequence."""
    logits = model_fn(tokens)  # [B, T, V]
    pred = logits[:, prompt_len - 1 : -1].argmax(-1)
    return (pred == tokens[:, prompt_len:]).float().mean().item()


@torch.no_grad()
def engine_prefill_logits(gen: Generator, tokens: torch.Tensor) -> torch.Tensor:
    return gen.model(tokens, torch.arange(tokens.shape[1], device=tokens.device))


@torch.no_grad()
def decode_step_logits(gen: Generator, prompt: torch.Tensor) -> torch.Tensor:
    """Logits of the first decode step after an eager prefill (no graph): [B, V]."""
    model = gen.model
    T = prompt.shape[1]
    first = model(prompt, torch.arange(T, device=prompt.device), last_only=True)[:, -1].argmax(-1)
    return model(first[:, None], torch.tensor([T], device=prompt.device))[:, -1].float()


@torch.no_grad()
def hf_generate_rate(hf, prompt: torch.Tensor, new_tokens: int, device) -> float:
    """Decode tokens/s of plain HF generate: (n - 1) tokens over t(n) - t(1)."""
    kwargs = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))

    def run(n):
        sync(device)
        t = time.perf_counter()
        out = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)
        sync(device)
        assert out.shape[1] == prompt.shape[1] + n
        return time.perf_counter() - t

    run(8)  # warm-up
    t1 = min(run(1) for _ in range(2))
    tn = run(new_tokens)
    return (new_tokens - 1) / (tn - t1)


def step_logits_graph(gen: Generator, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the first CUDA-graph decode step (position T, after the prefill's token): [B, V]."""
    gen.keep_logits = True
    try:
        tokens, _ = gen.generate(prompt, 2)
        return gen.logits.float().clone(), tokens
    finally:
        gen.keep_logits = False


@torch.no_grad()
def gate_dense_vs_hf(gen, model, prompt, tokens, gates, result, args, device, name="", time_hf=True) -> None:
    """Dense engine (graph decode step, bf16) vs Hugging Face in fp32 on the same weights, with
    Hugging Face's own bf16 error as the scale; then (time_hf) HF generate's speed, the baseline."""
    ours, seq = step_logits_graph(gen, prompt)  # seq: prompt + 2 new tokens
    seq = seq[:, : prompt.shape[1] + 1]  # the decode step saw prompt + first token
    hf = hf_model_from_engine(model)
    ref_bf16 = hf(seq).logits[:, -1].float()
    agree = teacher_forced_agreement(lambda x: hf(x).logits, tokens, prompt.shape[1])
    result["dense_tokens_vs_hf_argmax" + name] = agree
    if time_hf:
        result["hf_generate_tok_s"] = hf_generate_rate(hf, prompt, args.new_tokens, device)
        log(f"HF generate B=1: {result['hf_generate_tok_s']:.1f} tok/s")
    hf = hf.float()  # new fp32 parameters; the engine's bf16 weights are untouched
    ref32 = hf(seq).logits[:, -1].float()
    del hf
    gc.collect()
    err_hf = rel_err(ref_bf16, ref32)
    gates["dense_graph_step_vs_hf_fp32" + name] = {"rel_err": rel_err(ours, ref32), "hf_bf16_rel_err": err_hf,
                                                   "limit": 1.5 * err_hf + 1e-3}
    result["bf16_error_scale"] = err_hf


@torch.no_grad()
def gate_sparse(gen, model, prompt, calib_prompt, gates, device, suffix: str = "") -> None:
    """The sparse kernels inside the engine vs the pure-PyTorch reference with the same thresholds:
    every linear on real inputs (no error propagation), then a whole graph decode step."""
    from actsparse.kernels.sparse_gemv import sparse_gemv, sparse_gemv_reference

    inputs = gen._record_inputs(calib_prompt)
    worst, by_kind = 0.0, {}
    for name, lin, _ in model.block_linears():
        x = inputs[name][0, -2:].contiguous()  # [2, K]: real inputs of two positions
        for rows in (x[:1], x):
            err = rel_err(sparse_gemv(rows, lin.weight_t, lin.thresholds),
                          sparse_gemv_reference(rows, lin.weight_t, lin.thresholds))
            key = f"{name.rsplit('.', 1)[-1]}-B{rows.shape[0]}"
            by_kind[key] = max(by_kind.get(key, 0.0), err)
            worst = max(worst, err)
    gates["sparse_gemv_every_linear_vs_reference" + suffix] = {"rel_err": worst, "limit": 1e-2,
                                                                "worst_by_linear": by_kind}
    # Inside the real decode step (compiled glue): every sparse linear's output against the
    # reference on the very input it received. Whole-step logits are only reported: Inductor's
    # fused glue rounds bf16 differently from eager glue, and thresholds turn those 1-ulp
    # differences into kept/dropped flips that grow layer by layer, so two correct runs differ.
    linears = [lin for _, lin, _ in model.block_linears()]
    for lin in linears:
        lin.record_io = []
    try:
        check_gen = Generator(model, batch_size=prompt.shape[0], max_seq_len=gen.max_seq_len,
                              compile=gen.compile, cuda_graph=False, gemv=gen.gemv, keep_logits=True)
        check_gen.generate(prompt, 2)
        ours = check_gen.logits.float().clone()
        worst = max(rel_err(y, sparse_gemv_reference(x, lin.weight_t, lin.thresholds))
                    for lin in linears for x, y in lin.record_io)
        n_calls = sum(len(lin.record_io) for lin in linears)
    finally:
        for lin in linears:
            lin.record_io = None
    del check_gen
    backend = model.backend()
    model.set_backend_("torch")
    try:
        ref_eager_glue = decode_step_logits(gen, prompt)
    finally:
        model.set_backend_(backend)
    gates["sparse_linears_in_compiled_decode_vs_reference" + suffix] = {
        "rel_err": worst, "limit": 1e-2, "calls": n_calls,
        "info_step_logits_vs_eager_glue": rel_err(ours, ref_eager_glue)}


@torch.no_grad()
def profile_linears(model, inputs: dict[str, torch.Tensor], thresholds_by_s: dict, device) -> dict:
    """Time layer 0's linears alone (dense cuBLAS vs sparse_gemv at each s) and the lm_head:
    separates GEMV efficiency from the glue between the linears. GPU time per call: a CUDA graph
    of back-to-back calls, each on its own copy of the weight (the copies total >= 4x L2), as
    bench_sparse_gemv times them. (Eager do_bench timed the Python launch path instead: 70-280 us
    per sparse call in the engine JSONs up to a9c6e2e.)"""
    if torch.device(device).type != "cuda":
        return {}
    import torch.nn.functional as F
    from actsparse.kernels.sparse_gemv import sparse_gemv
    from benchmarks.common import copy_count, graph_time_us  # noqa: PLC0415

    def per_call_us(fn, weights) -> float:
        return graph_time_us([lambda w=w: fn(w) for w in weights])

    out = {}
    for name, lin, hf_names in list(model.block_linears())[:4]:
        x = inputs[name][:1, -1].contiguous()  # [1, K]: a real decode-time input
        nbytes = lin.weight_t.numel() * lin.weight_t.element_size()
        copies = copy_count(nbytes)
        w_ts = [lin.weight_t] + [lin.weight_t.clone() for _ in range(copies - 1)]
        ws = [w_t.t().contiguous() for w_t in w_ts]  # [N, K] dense layout for cuBLAS
        us = per_call_us(lambda w: F.linear(x, w), ws)
        del ws
        row = {"K": lin.in_features, "N": lin.out_features, "copies": copies, "dense_us": us,
               "dense_TBps": nbytes / (us * 1e-6) / 1e12}
        for s, th in thresholds_by_s.items():
            thr = th[hf_names[0]].to(device)
            kept = (x.abs().float() > thr).float().mean().item()
            us_s = per_call_us(lambda w_t: sparse_gemv(x, w_t, thr), w_ts)
            row[f"sparse_us_s{s}"] = us_s
            row[f"kept_s{s}"] = kept
            row[f"sparse_TBps_eff_s{s}"] = kept * nbytes / (us_s * 1e-6) / 1e12  # bytes it had to read
        out[name.split(".")[-1]] = row
        del w_ts
    head = model.output.weight
    x = torch.randn(1, head.shape[1], device=device, dtype=head.dtype)
    heads = [head] + [head.clone() for _ in range(copy_count(head.numel() * head.element_size()) - 1)]
    us = per_call_us(lambda w: F.linear(x, w), heads)
    out["lm_head"] = {"dense_us": us, "copies": len(heads),
                      "dense_TBps": head.numel() * head.element_size() / (us * 1e-6) / 1e12}
    return out


@torch.no_grad()
def profile_decode_step(gen: Generator, prompt: torch.Tensor, device) -> dict:
    """Kernels of one decode step (compiled glue, eager launches) with torch.profiler: GPU time by
    kernel, to compare with the graph-replayed step time (the rest is launch gaps and idling)."""
    if torch.device(device).type != "cuda":
        return {}
    from torch.profiler import ProfilerActivity, profile

    model, T = gen.model, prompt.shape[1]
    first = model(prompt, torch.arange(T, device=prompt.device), last_only=True)[:, -1].argmax(-1)
    tok, pos = first[:, None], torch.tensor([T], device=prompt.device)
    model(tok, pos, block_fn=gen._block_fn)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(tok, pos, block_fn=gen._block_fn)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        us = getattr(e, "cuda_time_total", 0.0) if us is None else us
        if us > 0:
            rows.append((e.key, int(e.count), float(us)))
    rows.sort(key=lambda r: -r[2])
    total = sum(r[2] for r in rows)

    def kind(name):
        n = name.lower()
        if "sparse_gemv" in n:
            return "sparse_gemv"
        if any(k in n for k in ("gemv", "gemm", "nvjet", "cutlass", "xmma", "splitk")):
            return "cublas"
        return "other"

    by_kind: dict[str, list] = {}
    for name, count, us in rows:
        acc = by_kind.setdefault(kind(name), [0, 0.0])
        acc[0] += count
        acc[1] += us
    return {"kernel_us_total": total, "kernels": sum(r[1] for r in rows),
            "by_kind": {k: {"kernels": v[0], "us": v[1]} for k, v in by_kind.items()},
            "top": [{"name": n[:90], "count": c, "us": u} for n, c, u in rows[:12]]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama3-8b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--calib-tokens", type=int, default=384)
    p.add_argument("--sparsities", default="0,0.25,0.4,0.5,0.6,0.7")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--batch-sparsity", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--time-budget", type=float, default=480.0, help="skip remaining batches after this (s)")
    p.add_argument("--out", default=None, help="also write the JSON here")
    p.add_argument("--attention", default="matmul,fused",
                   help="decode-attention modes to time at B=1: matmul, reductions, fused (the fastest is "
                        "used afterwards)")
    p.add_argument("--act-boundary", default="off,on",
                   help="B=1 Inductor runs without ('off') and with ('on') Transformer.set_act_boundary_, "
                        "for every attention mode")
    p.add_argument("--compare-fused-residual", action="store_true",
                   help="also time sparse B=1 at every sparsity with the other Transformer.set_fused_residual_ "
                        "setting than the default ('auto': on where an o/down projection is sparse)")
    p.add_argument("--compare-fused-prologue", action="store_true",
                   help="also time sparse B=1 at every sparsity with the other Transformer.set_fused_prologue_ "
                        "setting (norms and act(gate) * up inside the sparse kernels, or as separate kernels)")
    p.add_argument("--compare-pdl", "--pdl", dest="pdl", action="store_true",
                   help="also time sparse B=1 at the batch sparsity and the highest one with programmatic "
                        "dependent launch of the sparse GEMVs and the decode attention switched to the other "
                        "setting than the default (sparse_gemv.set_pdl_default; on by default)")
    p.add_argument("--gemv-configs", default=None,
                   help="sparse_gemv configs chosen by bench_sparse_gemv.py --sweep --save-choice")
    args = p.parse_args(argv)
    device = args.device
    on_cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    sparsities = [float(s) for s in args.sparsities.split(",")]
    attentions = [a for a in args.attention.split(",") if a]
    act_boundaries = [{"off": False, "on": True}[a] for a in args.act_boundary.split(",") if a]
    batches = [int(b) for b in args.batches.split(",")]
    if 1 not in batches:
        batches.insert(0, 1)
    if args.batch_sparsity not in sparsities:
        sparsities.append(args.batch_sparsity)
    T, N = args.prompt_len, args.new_tokens
    max_seq = -(-max(T + N, args.calib_tokens) // 64) * 64
    t_start = time.perf_counter()
    over_budget = lambda: time.perf_counter() - t_start > args.time_budget  # noqa: E731

    result = {
        "benchmark": "bench_engine", "shape": args.shape, "dtype": str(dtype).replace("torch.", ""),
        "prompt_len": T, "new_tokens": N, "gpu": torch.cuda.get_device_name() if on_cuda else "cpu",
        "torch": torch.__version__, "triton": None, "transformers": None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
        "errors": [],
    }
    try:
        import transformers
        import triton

        result["triton"], result["transformers"] = triton.__version__, transformers.__version__
    except ImportError:
        pass
    if args.gemv_configs:
        from actsparse.kernels.sparse_gemv import load_tuned_configs

        result["gemv_configs"] = {k: str(v) for k, v in load_tuned_configs(args.gemv_configs).items()}
        log(f"sparse_gemv configs from {args.gemv_configs}: {result['gemv_configs']}")
    gates: dict[str, dict] = {}

    def record_error(where: str) -> None:
        msg = f"{where}: {traceback.format_exc(limit=6)}"
        result["errors"].append(msg)
        log("ERROR " + msg)

    copy_bw = copy_bandwidth(device)
    result["copy_TBps"] = copy_bw / 1e12
    log(f"copy bandwidth (read+write): {copy_bw / 1e12:.3f} TB/s")

    t = time.perf_counter()
    model = random_model(args.shape, device=device, dtype=dtype, seed=0)
    sync(device)
    block_bytes, head_bytes = weight_bytes(model)
    bound = copy_bw / (block_bytes + head_bytes)
    result.update(block_weight_GB=block_bytes / 1e9, lm_head_GB=head_bytes / 1e9, bound_tok_s=bound,
                  build_s=time.perf_counter() - t)
    log(f"built {args.shape} in {time.perf_counter() - t:.1f}s: {(block_bytes + head_bytes) / 1e9:.2f} GB read "
        f"per token -> bound {bound:.1f} tok/s")

    g = torch.Generator(device="cpu").manual_seed(1234)
    V = model.args.vocab_size
    prompts = {b: torch.randint(0, V, (b, T), generator=g).to(device) for b in batches}
    calib = torch.randint(0, V, (1, args.calib_tokens), generator=g).to(device)

    # ---------------------------------------------------------------- dense engine + HF baseline
    # B=1 twice: dense products by cuBLAS, and by Inductor's tuned Triton GEMV; the faster one is
    # "dense" below. B>1 products are cuBLAS in both (Inductor only rewrites one-row matmuls).
    # Each decode-attention mode (--attention) is timed with Inductor's GEMVs at B=1; the fastest
    # (gemv, attention) pair is "dense" and is used for every later run.
    # --act-boundary off,on: each of those without and with the act(gate) * up / down-projection
    # region boundary (Transformer.set_act_boundary_).
    dense_rate, dense_detail, dense_variants = {}, {}, {}
    gemv_best, attn_best, boundary_best = "inductor", attentions[0], False
    runs = [(1, "cublas", attentions[0], False)] + [(1, "inductor", a, on) for a in attentions for on in act_boundaries]
    for b, gemv, attn, boundary in runs + [(b, None, None, None) for b in batches if b != 1]:
        if gemv is None:
            gemv, attn, boundary = gemv_best, attn_best, boundary_best
        if b != 1 and over_budget():
            log(f"time budget spent: dense B={b} skipped")
            continue
        model.set_decode_attention_(attn)
        model.set_act_boundary_(boundary)
        gen = Generator(model, batch_size=b, max_seq_len=max_seq, gemv=gemv)
        if b == 1 and gemv == "cublas":
            thresholds_by_s = gen.calibrate(calib, sparsities)
        try:
            rate, tokens, detail = timed_generate(gen, prompts[b], N, args.repeats if b == 1 else 2)
        except Exception:  # one failed configuration must not lose the others
            record_error(f"dense B={b} gemv={gemv}")
            del gen
            continue
        log(f"dense  B={b} gemv={gemv} attention={attn} act_boundary={boundary}: {rate:7.1f} tok/s per sequence "
            f"({detail})")
        if b == 1:
            name = (gemv if attn == "reductions" else f"{gemv}+{attn}") + ("+act_boundary" if boundary else "")
            dense_variants[name] = {"tok_s": rate, "pct_of_bound": 100 * rate / bound, **detail}
            try:
                dense_variants[name]["step_profile"] = profile_decode_step(gen, prompts[b], device)
            except Exception:
                record_error(f"dense profile {name}")
            if rate >= dense_rate.get(1, 0.0):
                dense_rate[1], dense_detail[1] = rate, detail
                gemv_best, attn_best, boundary_best = gemv, attn, boundary
        else:
            dense_rate[b], dense_detail[b] = rate, detail
        if b == 1 and gemv == "inductor" and not args.skip_hf:
            try:
                suffix = ("" if attn == "reductions" else f"_{attn}_attention") + ("_act_boundary" if boundary else "")
                gate_dense_vs_hf(gen, model, prompts[b], tokens, gates, result, args, device,
                                 name=suffix, time_hf="hf_generate_tok_s" not in result)
                log(f"gates so far: {json.dumps(gates, default=float)}")
            except Exception:
                record_error("HF baseline / dense gate")
        del gen, tokens
        gc.collect()
    result["dense_tok_s"] = dense_rate[1]
    result["dense_gemv"] = gemv_best
    result["dense_attention"] = attn_best
    result["dense_act_boundary"] = boundary_best
    model.set_decode_attention_(attn_best)
    model.set_act_boundary_(boundary_best)
    log(f"dense: gemv={gemv_best}, attention={attn_best}, act_boundary={boundary_best}")
    result["dense_pct_of_bound"] = 100 * dense_rate[1] / bound
    result["dense_variants_b1"] = dense_variants
    result["dense_by_batch"] = {str(b): r for b, r in dense_rate.items()}
    result["dense_detail"] = {str(b): d for b, d in dense_detail.items()}

    # ---------------------------------------------------------------- sparse engine
    sparse_by_s, sparse_by_batch = {}, {}
    try:
        model.sparsify_(thresholds_by_s[args.batch_sparsity], backend="auto")
        for b in batches:
            if b not in dense_rate or (b != 1 and over_budget()):
                log(f"sparse B={b} skipped")
                continue
            gc.collect()
            gen = Generator(model, batch_size=b, max_seq_len=max_seq, gemv=gemv_best)
            if b != 1:
                try:
                    rate, tokens, detail = timed_generate(gen, prompts[b], N, 2)
                    measured = gen.measure_sparsity(tokens, start=T)
                    sparse_by_batch[b] = rate
                    result.setdefault("sparse_batch_detail", {})[str(b)] = {**detail, "achieved": measured}
                    log(f"sparse B={b} s={args.batch_sparsity}: {rate:7.1f} tok/s per sequence "
                        f"({rate / dense_rate[b]:.3f}x dense), rows skipped {measured['rows_skipped']:.3f}")
                except Exception:
                    record_error(f"sparse B={b}")
                if b > min(lin.max_gemv_rows for _, lin, _ in model.block_linears()):
                    # the default rule sent this batch to the masked matmul: time the kernels too
                    gen = None
                    gc.collect()
                    try:
                        model.set_max_gemv_rows_(b)
                        gen = Generator(model, batch_size=b, max_seq_len=max_seq, gemv=gemv_best)
                        rate, tokens, detail = timed_generate(gen, prompts[b], N, 2)
                        result.setdefault("sparse_batch_kernels_detail", {})[str(b)] = {
                            **detail, "tok_s": rate, "speedup_vs_dense": rate / dense_rate[b]}
                        log(f"sparse B={b} s={args.batch_sparsity} through the GEMV kernels: {rate:7.1f} tok/s "
                            f"per sequence ({rate / dense_rate[b]:.3f}x dense)")
                    except Exception:
                        record_error(f"sparse B={b} kernels")
                    finally:
                        model.set_max_gemv_rows_(None)
            else:
                gate_sparse(gen, model, prompts[b], calib[:, :T], gates, device)
                log(f"gates so far: {json.dumps(gates, default=float)}")
                for s in sparsities:
                    model.set_thresholds_(thresholds_by_s[s])
                    rate, tokens, detail = timed_generate(gen, prompts[b], N, args.repeats)
                    measured = gen.measure_sparsity(tokens, start=T)
                    if s == args.batch_sparsity:
                        agree = teacher_forced_agreement(lambda x: engine_prefill_logits(gen, x), tokens, T)
                        # informational: the prefill reference runs eager glue and a masked matmul
                        result["sparse_tokens_vs_eager_prefill_argmax"] = agree
                    sparse_by_s[s] = {"tok_s": rate, "speedup_vs_dense": rate / dense_rate[1], **detail,
                                      "achieved": measured, "bound_tok_s": copy_bw / (
                                          block_bytes * (1 - measured["rows_skipped"]) + head_bytes)}
                    log(f"sparse B=1 s={s}: {rate:7.1f} tok/s ({rate / dense_rate[1]:.3f}x dense), achieved input "
                        f"sparsity {measured['input_sparsity']:.3f}, bytes skipped {measured['bytes_skipped']:.3f}")
                model.set_thresholds_(thresholds_by_s[args.batch_sparsity])
                try:
                    result["sparse_step_profile_s0.5"] = profile_decode_step(gen, prompts[b], device)
                    log(f"kernels per step at s={args.batch_sparsity}: {result['sparse_step_profile_s0.5'].get('kernels')}")
                    levels = {s: thresholds_by_s[s] for s in (0.0, args.batch_sparsity) if s in thresholds_by_s}
                    result["linear_profile_layer0"] = profile_linears(
                        model, gen._record_inputs(calib[:, :T]), levels, device)
                except Exception:
                    record_error("sparse profile")
                sparse_by_batch[b] = sparse_by_s[args.batch_sparsity]["tok_s"]
                gen = None  # each variant below compiles its own Generator

                def time_variant(name, label, levels, apply, restore):
                    """Sparse B=1 at `levels` (same thresholds) with an option switched by apply()
                    (undone by restore()): a fresh Generator, its gates, the rates and the step profile
                    (kernels per step), under result["sparse_<name>_..."]."""
                    gc.collect()
                    apply()
                    variant_gen = None
                    try:
                        variant_gen = Generator(model, batch_size=1, max_seq_len=max_seq, gemv=gemv_best)
                        model.set_thresholds_(thresholds_by_s[args.batch_sparsity])
                        gate_sparse(variant_gen, model, prompts[b], calib[:, :T], gates, device, suffix="_" + name)
                        for s in levels:
                            model.set_thresholds_(thresholds_by_s[s])
                            rate, tokens, detail = timed_generate(variant_gen, prompts[b], N, args.repeats)
                            result.setdefault(f"sparse_{name}_by_s", {})[str(s)] = {
                                "tok_s": rate, "speedup_vs_dense": rate / dense_rate[1], **detail}
                            log(f"sparse B=1 s={s} {label}: {rate:7.1f} tok/s ({rate / dense_rate[1]:.3f}x dense)")
                        model.set_thresholds_(thresholds_by_s[args.batch_sparsity])
                        prof = profile_decode_step(variant_gen, prompts[b], device)
                        result[f"sparse_{name}_step_profile_s0.5"] = prof
                        log(f"kernels per step {label} at s={args.batch_sparsity}: {prof.get('kernels')}")
                    except Exception:
                        record_error(f"sparse with {name}")
                    finally:
                        restore()
                        model.set_thresholds_(thresholds_by_s[args.batch_sparsity])
                        del variant_gen

                # every sparsity again with the other setting of a block option (switched to the
                # other state than the default; "auto" restores it)
                options = []
                if args.compare_fused_residual:
                    options.append(("fused_residual", model.set_fused_residual_, model.layers[0].uses_fused_residual))
                if args.compare_fused_prologue:
                    options.append(("fused_prologue", model.set_fused_prologue_, model.layers[0].uses_fused_prologue))
                for option, setter, is_on in options:
                    name = "un" + option if is_on() else option
                    time_variant(name, name, sparsities, lambda setter=setter, is_on=is_on: setter(not is_on()),
                                 lambda setter=setter: setter("auto"))
                # PDL switched to the other setting than the default, at the batch sparsity and the
                # highest one. With PDL on, Inductor's copies around the traced attention once made 430
                # kernels per step instead of 174 (docs/RESULTS.md), hence the step profile.
                if args.pdl:
                    from actsparse.kernels.sparse_gemv import pdl_default, set_pdl_default

                    pdl0 = pdl_default()
                    time_variant("nopdl" if pdl0 else "pdl", "without PDL" if pdl0 else "with PDL",
                                 tuple(dict.fromkeys((args.batch_sparsity, max(sparsities)))),
                                 lambda: set_pdl_default(not pdl0), lambda: set_pdl_default(pdl0))
            del gen
    except Exception:
        record_error("sparse engine")
    result["sparse_by_s"] = {str(s): v for s, v in sparse_by_s.items()}
    result["speedup_by_batch_at_s"] = {"s": args.batch_sparsity,
                                       **{str(b): r / dense_rate[b] for b, r in sparse_by_batch.items()}}

    # ---------------------------------------------------------------- gates and goals
    for gate in gates.values():
        gate["passed"] = bool(gate["rel_err"] <= gate["limit"])
    result["gates"] = gates
    result["gates_passed"] = bool(gates) and all(gt["passed"] for gt in gates.values()) and not result["errors"]
    s0, s5 = sparse_by_s.get(0.0), sparse_by_s.get(0.5)
    result["goals"] = {
        "dense_pct_of_bound>=85": result["dense_pct_of_bound"],
        "sparse_s0.5_speedup>=1.75": s5["speedup_vs_dense"] if s5 else None,
        "sparse_s0_slowdown_pct<=3": 100 * (1 - s0["speedup_vs_dense"]) if s0 else None,
    }
    result["total_s"] = time.perf_counter() - t_start
    result["pdl_default"] = _pdl_default()

    log("")
    log(f"{'config':<24}{'tok/s':>10}{'vs dense':>10}{'% bound':>10}")
    log(f"{'HF generate':<24}{result.get('hf_generate_tok_s') or float('nan'):>10.1f}")
    for gemv, v in dense_variants.items():
        log(f"{f'dense engine ({gemv})':<24}{v['tok_s']:>10.1f}{v['tok_s'] / dense_rate[1]:>10.3f}{v['pct_of_bound']:>10.1f}")
    for s, v in sparse_by_s.items():
        log(f"{f'sparse s={s}':<24}{v['tok_s']:>10.1f}{v['speedup_vs_dense']:>10.3f}"
            f"{100 * v['tok_s'] / v['bound_tok_s']:>10.1f}")
    log(f"speedup by batch at s={args.batch_sparsity}: {result['speedup_by_batch_at_s']}")
    log(f"gates passed: {result['gates_passed']}  goals: {result['goals']}  total {result['total_s']:.0f}s")
    emit_json(result, args.out)
    return result


def emit_json(result: dict, out: str | None) -> None:
    """The record as one JSON line on stdout (last), and in ``out`` when given."""
    doc = json.dumps(result, default=float)
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as f:
            f.write(doc + "\n")
    print(doc)


if __name__ == "__main__":
    main()
