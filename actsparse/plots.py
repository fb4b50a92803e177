"""PNG plots: quality against model-wide sparsity, and achieved sparsity per layer."""

from __future__ import annotations

import re

from .io import atomic_output

SITE_ORDER = ("qkv", "o", "gate_up", "down")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_quality(results: dict, path, title: str = "") -> None:
    """Perplexity and KL against achieved sparsity; one line per method (name before '@')."""
    plt = _plt()
    series: dict[str, list] = {}
    for name, m in results["configs"].items():
        method = name.split("@")[0]
        series.setdefault(method, []).append((m["sparsity"], m["ppl"], m["kl"], m["top1_agreement"]))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for method, pts in sorted(series.items()):
        pts.sort()
        xs = [p[0] for p in pts]
        for ax, k in zip(axes, (1, 2, 3)):
            ax.plot(xs, [p[k] for p in pts], marker="o", label=method)
    axes[0].axhline(results["dense"]["ppl"], color="k", ls="--", lw=1, label="dense")
    axes[0].set_yscale("log")  # perplexity explodes at high sparsity
    for ax, label in zip(axes, ("perplexity", "KL(dense || sparse) per token", "top-1 agreement with dense")):
        ax.set_xlabel("achieved model-wide sparsity")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title or "quality against sparsity")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_layer_sparsity(per_site: dict[str, float], path, title: str = "") -> None:
    """Achieved sparsity of each input site against the block index."""
    plt = _plt()
    by_site: dict[str, dict[int, float]] = {}
    for name, frac in per_site.items():
        m = re.search(r"layers\.(\d+)\.(\w+)$", name)
        if m:
            by_site.setdefault(m.group(2), {})[int(m.group(1))] = frac
    fig, ax = plt.subplots(figsize=(9, 4))
    for site in SITE_ORDER:
        if site in by_site:
            layers = sorted(by_site[site])
            ax.plot(layers, [by_site[site][i] for i in layers], marker=".", label=site)
    ax.set_xlabel("decoder block")
    ax.set_ylabel("achieved sparsity of the input")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(title="input of")
    ax.set_title(title or "sparsity per layer")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
