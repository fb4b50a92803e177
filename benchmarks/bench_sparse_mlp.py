"""Benchmark: output-sparse gate/up (ProSparse step 2, CATS) and input-sparse down (step 3).

Run on a GPU (from the repo root):

    PYTHONPATH=. python benchmarks/bench_sparse_mlp.py --json benchmarks/results/sparse_mlp_h100.json

Order: environment -> correctness gate (every kernel config, shape and mode that is timed is
first checked against the pure-PyTorch reference; nothing is timed on a red gate) -> measured
copy ceiling -> tile sweep -> (a) ProSparse settings (LLaMA-2-7B/13B MLPs, bf16, batch 1, 67% and
89% sparsity): step 2 with and without a predictor row mask, step 3, each against dense cuBLAS
in the same run -> (b) Llama-3-8B SwiGLU gate sparsity sweep. The last line of output is one
JSON document (the full results are also written to --json).

Timing: triton.testing.do_bench median, which clears the 50 MB L2 (a 256 MB write) before
every call, so each call reads its weights from HBM. Random weights, random inputs (never zeros).

``--smoke`` runs tiny shapes through the Triton interpreter on the CPU (wall-clock timing, for
checking the script itself; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Environment header, timing and copy ceiling. benchmarks/common.py (helper "kernels-gemv") did not
# exist when this was written; these private helpers stand in for it.
# ----------------------------------------------------------------------------------------------
def git_commit() -> str:
    from benchmarks.common import git_commit as common_git_commit  # noqa: PLC0415

    return common_git_commit()


def env_header() -> dict:
    import triton

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or 'unknown'})"
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "python": platform.python_version(),
    }


def bench_ms(fn, smoke: bool, graph: bool = True) -> float:
    """Median milliseconds of fn() with the L2 cleared before each call (triton do_bench).

    graph=True (default) captures fn in a CUDA graph and times its replays: GPU time without
    Python/launch overhead, as the decode engine runs it (CUDA graph / reduce-overhead).
    graph=False times the eager call, Python dispatch included.
    """
    if smoke:
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    if not graph:
        return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile + warm up outside the capture
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    ms = triton.testing.do_bench(g.replay, warmup=10, rep=60, return_mode="median")
    del g
    return ms


def copy_ceiling_gbps(smoke: bool) -> float:
    """Device-to-device copy bandwidth, bytes read + written (the roofline we compare to)."""
    n = (1 << 16) if smoke else (1 << 29)  # 1 GiB of bf16 each way on the GPU
    device = "cpu" if smoke else "cuda"
    src = torch.randn(n, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), smoke, graph=False)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


# ----------------------------------------------------------------------------------------------
# Problem construction
# ----------------------------------------------------------------------------------------------
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    denom = ref.norm().item()
    diff = (out.double() - ref).norm().item()
    return diff / denom if denom > 0 else diff


def make_mlp(d_model: int, d_ff: int, dtype, device, seed: int) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    w_gate = (torch.randn(d_ff, d_model, generator=g, device=device) * d_model**-0.5).to(dtype)  # [F, D]
    w_up = (torch.randn(d_ff, d_model, generator=g, device=device) * d_model**-0.5).to(dtype)  # [F, D]
    w_down = (torch.randn(d_model, d_ff, generator=g, device=device) * d_ff**-0.5).to(dtype)  # [D, F]
    return {
        "w_gate": w_gate,
        "w_up": w_up,
        "w_gate_up": torch.cat([w_gate, w_up]).contiguous(),  # [2F, D]: dense step 2 in one GEMV
        "w_down": w_down,
        "w_down_t": w_down.T.contiguous(),  # [F, D]: input-sparse layout for sparse_gemv
    }


def threshold_for_sparsity(x: torch.Tensor, w_gate: torch.Tensor, activation: str, sparsity: float) -> float:
    """Scalar threshold on |act(gate)| leaving `sparsity` of the neurons zero (batch 1)."""
    from actsparse.kernels.sparse_mlp import _activation_torch

    a = _activation_torch(x.float() @ w_gate.float().T, activation).abs().flatten()
    vals = a.sort().values
    i = min(int(round(sparsity * vals.numel())), vals.numel() - 1)
    lo = vals[i - 1].item() if i > 0 else 0.0
    return 0.5 * (lo + vals[i].item())  # midway between neighbours: no ties


def dense_step2(x, mlp, activation):
    from actsparse.kernels.sparse_mlp import _activation_torch

    gu = F.linear(x, mlp["w_gate_up"])  # [B, 2F] (cuBLAS)
    g, u = gu.chunk(2, dim=-1)
    return _activation_torch(g, activation) * u


def compiled_kernel_resources() -> list:
    """Registers / spills / shared memory of each compiled variant (best effort across Triton versions)."""
    from actsparse.kernels.sparse_mlp import _sparse_gate_up_kernel

    rows = []
    try:
        for caches in getattr(_sparse_gate_up_kernel, "device_caches", {}).values():
            for key, kernel in caches[0].items():
                md = kernel.metadata
                consts = {k: v for k, v in getattr(kernel, "constants", {}).items() if isinstance(v, (int, bool))} or str(key)[:200]
                rows.append({"variant": str(consts)[:300], "n_regs": getattr(kernel, "n_regs", None),
                             "n_spills": getattr(kernel, "n_spills", None), "shared": getattr(md, "shared", None),
                             "num_warps": getattr(md, "num_warps", None)})
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        rows.append({"error": repr(exc)[:200]})
    return rows


def bench_b2b_us(fns, smoke: bool, repeat: int = 1, prologue=None) -> float:
    """Per-call microseconds of fns run back to back (each fn on its own weight copy), `repeat`
    passes over them, in one CUDA graph; L2 flushed before each replay. Enough copies that a copy's
    rows have left L2 before its next use; enough calls that the replay's own start is amortised."""
    fns = list(fns) * repeat
    calls = len(fns)
    if prologue is not None:  # run once at the start of each replay, counted in the time, not in the calls
        fns = [prologue] + fns
    if smoke:
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        return (time.perf_counter() - t0) * 1e6 / calls
    import triton.testing

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for fn in fns:
            fn()
    ms = triton.testing.do_bench(g.replay, warmup=10, rep=100, return_mode="median")
    del g
    return ms * 1e3 / calls


def interleaved_us(timers: dict, rounds: int) -> tuple[dict, dict]:
    """Each timer once per round, in order, for `rounds` rounds, so drift hits all of them alike.
    -> ({name: [us per round]}, {name: median us})."""
    import statistics

    times = {k: [] for k in timers}
    for _ in range(rounds):
        for k, fn in timers.items():
            times[k].append(fn())
    return times, {k: statistics.median(v) for k, v in times.items()}


TALL_STEP3 = ((128, 64, 4, 4, False), (128, 128, 4, 4, True), (256, 64, 4, 4, True), (128, 128, 8, 2, False))


def prosparse_back_to_back(mlps, shapes, problem, dense_step2, sparse_gate_up, sparse_gemv, smoke, copies=16,
                           failures=None, repeat=2):
    """Back-to-back timing of steps 2 and 3 and of the whole MLP. Step 3 comes in four forms:
    ``sparse_gemv`` (y = h W_down^T), ``sparse_gemv_add_`` (r += h W_down^T into an fp32 residual:
    no workspace, counter or final pass), each with and without programmatic dependent launch.
    The dense baselines do less: cuBLAS without the residual add. Each sparse form is checked
    against the fp64 product on these inputs before it is timed (failures go to ``failures``)."""
    import dataclasses

    from actsparse.kernels import sparse_gemv as sg

    rows = []
    for name in shapes:
        base = mlps[name]
        reps = [base] + [{k: v.clone() for k, v in base.items()} for _ in range(copies - 1)]
        d_ff, d_model = base["w_down_t"].shape
        cfg = sg.pick_config(d_ff, d_model, 1)
        cfg_pdl = dataclasses.replace(cfg, pdl=True)
        cfg_pdl_pf = dataclasses.replace(cfg, pdl=True, prefetch=True)
        # taller tiles (bench_sparse_gemv.py --sweep-tall): (block_k, block_n, warps, programs/SM, tile_sum)
        tall = {f"tall_{c}": c for c in (sg.GemvConfig(bk, bn, num_warps=w, programs_per_sm=p, compact=True,
                                                          prefetch=True, tile_sum=ts, pdl=True)
                                         for bk, bn, w, p, ts in TALL_STEP3)}
        for sparsity in (0.67, 0.89):
            x, thr, row_mask, ref, active = problem(name, "relu", sparsity, True)
            hs = [sparse_gate_up(x, m["w_gate"], m["w_up"], thr, "relu", row_mask) for m in reps]
            rs = [torch.zeros(1, d_model, dtype=torch.float32, device=x.device) for _ in reps]
            exact = (hs[0].double() @ base["w_down_t"].double()).float()
            for label, fn in (
                ("step3", lambda c: sg._sparse_gemv_impl(hs[0], base["w_down_t"], None, config=c).float()),
                ("step3_add", lambda c: sg._sparse_gemv_add_impl(
                    torch.ones_like(rs[0]), hs[0], base["w_down_t"], None, config=c) - 1),
            ):
                for c in (cfg, cfg_pdl, cfg_pdl_pf, *tall.values()):
                    err = ((fn(c) - exact).norm() / exact.norm()).item()
                    if not err < 1e-2 and failures is not None:
                        failures.append(f"b2b {name} s={sparsity} {label} {c}: rel err {err:.2e}")

            def step3(c, add):
                if add:
                    return [lambda m=m, h=h, r=r: sg._sparse_gemv_add_impl(r, h, m["w_down_t"], None, config=c)
                            for m, h, r in zip(reps, hs, rs)]
                return [lambda m=m, h=h: sg._sparse_gemv_impl(h, m["w_down_t"], None, config=c)
                        for m, h in zip(reps, hs)]

            def whole_sparse(c):
                def run(m, r):
                    h = sparse_gate_up(x, m["w_gate"], m["w_up"], thr, "relu", row_mask)
                    sg._sparse_gemv_add_impl(r, h, m["w_down_t"], None, config=c)
                return [lambda m=m, r=r: run(m, r) for m, r in zip(reps, rs)]

            b2b = functools.partial(bench_b2b_us, smoke=smoke, repeat=repeat)
            us = {
                "dense_step2": b2b([lambda m=m: dense_step2(x, m, "relu") for m in reps]),
                "dense_step2_gemv_only": b2b([lambda m=m: F.linear(x, m["w_gate_up"]) for m in reps]),
                "sparse_step2_mask": b2b(
                    [lambda m=m: sparse_gate_up(x, m["w_gate"], m["w_up"], thr, "relu", row_mask) for m in reps]),
                "sparse_step2_nomask": b2b(
                    [lambda m=m: sparse_gate_up(x, m["w_gate"], m["w_up"], thr, "relu") for m in reps]),
                "dense_step3_linear": b2b([lambda m=m, h=h: F.linear(h, m["w_down"]) for m, h in zip(reps, hs)]),
                "dense_step3_matmul": b2b([lambda m=m, h=h: h @ m["w_down_t"] for m, h in zip(reps, hs)]),
                # the previous method (8 calls per graph) for the default form and dense, for continuity
                "dense_step3_linear_8calls": bench_b2b_us(
                    [lambda m=m, h=h: F.linear(h, m["w_down"]) for m, h in zip(reps[:8], hs[:8])], smoke),
                "sparse_step3_add_pdl_pf_8calls": bench_b2b_us(step3(cfg_pdl_pf, True)[:8], smoke),
                "sparse_step3": b2b(step3(cfg, False)),
                "sparse_step3_pdl": b2b(step3(cfg_pdl, False)),
                "sparse_step3_add": b2b(step3(cfg, True)),
                "sparse_step3_add_pdl": b2b(step3(cfg_pdl, True)),
                "sparse_step3_add_pdl_pf": b2b(step3(cfg_pdl_pf, True)),
                "dense_mlp": b2b(
                    [lambda m=m: F.linear(dense_step2(x, m, "relu"), m["w_down"]) for m in reps]),
                "sparse_mlp_add": b2b(whole_sparse(cfg)),
                "sparse_mlp_add_pdl": b2b(whole_sparse(cfg_pdl)),
                **{f"sparse_step3_add_pdl_{k}": b2b(step3(c, True)) for k, c in tall.items()},
            }
            # dense step 3: the faster of the two cuBLAS layouts
            us["dense_step3"] = min(us["dense_step3_linear"], us["dense_step3_matmul"])
            row = {"shape": name, "sparsity_actual": 1 - int(active.sum()) / active.numel(), "copies": copies,
                   "step3_config": str(cfg), "us": us,
                   "speedup": {"step2_mask": us["dense_step2"] / us["sparse_step2_mask"],
                               "step2_mask_vs_gemv_only": us["dense_step2_gemv_only"] / us["sparse_step2_mask"],
                               "step2_nomask": us["dense_step2"] / us["sparse_step2_nomask"],
                               "step3": us["dense_step3"] / us["sparse_step3"],
                               "step3_pdl": us["dense_step3"] / us["sparse_step3_pdl"],
                               "step3_add": us["dense_step3"] / us["sparse_step3_add"],
                               "step3_add_pdl": us["dense_step3"] / us["sparse_step3_add_pdl"],
                               "step3_add_pdl_pf": us["dense_step3"] / us["sparse_step3_add_pdl_pf"],
                               **{f"step3_add_pdl_{k}": us["dense_step3"] / us[f"sparse_step3_add_pdl_{k}"]
                                  for k in tall},
                               "step3_add_pdl_pf_8calls": us["dense_step3_linear_8calls"]
                               / us["sparse_step3_add_pdl_pf_8calls"],
                               "mlp_add": us["dense_mlp"] / us["sparse_mlp_add"],
                               "mlp_add_pdl": us["dense_mlp"] / us["sparse_mlp_add_pdl"]}}
            rows.append(row)
            print(f"b2b {name} s={row['sparsity_actual']:.3f}: " + " ".join(f"{k}={v:.1f}" for k, v in us.items())
                  + " | " + " ".join(f"{k}={v:.2f}x" for k, v in row["speedup"].items()))
        del reps
    return rows


# step 3 sweep (--step3-sweep): (block_k, block_n, warps, programs/SM, chunk, prefetch, tile_sum)
STEP3_SWEEP = (
    (64, 128, 4, 4, 512, True, False),  # the default
    (64, 128, 4, 2, 512, True, False), (64, 128, 4, 3, 512, True, False), (64, 128, 4, 6, 512, True, False),
    (64, 128, 4, 4, 256, True, False), (64, 128, 4, 4, 1024, True, False), (64, 128, 4, 2, 1024, True, False),
    (64, 128, 4, 4, 512, False, False), (64, 128, 8, 4, 512, True, False), (64, 128, 4, 4, 512, True, True),
    (32, 128, 4, 4, 512, True, False), (32, 128, 4, 6, 512, True, False), (32, 256, 4, 4, 512, True, False),
    (64, 256, 8, 2, 512, True, False), (64, 256, 4, 4, 512, True, True), (64, 64, 4, 4, 512, True, False),
    (64, 64, 4, 6, 512, True, False),
)


def step3_sweep(mlps, shapes, problem, sparse_gate_up, smoke, failures, copies=16, rounds=3,
                sparsities=(0.89, 0.67)):
    """Step 3 (``sparse_gemv_add_`` with pdl, as in the b2b table) over STEP3_SWEEP, each config
    checked against the fp64 product first. The configs are timed in `rounds` interleaved rounds
    (round r times every config once), so drift hits all of them alike; the figure is the median
    over rounds. The fastest config by that median is then timed once more in a fresh graph, so
    its reported time is not the minimum of noisy draws."""
    from actsparse.kernels import sparse_gemv as sg

    rows = []
    configs = [sg.GemvConfig(bk, bn, num_warps=w, programs_per_sm=p, compact=True, chunk=ch, prefetch=pf,
                             tile_sum=ts, pdl=True) for bk, bn, w, p, ch, pf, ts in STEP3_SWEEP]
    for name in shapes:
        base = mlps[name]
        reps = [base] + [{k: v.clone() for k, v in base.items()} for _ in range(copies - 1)]
        d_ff, d_model = base["w_down_t"].shape
        for sparsity in sparsities:
            x, thr, row_mask, ref, active = problem(name, "relu", sparsity, True)
            hs = [sparse_gate_up(x, m["w_gate"], m["w_up"], thr, "relu", row_mask) for m in reps]
            rs = [torch.zeros(1, d_model, dtype=torch.float32, device=x.device) for _ in reps]
            exact = (hs[0].double() @ base["w_down_t"].double()).float()
            ok = []
            for c in configs:
                out = sg._sparse_gemv_add_impl(torch.ones_like(rs[0]), hs[0], base["w_down_t"], None, config=c) - 1
                err = ((out - exact).norm() / exact.norm()).item()
                if err < 1e-2:
                    ok.append(c)
                else:
                    failures.append(f"step3 sweep {name} s={sparsity} {c}: rel err {err:.2e}")

            def calls(c):
                return [lambda m=m, h=h, r=r: sg._sparse_gemv_add_impl(r, h, m["w_down_t"], None, config=c)
                        for m, h, r in zip(reps, hs, rs)]

            dense = [lambda m=m, h=h: h @ m["w_down_t"] for m, h in zip(reps, hs)]
            times, med = interleaved_us({"dense": lambda: bench_b2b_us(dense, smoke, repeat=2),
                                         **{str(c): lambda c=c: bench_b2b_us(calls(c), smoke, repeat=2)
                                            for c in ok}}, rounds)
            dense_t, dense_us = times.pop("dense"), med.pop("dense")
            best = min(ok, key=lambda c: med[str(c)])
            default = str(configs[0])
            retime = bench_b2b_us(calls(best), smoke, repeat=2)
            dense_retime = bench_b2b_us(dense, smoke, repeat=2)
            row = {"shape": name, "sparsity_actual": 1 - int(active.sum()) / active.numel(), "rounds": rounds,
                   "dense_us": dense_t, "us": times, "median_us": med, "default": default, "best": str(best),
                   "speedup_default": dense_us / med[default], "speedup_best": dense_us / med[str(best)],
                   "best_retimed_us": retime, "dense_retimed_us": dense_retime,
                   "speedup_best_retimed": dense_retime / retime}
            rows.append(row)
            print(f"step3 sweep {name} s={row['sparsity_actual']:.3f}: dense {dense_us:.2f}us | default "
                  f"{med[default]:.2f}us ({row['speedup_default']:.2f}x) | best {best}: {med[str(best)]:.2f}us "
                  f"({row['speedup_best']:.2f}x), re-timed {retime:.2f} vs dense {dense_retime:.2f} "
                  f"({row['speedup_best_retimed']:.2f}x)")
            for k in sorted(med, key=med.get):
                print(f"    {med[k]:7.2f}us  {' '.join(f'{t:.2f}' for t in times[k])}  {k}")
        del reps
    return rows


# --kept: step 3 on step 2's kept list; (block_k, block_n, warps, programs/SM, min_rows)
KEPT_SWEEP = ((64, 128, 4, 4, 0), (64, 128, 4, 2, 0), (64, 128, 4, 4, 96),  # 96: the default
              (64, 128, 4, 4, 128), (64, 128, 4, 4, 160), (64, 128, 4, 4, 192),
              (64, 128, 4, 4, 256), (64, 128, 4, 6, 160), (64, 64, 4, 4, 0), (32, 128, 4, 4, 0))


def kept_back_to_back(mlps, shapes, problem, dense_step2, smoke, failures, copies=16, rounds=3,
                      sparsities=(0.89, 0.67)):
    """ProSparse steps 2 and 3 with the kept list (``sparse_gate_up(..., kept=)`` then
    ``sparse_down_kept_``), back to back like ``prosparse_back_to_back``, next to the plain path
    (step 2 without a list, step 3 = ``sparse_gemv_add_`` rescanning h) and dense cuBLAS, in one run.

    - step 2 with the list: 32 calls on 16 lists; the lists' counts are zeroed once at the start of
      each replay (one memset, counted in the per-call time), since no step 3 consumes them here.
    - step 3 alone: the lists are filled once by step 2, and the kernel runs with RESET=False: the
      same work (arrival tickets, the last program's two writes), but the length is written back
      instead of zeroed, so the next call reads the same list; configs in KEPT_SWEEP, `rounds`
      interleaved rounds, median, best re-timed.
    - whole MLP: 32 (step 2 -> step 3) pairs with the real protocol (step 3 zeroes the count).
    Each config is checked against the fp64 product first."""
    import dataclasses

    from actsparse.kernels import sparse_gemv as sg
    from actsparse.kernels import sparse_mlp as sm

    rows = []
    configs = [sm.KeptDownConfig(bk, bn, w, p, pdl=True, min_rows=mr) for bk, bn, w, p, mr in KEPT_SWEEP]
    for name in shapes:
        base = mlps[name]
        reps = [base] + [{k: v.clone() for k, v in base.items()} for _ in range(copies - 1)]
        d_ff, d_model = base["w_down_t"].shape
        step3_plain = dataclasses.replace(sg.pick_config(d_ff, d_model, 1), pdl=True)
        for sparsity in sparsities:
            x, thr, row_mask, ref, active = problem(name, "relu", sparsity, True)
            counts = torch.zeros(copies, 2, dtype=torch.int32, device=x.device)
            lists = [sm.KeptList(torch.zeros(d_ff, dtype=torch.int32, device=x.device),
                                 torch.zeros(1, d_ff, dtype=x.dtype, device=x.device), counts[i]) for i in range(copies)]
            rs = [torch.zeros(1, d_model, dtype=torch.float32, device=x.device) for _ in reps]

            def fill():
                counts.zero_()
                return [sm.sparse_gate_up(x, m["w_gate"], m["w_up"], thr, "relu", row_mask, kept=kl)
                        for m, kl in zip(reps, lists)]

            hs = fill()
            exact = (hs[0].double() @ base["w_down_t"].double()).float()
            n_listed = int(counts[0, 0])
            if n_listed != int((hs[0] != 0).sum()):
                failures.append(f"kept {name} s={sparsity}: {n_listed} listed, {int((hs[0] != 0).sum())} nonzero")
            ok = []
            for c in configs:
                out = torch.zeros_like(rs[0])
                sm._launch_sparse_down_kept(out, lists[0], base["w_down_t"], c, reset=False)
                err = ((out - exact).norm() / exact.norm()).item()
                (ok.append(c) if err < 1e-2 else failures.append(f"kept {name} s={sparsity} {c}: rel err {err:.2e}"))
            out = torch.zeros_like(rs[0])
            sm.sparse_down_kept_(out, lists[0], base["w_down_t"])  # public op: consumes the list
            err = ((out - exact).norm() / exact.norm()).item()
            if not err < 1e-2 or int(lists[0].count.abs().sum()) != 0:
                failures.append(f"kept {name} s={sparsity} sparse_down_kept_: rel err {err:.2e}, "
                                f"count after {lists[0].count.tolist()}")
            hs = fill()

            def step3_kept(c):
                return [lambda m=m, kl=kl, r=r: sm._launch_sparse_down_kept(r, kl, m["w_down_t"], c, reset=False)
                        for m, kl, r in zip(reps, lists, rs)]

            def whole_kept(c):
                def run(m, kl, r):
                    sm.sparse_gate_up(x, m["w_gate"], m["w_up"], thr, "relu", row_mask, kept=kl)
                    sm._launch_sparse_down_kept(r, kl, m["w_down_t"], c, reset=True)
                return [lambda m=m, kl=kl, r=r: run(m, kl, r) for m, kl, r in zip(reps, lists, rs)]

            def whole_plain():
                def run(m, r):
                    h = sm.sparse_gate_up(x, m["w_gate"], m["w_up"], thr, "relu", row_mask)
                    sg._sparse_gemv_add_impl(r, h, m["w_down_t"], None, config=step3_plain)
                return [lambda m=m, r=r: run(m, r) for m, r in zip(reps, rs)]

            b2b = functools.partial(bench_b2b_us, smoke=smoke, repeat=2)
            def step2_kept():
                us = b2b([lambda m=m, kl=kl: sm.sparse_gate_up(x, m["w_gate"], m["w_up"], thr, "relu", row_mask,
                                                                kept=kl) for m, kl in zip(reps, lists)],
                         prologue=counts.zero_)
                fill()  # the timing appended to the lists: refill them for step 3
                return us

            timers = {
                "dense_step2": lambda: b2b([lambda m=m: dense_step2(x, m, "relu") for m in reps]),
                "step2_plain": lambda: b2b(
                    [lambda m=m: sm.sparse_gate_up(x, m["w_gate"], m["w_up"], thr, "relu", row_mask) for m in reps]),
                "step2_kept": step2_kept,
                "dense_step3_linear": lambda: b2b([lambda m=m, h=h: F.linear(h, m["w_down"]) for m, h in zip(reps, hs)]),
                "dense_step3_matmul": lambda: b2b([lambda m=m, h=h: h @ m["w_down_t"] for m, h in zip(reps, hs)]),
                "step3_plain_add_pdl": lambda: b2b(
                    [lambda m=m, h=h, r=r: sg._sparse_gemv_add_impl(r, h, m["w_down_t"], None, config=step3_plain)
                     for m, h, r in zip(reps, hs, rs)]),
                "dense_mlp": lambda: b2b([lambda m=m: F.linear(dense_step2(x, m, "relu"), m["w_down"]) for m in reps]),
                "mlp_plain": lambda: b2b(whole_plain()),
                **{f"step3_kept_{c}": lambda c=c: b2b(step3_kept(c)) for c in ok},
            }
            times, med = interleaved_us(timers, rounds)
            best = min(ok, key=lambda c: med[f"step3_kept_{c}"])
            default = sm.KeptDownConfig(pdl=True)
            counts.zero_()
            mlp_kept = {str(c): b2b(whole_kept(c)) for c in dict.fromkeys([default, best])}
            fill()
            best_retimed = b2b(step3_kept(best))
            dense3 = min(med["dense_step3_linear"], med["dense_step3_matmul"])
            row = {
                "shape": name, "sparsity_actual": 1 - int(active.sum()) / active.numel(), "listed": n_listed,
                "rounds": rounds, "us": times, "median_us": med, "step3_plain_config": str(step3_plain),
                "step3_kept_default": str(default), "step3_kept_best": str(best),
                "step3_kept_best_retimed_us": best_retimed, "mlp_kept_us": mlp_kept,
                "speedup": {
                    "step2_plain": med["dense_step2"] / med["step2_plain"],
                    "step2_kept": med["dense_step2"] / med["step2_kept"],
                    "step3_plain_add_pdl": dense3 / med["step3_plain_add_pdl"],
                    "step3_kept_default": dense3 / med[f"step3_kept_{default}"],
                    "step3_kept_best": dense3 / med[f"step3_kept_{best}"],
                    "step3_kept_best_retimed": dense3 / best_retimed,
                    "mlp_plain": med["dense_mlp"] / med["mlp_plain"],
                    **{f"mlp_kept_{k}": med["dense_mlp"] / v for k, v in mlp_kept.items()},
                },
            }
            rows.append(row)
            print(f"kept {name} s={row['sparsity_actual']:.3f}: " + " ".join(f"{k}={v:.2f}" for k, v in med.items()
                                                                              if not k.startswith("step3_kept_")))
            for k in sorted((k for k in med if k.startswith("step3_kept_")), key=med.get):
                print(f"    {med[k]:7.2f}us  {' '.join(f'{t:.2f}' for t in times[k])}  {k}")
            print("    mlp kept: " + " ".join(f"{k}={v:.2f}" for k, v in mlp_kept.items())
                  + f" | best re-timed {best_retimed:.2f}")
            print("    speedups: " + " ".join(f"{k}={v:.2f}x" for k, v in row["speedup"].items()))
        del reps
    return rows


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
SWEEP_CONFIGS = [  # batch 1 (block_f, block_k, num_warps); compiled per (activation, mask, K)
    (1, 4096, 2), (1, 4096, 4), (1, 4096, 8), (1, 8192, 8), (1, 2048, 2), (1, 2048, 4), (2, 4096, 8), (4, 2048, 4),
]
BATCH_CONFIGS = [(16, 256, 4), (16, 512, 4), (16, 128, 4), (32, 256, 4), (32, 128, 8), (64, 128, 8)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="write the full results here")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, CPU interpreter, no real timing")
    parser.add_argument("--b2b", action="store_true",
                        help="also time (a) as a CUDA graph of back-to-back calls on 16 weight copies, "
                             "two passes (32 calls; the method of the GEMV section), per-call time")
    parser.add_argument("--kept", action="store_true",
                        help="after the correctness gate, only time steps 2 and 3 with the kept list "
                             "(sparse_down_kept_) against the plain path and dense, back to back, and write that")
    parser.add_argument("--step3-sweep", action="store_true",
                        help="after the correctness gate, only sweep step-3 configs (ProSparse shapes, back to "
                             "back, interleaved rounds) and write that")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2

    from actsparse.kernels.sparse_gemv import sparse_gemv, sparse_gemv_reference
    from actsparse.kernels.sparse_mlp import (
        GateUpConfig, _check_inputs, _launch_sparse_gate_up, default_config, sparse_gate_up,
        sparse_gate_up_reference,
    )

    smoke = args.smoke
    device = "cpu" if smoke else "cuda"
    dtype = torch.bfloat16
    torch.manual_seed(0)
    results: dict = {"env": env_header(), "bench": "sparse_mlp"}
    print(json.dumps(results["env"]))

    def run_cfg(x, mlp, thr, activation, row_mask, cfg, up_with_gate=False):
        f = mlp["w_gate"].shape[0]
        h = torch.empty((x.shape[0], f), dtype=x.dtype, device=x.device)
        _launch_sparse_gate_up(x, mlp["w_gate"], mlp["w_up"], thr, activation, row_mask, h, config=cfg,
                               up_with_gate=up_with_gate)
        return h

    # ---------------- correctness gate ----------------
    gate_rows = []
    failures = []

    def check(name, out, ref, tol=1e-2):
        err = rel_err(out, ref)
        nan = bool(torch.isnan(out).any())
        zeros_agree = bool(torch.equal(out == 0, ref == 0))
        ok = (err < tol) and not nan
        gate_rows.append({"case": name, "rel_err": err, "zeros_agree": zeros_agree, "ok": ok})
        if not ok:
            failures.append(name)

    odd = [(3, 1000, 3001), (1, 4095, 1377), (8, 640, 2050)] if not smoke else [(3, 67, 45), (8, 33, 20)]
    for b, k, f in odd:
        mlp = make_mlp(k, f, dtype, device, seed=b * 7 + k)
        for activation in ("silu", "gelu_tanh", "relu"):
            for use_mask in (False, True):
                x = torch.randn(b, k, device=device).to(dtype)
                thr_val = threshold_for_sparsity(x[:1], mlp["w_gate"], activation, 0.6)
                thr = torch.full((f,), thr_val, device=device) * (0.5 + torch.rand(f, device=device))
                row_mask = (torch.rand(f, device=device) < 0.5) if use_mask else None
                _check_inputs(x, mlp["w_gate"], mlp["w_up"], thr, activation, row_mask)
                h = torch.full((b, f), float("nan"), dtype=dtype, device=device)
                _launch_sparse_gate_up(x, mlp["w_gate"], mlp["w_up"], thr, activation, row_mask, h)
                ref = sparse_gate_up_reference(x, mlp["w_gate"], mlp["w_up"], thr, activation, row_mask)
                check(f"gate_up B{b}-K{k}-F{f}-{activation}-{'mask' if use_mask else 'nomask'}", h, ref)
        x = torch.randn(b, k, device=device).to(dtype)
        x = torch.where(torch.rand_like(x.float()) < 0.7, torch.zeros_like(x), x)  # [B, K], 70% zeros
        w_t = (torch.randn(k, f, device=device) * k**-0.5).to(dtype)  # [K, N]
        check(f"gemv B{b}-K{k}-N{f}", sparse_gemv(x, w_t, None), sparse_gemv_reference(x, w_t, None))
    if not smoke:
        x = torch.randn(2, 256, device=device).to(dtype)
        mlp = make_mlp(256, 320, dtype, device, seed=5)
        try:
            torch.library.opcheck(
                torch.ops.actsparse.sparse_gate_up.default,
                (x, mlp["w_gate"], mlp["w_up"], torch.full((320,), 0.1, device=device), "silu",
                 torch.rand(320, device=device) < 0.5),
            )
            gate_rows.append({"case": "opcheck sparse_gate_up (all test_utils)", "ok": True})
        except Exception as exc:  # noqa: BLE001 - recorded, fails the gate
            gate_rows.append({"case": "opcheck sparse_gate_up", "ok": False, "error": str(exc)[:300]})
            failures.append("opcheck")

    # ---------------- benchmark problems ----------------
    if smoke:
        prosparse_shapes = {"llama2-7b": (64, 176), "llama2-13b": (80, 224)}
        llama3_shape = (64, 224)
    else:
        prosparse_shapes = {"llama2-7b": (4096, 11008), "llama2-13b": (5120, 13824)}
        llama3_shape = (4096, 14336)
    mlps = {name: make_mlp(d, f, dtype, device, seed=i) for i, (name, (d, f)) in enumerate(prosparse_shapes.items())}
    mlps["llama3-8b"] = make_mlp(*llama3_shape, dtype, device, seed=9)

    def problem(name, activation, sparsity, use_mask):
        """x [1, D], scalar threshold for the sparsity, oracle row mask (= the active neurons)."""
        mlp = mlps[name]
        d, f = mlp["w_down"].shape
        x = torch.randn(1, d, device=device).to(dtype)
        thr_val = threshold_for_sparsity(x, mlp["w_gate"], activation, sparsity)
        thr = torch.full((f,), thr_val, device=device)
        ref = sparse_gate_up_reference(x, mlp["w_gate"], mlp["w_up"], thr, activation)
        active = ref[0] != 0  # [F]
        row_mask = active.clone() if use_mask else None
        return x, thr, row_mask, ref, active

    # every config/mode that will be timed is checked first
    sweep_cases = []  # (shape, activation, sparsity, row mask): the settings of (a) and (b)
    for name in prosparse_shapes:
        sweep_cases.append((name, "relu", 0.89, True))
        sweep_cases.append((name, "relu", 0.89, False))
    sweep_cases.append(("llama3-8b", "silu", 0.5, False))
    configs = [GateUpConfig(*c) for c in (SWEEP_CONFIGS[:2] if smoke else SWEEP_CONFIGS)]

    def variants(use_mask):  # (label, config or None = default, up_with_gate)
        out = [("default", None, False)] + [(f"{c.block_f}x{c.block_k}w{c.num_warps}", c, False) for c in configs]
        if use_mask:
            out += [(label + "+ug", cfg, True) for label, cfg, _ in list(out)]
        return out

    problems = {}
    for case in sweep_cases:
        name, activation, sparsity, use_mask = case
        x, thr, row_mask, ref, active = problem(*case)
        problems[case] = (x, thr, row_mask, active)
        for label, cfg, ug in variants(use_mask):
            h = run_cfg(x, mlps[name], thr, activation, row_mask, cfg, ug)
            check(f"sweep {name}-{activation}-s{int(sparsity * 100)}-{'mask' if use_mask else 'nomask'}-{label}", h, ref)
    batch_configs = [GateUpConfig(*c) for c in (BATCH_CONFIGS[:1] if smoke else BATCH_CONFIGS)]
    batch_problems = {}
    for b in (2, 4, 8):
        mlp = mlps["llama3-8b"]
        xb = torch.randn(b, mlp["w_down"].shape[0], device=device).to(dtype)
        thr_val = threshold_for_sparsity(xb[:1], mlp["w_gate"], "silu", 0.5)
        thr = torch.full((mlp["w_gate"].shape[0],), thr_val, device=device)
        ref = sparse_gate_up_reference(xb, mlp["w_gate"], mlp["w_up"], thr, "silu")
        batch_problems[b] = (xb, thr, ref)
        for cfg in [None] + batch_configs:
            check(f"batch B{b} llama3-8b silu {cfg}", run_cfg(xb, mlp, thr, "silu", None, cfg), ref)
    for name in prosparse_shapes:  # step 3 on the real step-2 output
        x, thr, row_mask, active = problems[(name, "relu", 0.89, True)]
        h = sparse_gate_up(x, mlps[name]["w_gate"], mlps[name]["w_up"], thr, "relu", row_mask)
        check(f"step3 {name}", sparse_gemv(h, mlps[name]["w_down_t"], None),
              sparse_gemv_reference(h, mlps[name]["w_down_t"], None))
        check(f"dense-vs-ref step3 {name}", F.linear(h, mlps[name]["w_down"]),
              sparse_gemv_reference(h, mlps[name]["w_down_t"], None))
    results["correctness"] = gate_rows
    print(f"correctness gate: {len(gate_rows) - len(failures)}/{len(gate_rows)} passed;"
          f" max rel err {max(r.get('rel_err', 0.0) for r in gate_rows):.2e}")
    if failures:
        print("GATE FAILED, no timings:", failures)
        results["gate_failed"] = failures
        print(json.dumps({"bench": "sparse_mlp", "env": results["env"], "gate_failed": failures}))
        return 1

    # ---------------- copy ceiling ----------------
    ceiling = copy_ceiling_gbps(smoke)
    results["copy_ceiling_gbps"] = ceiling
    print(f"copy ceiling (read+write): {ceiling:.0f} GB/s")

    def gbps(nbytes, ms):
        return nbytes / (ms * 1e-3) / 1e9

    def only_section(key, rows, bench, summary):
        """--kept / --step3-sweep: write this one section (after its own checks) and stop."""
        results[key] = rows
        if failures:
            print(f"GATE FAILED in {key}:", failures)
            print(json.dumps({"bench": "sparse_mlp", "env": results["env"], "gate_failed": failures}))
            return 1
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(results, indent=1))
        print(json.dumps({"bench": bench, **{k: results["env"][k] for k in ("gpu", "date", "commit")},
                          "rows": [summary(r) for r in rows]}))
        return 0

    copies, rounds = (2, 1) if smoke else (16, 3)
    if args.kept:
        return only_section(
            "kept", kept_back_to_back(mlps, prosparse_shapes, problem, dense_step2, smoke, failures, copies, rounds),
            "sparse_mlp_kept", lambda r: {"shape": r["shape"], "s": round(r["sparsity_actual"], 3),
                                          **{k: round(v, 2) for k, v in r["speedup"].items()}})
    if args.step3_sweep:
        return only_section(
            "step3_sweep", step3_sweep(mlps, prosparse_shapes, problem, sparse_gate_up, smoke, failures, copies, rounds),
            "sparse_mlp_step3_sweep", lambda r: {k: r[k] for k in ("shape", "sparsity_actual", "best", "speedup_default",
                                                                  "speedup_best", "speedup_best_retimed")})

    # ---------------- tile sweep (B=1, CUDA-graph replays) ----------------
    sweep = []
    best = {}  # case -> (label, cfg, up_with_gate)
    for case in sweep_cases:
        name, activation, sparsity, use_mask = case
        x, thr, row_mask, active = problems[case]
        mlp = mlps[name]
        timings = {}
        for label, cfg, ug in variants(use_mask):
            timings[label] = bench_ms(lambda: run_cfg(x, mlp, thr, activation, row_mask, cfg, ug), smoke) * 1e3
        for want_ug in ((False, True) if use_mask else (False,)):
            pick = min((v, lab) for (lab, c, ug), v in zip(variants(use_mask), timings.values()) if ug == want_ug)
            best[case + (want_ug,)] = next(vv for vv in variants(use_mask) if vv[0] == pick[1])
        sweep.append({"case": f"{name}-{activation}-s{int(sparsity * 100)}-{'mask' if use_mask else 'nomask'}",
                      "us": timings, "default_cfg": str(default_config(1, *mlp["w_gate"].shape[::-1])),
                      "best": best[case + (False,)][0],
                      "best_up_with_gate": best[case + (True,)][0] if use_mask else None})
        print(f"sweep {sweep[-1]['case']:30s} " + " ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    results["sweep_us"] = sweep

    # ---------------- (a) ProSparse settings ----------------
    prosparse = []
    for name in prosparse_shapes:
        mlp = mlps[name]
        d, f = mlp["w_down"].shape
        for sparsity in (0.67, 0.89):
            x, thr, row_mask, ref, active = problem(name, "relu", sparsity, True)
            n_active = int(active.sum())
            _, cfg_m, _ = best[(name, "relu", 0.89, True, False)]
            _, cfg_mug, _ = best[(name, "relu", 0.89, True, True)]
            _, cfg_n, _ = best[(name, "relu", 0.89, False, False)]
            h = sparse_gate_up(x, mlp["w_gate"], mlp["w_up"], thr, "relu", row_mask)  # [1, F]
            check(f"prosparse {name} s{sparsity}", h, ref)
            t = {
                "dense_step2": bench_ms(lambda: dense_step2(x, mlp, "relu"), smoke),
                "dense_step2_gemv_only": bench_ms(lambda: F.linear(x, mlp["w_gate_up"]), smoke),
                "sparse_step2_mask": bench_ms(lambda: sparse_gate_up(x, mlp["w_gate"], mlp["w_up"], thr, "relu", row_mask), smoke),
                "sparse_step2_mask_up_with_gate": bench_ms(lambda: sparse_gate_up(x, mlp["w_gate"], mlp["w_up"], thr, "relu", row_mask, up_with_gate=True), smoke),
                "sparse_step2_mask_tuned": bench_ms(lambda: run_cfg(x, mlp, thr, "relu", row_mask, cfg_m), smoke),
                "sparse_step2_mask_up_with_gate_tuned": bench_ms(lambda: run_cfg(x, mlp, thr, "relu", row_mask, cfg_mug, True), smoke),
                "sparse_step2_nomask": bench_ms(lambda: sparse_gate_up(x, mlp["w_gate"], mlp["w_up"], thr, "relu"), smoke),
                "sparse_step2_nomask_tuned": bench_ms(lambda: run_cfg(x, mlp, thr, "relu", None, cfg_n), smoke),
                "dense_step3": bench_ms(lambda: F.linear(h, mlp["w_down"]), smoke),
                "sparse_step3": bench_ms(lambda: sparse_gemv(h, mlp["w_down_t"], None), smoke),
                "dense_mlp": bench_ms(lambda: F.linear(dense_step2(x, mlp, "relu"), mlp["w_down"]), smoke),
                "sparse_mlp_mask": bench_ms(lambda: sparse_gemv(sparse_gate_up(x, mlp["w_gate"], mlp["w_up"], thr, "relu", row_mask), mlp["w_down_t"], None), smoke),
                # eager (Python dispatch included), for reference
                "eager_dense_step2": bench_ms(lambda: dense_step2(x, mlp, "relu"), smoke, graph=False),
                "eager_sparse_step2_mask": bench_ms(lambda: sparse_gate_up(x, mlp["w_gate"], mlp["w_up"], thr, "relu", row_mask), smoke, graph=False),
                "eager_dense_step3": bench_ms(lambda: F.linear(h, mlp["w_down"]), smoke, graph=False),
                "eager_sparse_step3": bench_ms(lambda: sparse_gemv(h, mlp["w_down_t"], None), smoke, graph=False),
            }
            us = {k: v * 1e3 for k, v in t.items()}
            row_bytes = d * 2
            bytes_read = {
                "dense_step2": 2 * f * row_bytes,
                "sparse_step2_mask": 2 * n_active * row_bytes,
                "sparse_step2_nomask": (f + n_active) * row_bytes,
                "dense_step3": f * row_bytes,
                "sparse_step3": n_active * row_bytes,
            }
            row = {
                "shape": name, "d_model": d, "d_ff": f, "sparsity_target": sparsity,
                "sparsity_actual": 1 - n_active / f, "us": us,
                "tuned": {"mask": str(cfg_m), "mask_up_with_gate": str(cfg_mug), "nomask": str(cfg_n)},
                "speedup": {
                    "step2_mask": us["dense_step2"] / us["sparse_step2_mask"],
                    "step2_mask_up_with_gate": us["dense_step2"] / us["sparse_step2_mask_up_with_gate"],
                    "step2_mask_tuned": us["dense_step2"] / us["sparse_step2_mask_tuned"],
                    "step2_mask_up_with_gate_tuned": us["dense_step2"] / us["sparse_step2_mask_up_with_gate_tuned"],
                    "step2_mask_vs_gemv_only": us["dense_step2_gemv_only"] / us["sparse_step2_mask"],
                    "step2_nomask": us["dense_step2"] / us["sparse_step2_nomask"],
                    "step2_nomask_tuned": us["dense_step2"] / us["sparse_step2_nomask_tuned"],
                    "step3": us["dense_step3"] / us["sparse_step3"],
                    "mlp_mask": us["dense_mlp"] / us["sparse_mlp_mask"],
                    "eager_step2_mask": us["eager_dense_step2"] / us["eager_sparse_step2_mask"],
                    "eager_step3": us["eager_dense_step3"] / us["eager_sparse_step3"],
                },
                "byte_bound_speedup": {
                    "step2_mask": bytes_read["dense_step2"] / bytes_read["sparse_step2_mask"],
                    "step2_nomask": bytes_read["dense_step2"] / bytes_read["sparse_step2_nomask"],
                    "step3": bytes_read["dense_step3"] / bytes_read["sparse_step3"],
                },
                "gbps": {
                    "dense_step2_gemv_only": gbps(bytes_read["dense_step2"], t["dense_step2_gemv_only"]),
                    "sparse_step2_mask": gbps(bytes_read["sparse_step2_mask"], t["sparse_step2_mask"]),
                    "sparse_step2_nomask": gbps(bytes_read["sparse_step2_nomask"], t["sparse_step2_nomask"]),
                    "dense_step3": gbps(bytes_read["dense_step3"], t["dense_step3"]),
                    "sparse_step3": gbps(bytes_read["sparse_step3"], t["sparse_step3"]),
                },
            }
            row["goal_4x_met"] = {"step2_mask": row["speedup"]["step2_mask"] >= 4, "step3": row["speedup"]["step3"] >= 4}
            prosparse.append(row)
            sp = row["speedup"]
            print(f"{name} s={row['sparsity_actual']:.3f}: dense2 {us['dense_step2']:.1f}us "
                  f"(gemv {us['dense_step2_gemv_only']:.1f}) | mask {us['sparse_step2_mask']:.1f}us {sp['step2_mask']:.2f}x, "
                  f"+ug {us['sparse_step2_mask_up_with_gate']:.1f}us {sp['step2_mask_up_with_gate']:.2f}x, "
                  f"tuned {sp['step2_mask_tuned']:.2f}x/{sp['step2_mask_up_with_gate_tuned']:.2f}x | "
                  f"nomask {us['sparse_step2_nomask']:.1f}us {sp['step2_nomask']:.2f}x | "
                  f"dense3 {us['dense_step3']:.1f}us sparse3 {us['sparse_step3']:.1f}us {sp['step3']:.2f}x | "
                  f"mlp {sp['mlp_mask']:.2f}x | eager: step2 {sp['eager_step2_mask']:.2f}x step3 {sp['eager_step3']:.2f}x")
    results["prosparse"] = prosparse

    # ---------------- (b) Llama-3-8B SwiGLU (CATS-style, no predictor) ----------------
    llama3 = []
    mlp = mlps["llama3-8b"]
    d, f = mlp["w_down"].shape
    _, cfg_l3, _ = best[("llama3-8b", "silu", 0.5, False, False)]
    for sparsity in (0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9):
        x, thr, _, ref, active = problem("llama3-8b", "silu", sparsity, False)
        check(f"llama3 s{sparsity}", sparse_gate_up(x, mlp["w_gate"], mlp["w_up"], thr, "silu"), ref)
        n_active = int(active.sum())
        t_dense = bench_ms(lambda: dense_step2(x, mlp, "silu"), smoke)
        t_gemv = bench_ms(lambda: F.linear(x, mlp["w_gate_up"]), smoke)
        t_sparse = bench_ms(lambda: sparse_gate_up(x, mlp["w_gate"], mlp["w_up"], thr, "silu"), smoke)
        t_tuned = bench_ms(lambda: run_cfg(x, mlp, thr, "silu", None, cfg_l3), smoke)
        nbytes = (f + n_active) * d * 2
        row = {
            "sparsity_target": sparsity, "sparsity_actual": 1 - n_active / f,
            "us": {"dense_step2": t_dense * 1e3, "dense_gemv_only": t_gemv * 1e3, "sparse": t_sparse * 1e3,
                   "sparse_tuned": t_tuned * 1e3},
            "tuned_cfg": str(cfg_l3),
            "speedup": t_dense / t_sparse, "speedup_tuned": t_dense / t_tuned,
            "speedup_vs_gemv_only": t_gemv / t_sparse,
            "byte_bound_speedup": 2 * f / (f + n_active),
            "gbps": gbps(nbytes, t_sparse), "gbps_tuned": gbps(nbytes, t_tuned),
            "share_of_copy_ceiling": gbps(nbytes, t_sparse) / ceiling,
            "dense_gbps": gbps(2 * f * d * 2, t_gemv),
        }
        llama3.append(row)
        print(f"llama3-8b s={row['sparsity_actual']:.2f}: dense {t_dense * 1e3:.1f}us (gemv {t_gemv * 1e3:.1f}) "
              f"sparse {t_sparse * 1e3:.1f}us tuned {t_tuned * 1e3:.1f}us -> {row['speedup']:.2f}x "
              f"(bound {row['byte_bound_speedup']:.2f}x), {row['gbps']:.0f} GB/s "
              f"= {100 * row['share_of_copy_ceiling']:.0f}% of copy")
    results["llama3_8b_swiglu"] = llama3

    # batch > 1 (not a goal; how far the decode kernel stretches): tl.dot path, tile sweep
    batch_rows = []
    for b, (xb, thr, ref) in batch_problems.items():
        union = float((ref != 0).any(0).float().mean())
        t_dense = bench_ms(lambda: dense_step2(xb, mlp, "silu"), smoke)
        timings = {"default": bench_ms(lambda: sparse_gate_up(xb, mlp["w_gate"], mlp["w_up"], thr, "silu"), smoke) * 1e3}
        for cfg in batch_configs:
            timings[f"{cfg.block_f}x{cfg.block_k}w{cfg.num_warps}"] = bench_ms(
                lambda: run_cfg(xb, mlp, thr, "silu", None, cfg), smoke) * 1e3
        batch_rows.append({"batch": b, "per_row_sparsity": 0.5, "up_rows_read_frac": union,
                           "us_dense": t_dense * 1e3, "us_sparse": timings,
                           "speedup_default": t_dense * 1e3 / timings["default"],
                           "byte_bound_speedup": 2 / (1 + union)})
        print(f"llama3-8b B={b} s=0.5/row (up rows read {union:.2f}): dense {t_dense * 1e3:.1f}us, sparse "
              + " ".join(f"{k}={v:.1f}" for k, v in timings.items()))
    results["llama3_8b_batch"] = batch_rows

    # ---------------- (a') back-to-back calls on weight copies (opt-in) ----------------
    if args.b2b:
        results["prosparse_back_to_back"] = prosparse_back_to_back(
            mlps, prosparse_shapes, problem, dense_step2, sparse_gate_up, sparse_gemv, smoke, failures=failures,
            copies=2 if smoke else 16, repeat=1 if smoke else 2)

    if failures:  # checks made next to the timings (fresh inputs per row)
        print("GATE FAILED after timing, results withheld:", failures)
        print(json.dumps({"bench": "sparse_mlp", "env": results["env"], "gate_failed": failures}))
        return 1
    results["compiled"] = compiled_kernel_resources()
    for row in results["compiled"]:
        print("compiled", row)

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))
    summary = {
        "bench": "sparse_mlp", **{k: results["env"][k] for k in ("gpu", "torch", "triton", "date", "commit")},
        "copy_ceiling_gbps": round(ceiling, 1),
        "prosparse": [{"shape": r["shape"], "s": round(r["sparsity_actual"], 3),
                       "step2_mask_x": round(r["speedup"]["step2_mask"], 2),
                       "step2_mask_tuned_x": round(r["speedup"]["step2_mask_tuned"], 2),
                       "step2_mask_ug_x": round(r["speedup"]["step2_mask_up_with_gate"], 2),
                       "step2_nomask_x": round(r["speedup"]["step2_nomask"], 2),
                       "step3_x": round(r["speedup"]["step3"], 2), "mlp_x": round(r["speedup"]["mlp_mask"], 2)}
                      for r in prosparse],
        "llama3_8b": [{"s": round(r["sparsity_actual"], 2), "x": round(r["speedup"], 2),
                       "gbps": round(r["gbps"], 0)} for r in llama3],
        "batch": [{"B": r["batch"], "x": round(r["speedup_default"], 2)} for r in batch_rows],
        "b2b": [{"shape": r["shape"], "s": round(r["sparsity_actual"], 3),
                 **{k: round(v, 2) for k, v in r["speedup"].items()}}
                for r in results.get("prosparse_back_to_back", [])],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
