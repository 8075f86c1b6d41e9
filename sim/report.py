"""The results table (markdown) and the plots (matplotlib, Agg backend)."""

from __future__ import annotations

import json
import os

import numpy as np

from sim.engine import Result

COLUMNS = (("tokens_per_s", "tokens/s"), ("p50_latency_s", "p50 s/token"), ("p99_latency_s", "p99 s/token"),
           ("uncovered_fraction", "uncovered"), ("moves", "moves"), ("failovers", "failovers"),
           ("sessions_completed", "sessions done"), ("sessions_aborted", "aborted"), ("route_plans", "plans"))


def table(results: list[Result]) -> str:
    lines = ["| policy | " + " | ".join(title for _, title in COLUMNS) + " |",
             "|---|" + "---:|" * len(COLUMNS)]
    for r in results:
        lines.append(f"| {r.name} | " + " | ".join(_fmt(r.metrics[key]) for key, _ in COLUMNS) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def save_json(results: list[Result], path: str) -> None:
    with open(path, "w") as f:
        json.dump([r.__dict__ for r in results], f)


def plot(results: list[Result], path: str, warmup: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (ax_tok, ax_cdf), (ax_min, ax_load) = axes
    for r in results:
        t = np.array(r.series_t) / 60
        keep = np.array(r.series_t) >= warmup
        ax_tok.plot(t[keep], np.array(r.series_tokens_per_s)[keep], label=r.name)
        edges, weights = np.array(r.latency_edges), np.array(r.latency_tokens)
        if weights.sum() > 0:
            ax_cdf.plot(edges[1:], np.cumsum(weights) / weights.sum(), label=r.name)
        samples = np.array(r.samples)
        if len(samples):
            ax_min.plot(samples[:, 0] / 60, samples[:, 1], label=r.name)
            ax_load.plot(samples[:, 0] / 60, samples[:, 4], label=r.name)
    ax_tok.set(title="tokens/s decoded (whole swarm)", xlabel="minutes", ylabel="tokens/s")
    ax_cdf.set(title="per-token latency CDF (token-weighted)", xlabel="seconds per token", xscale="log",
               ylabel="fraction of tokens")
    ax_min.set(title="weakest block: summed throughput of online peers", xlabel="minutes", ylabel="steps/s")
    ax_load.set(title="mean open sessions per online peer", xlabel="minutes", ylabel="sessions")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
