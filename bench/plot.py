"""Draw docs/bench.png from bench/results/{decode,concurrency,memory,speculative}.json (whichever exist;
speculative.json also gives the prefix-reuse panel), and docs/overhead.png from
bench/results/overhead-{110m,220m}.json: where a token's time goes, local against the swarm, and each
peer's software phases.

    .venv/bin/python -m bench.plot [--out docs/bench.png] [--overhead-out docs/overhead.png]

Needs matplotlib (`pip install -e .[bench]`).
"""

from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from bench.harness import RESULTS_DIR  # noqa: E402

MIB = 2**20
DEFAULT_OUT = os.path.join(os.path.dirname(RESULTS_DIR), "..", "docs", "bench.png")


def _load(name: str) -> dict | None:
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def _decode(ax, doc: dict) -> None:
    rows = doc["summary"]
    labels, values, ideals = ["local"], [rows[0]["local_per_token_ms"]], [None]
    for r in rows:
        labels.append(f"{r['network']}\n{'push' if r['push'] else 'relay'} ({r['messages']} msgs)")
        values.append(r["per_token_ms"])
        ideals.append(r["ideal_ms"] * r["per_token_limit"])
    bars = ax.bar(range(len(values)), values, color=["#888"] + ["#3a7" if r["per_token_met"] else "#d54" for r in rows])
    for i, limit in enumerate(ideals):
        if limit is not None:
            ax.hlines(limit, i - 0.4, i + 0.4, colors="k", linestyles="--")
    ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.set_xticks(range(len(values)), labels, fontsize=7)
    ax.set_ylabel("ms per token (median)")
    ax.set_title("decode latency (dashed: target)", fontsize=10)


def _concurrency(ax, doc: dict) -> None:
    rows = doc["summary"]
    clients = [r["clients"] for r in rows]
    tps = [r["tokens_per_s"] for r in rows]
    ax.plot(clients, tps, "o-", label="swarm, aggregate")
    ax.plot(clients, [tps[0] * c / clients[0] for c in clients], ":", color="#888", label="linear")
    if 8 in clients:
        ax.plot([8], [tps[0] * 4], "k_", markersize=20, label="target at 8 (4x)")
    ax.axhline(doc["local_tokens_per_s"], color="#888", linestyle="--", label="local, one stream")
    ax.set_xscale("log", base=2)
    ax.set_xticks(clients, [str(c) for c in clients])
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=7)
    ax.set_title("throughput", fontsize=10)


def _memory(ax, doc: dict) -> None:
    peers = doc["peers"]
    runtime = doc["runtime_rss_bytes"] / MIB
    labels = [f"{p['dtype']}\n[{p['blocks'][0]},{p['blocks'][1]})" for p in peers]
    weights = [p["weights_bytes"] / MIB for p in peers]
    rest = [p["rss_after_bytes"] / MIB - w - runtime for p, w in zip(peers, weights)]
    x = range(len(peers))
    ax.bar(x, weights, label="block weights", color="#3a7")
    ax.bar(x, [runtime] * len(peers), bottom=weights, label="runtime (imports)", color="#888")
    ax.bar(x, rest, bottom=[w + runtime for w in weights], label="rest", color="#d54")
    ax.set_xticks(list(x), labels, fontsize=7)
    ax.set_ylabel("peer RSS, MiB")
    ax.legend(fontsize=7)
    ax.set_title("peer memory", fontsize=10)


def _speculative(ax, doc: dict) -> None:
    modes = doc["modes"]
    names = list(modes)
    tps = [modes[n]["tokens_per_s"] for n in names]
    bars = ax.bar(range(len(names)), tps, color=["#888"] + ["#3a7"] * (len(names) - 1))
    for bar, name in zip(bars, names):
        m = modes[name]
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{m['tokens_per_trip']:.1f} tok/trip",
                ha="center", va="bottom", fontsize=7)
    ax.axhline(2 * tps[0], color="k", linestyle=":", label="target: 2x greedy")
    ax.set_xticks(range(len(names)), [n.replace(" (", "\n(") for n in names], fontsize=7)
    ax.set_ylabel("tokens/s")
    ax.legend(fontsize=7)
    ax.set_title("speculative decoding, 50 ms + jitter links", fontsize=10)


def _ttft(ax, doc: dict) -> None:
    ttft = doc["ttft"]
    wires = list(ttft)
    width = 0.38
    for k, (kind, color) in enumerate([("new system prompt", "#888"), ("known system prompt", "#3a7")]):
        values = [ttft[w]["median_seconds"][kind] for w in wires]
        ax.bar([i + (k - 0.5) * width for i in range(len(wires))], values, width, color=color, label=kind)
    for i, w in enumerate(wires):
        ax.text(i, ttft[w]["median_seconds"]["new system prompt"], f"{ttft[w]['ratio']:.2f}x lower",
                ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(wires)), [f"{w} wire" for w in wires], fontsize=8)
    ax.set_ylabel("time to first token, s (median)")
    ax.legend(fontsize=7)
    ax.set_title("prefix reuse: ~1,000-token system prompt", fontsize=10)


PHASE_COLORS = {"decode": "#4e79a7", "queue": "#a0cbe8", "validate": "#f28e2b", "reuse": "#ffbe7d",
                "compute_wait": "#59a14f", "handback": "#8cd17d", "encode": "#b6992d", "sign": "#f1ce63",
                "reply": "#e15759"}


def _token_split(ax, docs: list[dict]) -> None:
    """Per token: local's time as one bar, the swarm's split into what each part spent."""
    labels, parts = [], []
    for doc in docs:
        s = doc["summary"]
        size = doc["options"]["size"] or "model"
        labels.append(f"{size} local")
        parts.append({"local (blocks + head)": s["local_ms"]})
        compute = sum(p["compute_ms"] for p in doc["peers"])
        software = sum(s["peer_software_p50_ms"])
        split = {"client model (embeddings, head, sampling)": s["client_model_p50_ms"],
                 "peers' compute": compute, "peers' software": software,
                 "client software": s["client_software_p50_ms"], "transport (bare hivemind)": s["transport_ms"]}
        split["rest (contention, unmeasured)"] = max(0.0, s["swarm_ms"] - sum(split.values()))
        labels.append(f"{size} swarm ({s['ratio']:.2f}x)")
        parts.append(split)
    colors = {"local (blocks + head)": "#888", "client model (embeddings, head, sampling)": "#bab0ac",
              "peers' compute": "#3a7", "peers' software": "#f28e2b", "client software": "#e15759",
              "transport (bare hivemind)": "#4e79a7", "rest (contention, unmeasured)": "#ddd"}
    seen = set()
    for i, split in enumerate(parts):
        left = 0.0
        for name, ms in split.items():
            ax.barh(i, ms, left=left, color=colors[name], edgecolor="white", linewidth=0.5,
                    label=None if name in seen else name)
            seen.add(name)
            left += ms
        ax.text(left, i, f" {left:.1f} ms", va="center", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per token (p50 of each part; loopback peers)")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3)
    ax.set_title("where a token's time goes", fontsize=10)


def _peer_phases(ax, docs: list[dict]) -> None:
    """Each peer's software time per step, by phase (p50s)."""
    labels, rows = [], []
    for doc in docs:
        size = doc["options"]["size"] or "model"
        for p in doc["peers"]:
            labels.append(f"{size} [{p['blocks'][0]}, {p['blocks'][1]})")
            rows.append({k: p["phases"][k]["p50_ms"] for k in PHASE_COLORS if k in p["phases"]})
    seen = set()
    for i, row in enumerate(rows):
        left = 0.0
        for name, ms in row.items():
            ax.barh(i, ms, left=left, color=PHASE_COLORS[name], label=None if name in seen else name)
            seen.add(name)
            left += ms
    ax.axvline(1.0, color="k", linestyle="--", linewidth=0.8, label="target 1 ms")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("peer software per step, ms (p50 per phase)")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=5)
    ax.set_title("a peer's software time, by phase", fontsize=10)


def overhead_figure(out: str) -> str | None:
    docs = [doc for name in ("overhead-110m", "overhead-220m") if (doc := _load(name)) is not None]
    if not docs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    _token_split(axes[0], docs)
    _peer_phases(axes[1], docs)
    first = docs[0]
    fig.suptitle(f"random Llamas over 3 loopback peers, {first['machine']['cpus']}-core CPU, "
                 f"{first['date'][:10]} ({first['commit']})", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.normpath(DEFAULT_OUT))
    parser.add_argument("--overhead-out", default=os.path.normpath(os.path.join(os.path.dirname(DEFAULT_OUT),
                                                                                "overhead.png")))
    args = parser.parse_args()
    if (written := overhead_figure(args.overhead_out)) is not None:
        print(f"wrote {written}")
    panels = [(name, draw, doc) for name, draw in [("decode", _decode), ("concurrency", _concurrency),
                                                   ("memory", _memory), ("speculative", _speculative)] if (doc := _load(name)) is not None]
    if (doc := _load("speculative")) is not None and "ttft" in doc:
        panels.append(("speculative", _ttft, doc))
    if not panels:
        raise SystemExit(f"no results in {RESULTS_DIR}: run python -m bench.decode (or concurrency, memory) first")
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    for ax, (_, draw, doc) in zip(axes[0], panels):
        draw(ax, doc)
    first = panels[0][2]
    fig.suptitle(f"SmolLM2-135M-Instruct, 3 peers, {first['machine']['cpus']}-core CPU, no GPU, {first['date'][:10]}",
                 fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
