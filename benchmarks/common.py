"""Shared benchmark helpers: environment header, copy ceiling, timers, L2-rotating buffers.

Decode kernels are bandwidth-bound and small (5-100 us), so two things decide whether a timing
means anything: the weights must come from HBM, not the 50 MB L2 (rotate among copies whose
total is several times L2), and launch gaps must not dominate (time CUDA-graph replays of many
calls, which is also how a decode engine runs them).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
from pathlib import Path
from typing import Callable, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """Short commit: $ACTSPARSE_COMMIT (or $GIT_COMMIT), else git, else .git/HEAD read by hand,
    else 'unknown'. Set the variable on a machine whose checkout's git metadata is stale."""
    for var in ("ACTSPARSE_COMMIT", "GIT_COMMIT"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        head = (REPO_ROOT / ".git" / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            ref_file = REPO_ROOT / ".git" / ref
            if ref_file.exists():
                return ref_file.read_text().strip()[:7]
            packed = REPO_ROOT / ".git" / "packed-refs"
            if packed.exists():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0][:7]
        elif head:
            return head[:7]
    except OSError:
        pass
    return "unknown"


def env_header() -> dict:
    """GPU, versions, date and commit: every benchmark's JSON starts from this."""
    import triton

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            sm_count=props.multi_processor_count,
            l2_bytes=getattr(props, "L2_cache_size", None),
            gpu_mem_gib=round(props.total_memory / 2**30, 1),
        )
    else:
        info["gpu"] = None
    from actsparse.kernels.sparse_gemv import pdl_default  # noqa: PLC0415

    info["pdl_default"] = pdl_default()  # launch form of every default-config kernel call
    return info


def l2_bytes(default: int = 50 * 2**20) -> int:
    if torch.cuda.is_available():
        return getattr(torch.cuda.get_device_properties(0), "L2_cache_size", default) or default
    return default


def copy_count(bytes_per_copy: int, min_total_bytes: int | None = None, max_copies: int = 64) -> int:
    """How many copies of a buffer to rotate so their total is >= 4x L2 (at least 2)."""
    min_total = min_total_bytes if min_total_bytes is not None else 4 * l2_bytes()
    return max(2, min(max_copies, math.ceil(min_total / max(1, bytes_per_copy))))


def do_bench_us(fn: Callable[[], object], warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median time of fn in microseconds (triton do_bench: events, L2 flushed between calls)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def graph_time_us(calls: Sequence[Callable[[], object]], replays: int = 10, repeats: int = 7) -> float:
    """Median time per call, in us, of a CUDA graph that runs `calls` back to back.

    Warm-up and capture run on the same side stream, so kernels that cache per-stream state (a
    workspace) allocate it before capture. Each call should touch its own rotating buffers.
    """
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for call in calls:
                call()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / (replays * len(calls)))
    del graph
    return statistics.median(times)


def copy_ceiling_tb_s(nbytes: int = 2 * 2**30) -> dict:
    """Device-to-device copy bandwidth, counting bytes read + bytes written (TB/s)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    us = do_bench_us(lambda: dst.copy_(src), warmup_ms=50, rep_ms=300)
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes_moved": 2 * nbytes, "us": us, "tb_s": 2 * nbytes / (us * 1e-6) / 1e12}


def print_json_last(doc: dict) -> None:
    """The last line of a benchmark's output is one JSON document."""
    print(json.dumps(doc, separators=(",", ":")), flush=True)


def save_json(doc: dict, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")
