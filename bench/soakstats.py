"""The soak benchmark's arithmetic, with no I/O: generation and fault events cut into windows, pooled
per-token latency percentiles, per-client totals, and the resource samples of long-lived processes laid
out as a table (``bench/soak.py`` feeds it; ``tests/test_soakstats.py`` checks it).

A generation event is a dict with ``client`` (its kind), ``t1`` (epoch seconds when it ended), ``ok``
(False: an error reached the client: lost), ``checked`` (its tokens were compared with local
transformers'), ``wrong`` (they differed), ``tokens`` (new tokens) and ``lat`` (seconds per token, one
entry per token: a chunk of n tokens that arrived together after a gap of g seconds gives n entries of
g / n; the first chunk's gap runs from the request). A fault event has ``t`` and ``action``.
"""

from __future__ import annotations

import collections
import math

__all__ = ["percentile", "summarize", "error_counts", "window_rows", "client_rows", "resource_rows", "steps_rows",
           "timeline", "peer_spans", "fault_summary", "WINDOW_HEADERS", "CLIENT_HEADERS"]

WINDOW_HEADERS = ["window (min)", "generations", "lost", "wrong / checked", "tokens/s", "p50 ms/token",
                  "p99 ms/token", "faults"]
CLIENT_HEADERS = ["client", "generations", "lost", "wrong / checked", "p50 ms/token", "p99 ms/token",
                  "lost by error type"]


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q``-quantile (0 < q <= 1) of ``values``; None for no values."""
    if not 0 < q <= 1:
        raise ValueError(f"q must be in (0, 1], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summarize(gens: list[dict], seconds: float) -> dict:
    """Totals over ``gens`` that ran during ``seconds`` of wall time: generations that succeeded, lost,
    wrong and checked ones, new tokens per second, and p50 / p99 of the pooled per-token latencies of
    the successful ones (milliseconds)."""
    ok = [g for g in gens if g["ok"]]
    lat = [x for g in ok for x in g["lat"]]
    p50, p99 = percentile(lat, 0.5), percentile(lat, 0.99)
    return {"generations": len(ok), "lost": len(gens) - len(ok),
            "wrong": sum(bool(g.get("wrong")) for g in ok), "checked": sum(bool(g.get("checked")) for g in ok),
            "tokens": sum(g["tokens"] for g in ok),
            "tokens_per_s": sum(g["tokens"] for g in ok) / seconds if seconds > 0 else None,
            "p50_ms": None if p50 is None else 1000 * p50, "p99_ms": None if p99 is None else 1000 * p99}


def window_rows(gens: list[dict], faults: list[dict], start: float, window: float, end: float) -> list[dict]:
    """One summary per ``window`` seconds from ``start`` to ``end`` (the last one may be shorter); a
    generation counts in the window where it ended, a fault where it happened; events outside
    [start, end) are left out (the warm-up before ``start``)."""
    if window <= 0:
        raise ValueError(f"window must be positive seconds, got {window}")
    count = max(1, math.ceil((end - start) / window))
    bins: list[list[dict]] = [[] for _ in range(count)]
    fault_bins: list[collections.Counter] = [collections.Counter() for _ in range(count)]
    for g in gens:
        if start <= g["t1"] < end:
            bins[min(count - 1, int((g["t1"] - start) // window))].append(g)
    for f in faults:
        if start <= f["t"] < end:
            fault_bins[min(count - 1, int((f["t"] - start) // window))][f["action"]] += 1
    rows = []
    for i, (members, faulted) in enumerate(zip(bins, fault_bins)):
        lo, hi = i * window, min((i + 1) * window, end - start)
        rows.append({"window": i, "from_s": lo, "to_s": hi, **summarize(members, hi - lo),
                     "faults": dict(sorted(faulted.items()))})
    return rows


def client_rows(gens: list[dict], seconds: float) -> list[dict]:
    """Per client kind (in order of first appearance): its totals, and its first error's text."""
    by_client: dict[str, list[dict]] = {}
    for g in gens:
        by_client.setdefault(g["client"], []).append(g)
    return [{"client": name, **summarize(members, seconds), "errors": error_counts(members),
             "first_error": next((g.get("error") for g in members if not g["ok"]), None)}
            for name, members in by_client.items()]


def error_counts(gens: list[dict]) -> dict[str, int]:
    """Lost generations by the error's type (the text before the first colon), most frequent first."""
    counts = collections.Counter((g.get("error") or "?").split(":", 1)[0] for g in gens if not g["ok"])
    return dict(counts.most_common())


def resource_rows(samples: list[dict]) -> tuple[list[str], list[list]]:
    """Headers and rows of a table with one row per process name and one column per sample time: each
    cell "RSS MiB / open fds / threads" (summed over the process and its children), then the RSS growth
    from the first to the last sample. A sample is a dict with ``t`` (seconds since the start),
    ``name``, ``pid``, ``rss`` (bytes), ``fds`` and ``threads``; a process whose pid changed between two
    samples (restarted) is marked with * in the later cell."""
    def growth(first: dict, last: dict) -> str:
        return f"{(last['rss'] - first['rss']) / 2**20:+.0f}"

    return timeline(samples, lambda s: f"{s['rss'] / 2**20:.0f} / {s['fds']} / {s['threads']}", "RSS growth MiB",
                    growth)


def steps_rows(samples: list[dict]) -> tuple[list[str], list[list]]:
    """Like ``resource_rows`` for the samples that carry ``requests`` (steps a peer answered, from its
    metrics): the count at each sample time, then the total served between the first and last sample."""
    def served(first: dict, last: dict) -> str:
        return str(last["requests"] - first["requests"]) if last["pid"] == first["pid"] else "—"

    return timeline([s for s in samples if s.get("requests") is not None], lambda s: str(s["requests"]),
                    "served", served)


def timeline(samples: list[dict], cell, last_header: str, last_cell) -> tuple[list[str], list[list]]:
    """One row per process name, one column per sample time (``cell(sample)``, "—" where none, * where
    the pid changed since the previous sample), then ``last_cell(first, last)``."""
    times = sorted({s["t"] for s in samples})
    by_name: dict[str, dict[float, dict]] = {}
    for s in samples:
        by_name.setdefault(s["name"], {})[s["t"]] = s
    headers = ["process", *[f"{t / 60:.1f} min" for t in times], last_header]
    rows = []
    for name, seen in by_name.items():
        present = [seen[t] for t in times if t in seen]
        cells, last_pid = [], None
        for t in times:
            s = seen.get(t)
            if s is None:
                cells.append("—")
                continue
            cells.append(cell(s) + ("*" if last_pid is not None and s["pid"] != last_pid else ""))
            last_pid = s["pid"]
        rows.append([name, *cells, last_cell(present[0], present[-1])])
    return headers, rows


def peer_spans(layers: int, peers: int, stable: int, width: int) -> list[tuple[int, int]]:
    """Blocks of each soak peer: the first ``stable`` split [0, layers) evenly between them (never faulted,
    they keep every block served); the others serve ``width`` blocks each, in turn at the first blocks,
    at the last ones, and at a start walking between (the edges, which fewer spans cross, get as many
    servers as the middle)."""
    if not 1 <= stable <= min(peers, layers):
        raise ValueError(f"stable peers must be between 1 and min(peers, layers) = {min(peers, layers)}, "
                         f"got {stable}")
    if not 1 <= width <= layers:
        raise ValueError(f"the churned peers' width must be between 1 and {layers} blocks, got {width}")
    bounds = [round(i * layers / stable) for i in range(stable + 1)]
    spans = list(zip(bounds, bounds[1:]))
    last = layers - width
    starts = [(0, last, 1 + (j // 3) % (last - 1) if last > 1 else 0)[j % 3] for j in range(peers - stable)]
    return spans + [(s, s + width) for s in starts]


def fault_summary(faults: dict[str, int]) -> str:
    """``{"kill": 2, "stop": 1}`` -> ``"kill 2, stop 1"`` (empty: "—"); error counts read the same."""
    return ", ".join(f"{k} {v}" for k, v in faults.items()) or "—"
