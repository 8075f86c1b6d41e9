"""The soak benchmark's arithmetic (bench/soakstats.py): windows, percentiles, per-client totals, the
resource table and the peers' spans. The soak itself runs for hours and is never run by the tests."""

from __future__ import annotations

import pytest

from bench import soakstats


def _gen(t1, ok=True, client="greedy", wrong=False, lat=(0.01, 0.02), error=None):
    return {"client": client, "t1": t1, "ok": ok, "checked": ok, "wrong": wrong, "tokens": len(lat) if ok else 0,
            "lat": list(lat) if ok else [], "error": error}


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))  # 1..100
    assert soakstats.percentile(values, 0.5) == 50 and soakstats.percentile(values, 0.99) == 99
    assert soakstats.percentile([7.0], 0.99) == 7.0 and soakstats.percentile([], 0.5) is None
    assert soakstats.percentile([3, 1, 2], 1.0) == 3
    with pytest.raises(ValueError, match="q must be"):
        soakstats.percentile([1], 0)


def test_windows_count_where_a_generation_ended_and_leave_out_the_warm_up():
    start = 1000.0
    gens = [_gen(990.0),  # warm-up: before the start
            _gen(1001.0, lat=(0.010, 0.030)), _gen(1059.9, wrong=True, lat=(0.020,)),
            _gen(1060.0, ok=False, error="MissingBlocksError: blocks [4, 8)"),
            _gen(1130.0, lat=(0.5,)),
            _gen(1150.0)]  # after the end
    faults = [{"t": 1010.0, "action": "kill"}, {"t": 1020.0, "action": "kill"}, {"t": 1070.0, "action": "stop"},
              {"t": 995.0, "action": "kill"}]
    rows = soakstats.window_rows(gens, faults, start, 60.0, 1140.0)
    assert [(r["from_s"], r["to_s"]) for r in rows] == [(0, 60), (60, 120), (120, 140)]  # the last one is short
    first, second, last = rows
    assert (first["generations"], first["lost"], first["wrong"], first["checked"], first["tokens"]) == (2, 0, 1, 2, 3)
    assert first["p50_ms"] == pytest.approx(20.0) and first["p99_ms"] == pytest.approx(30.0)
    assert first["tokens_per_s"] == pytest.approx(3 / 60) and first["faults"] == {"kill": 2}
    assert (second["generations"], second["lost"], second["p50_ms"], second["faults"]) == (0, 1, None, {"stop": 1})
    assert last["tokens_per_s"] == pytest.approx(1 / 20) and last["p99_ms"] == pytest.approx(500.0)


def test_client_rows_split_by_kind_and_count_errors_by_type():
    gens = [_gen(1, client="strict", ok=False, error="UnverifiableError: no other peer"),
            _gen(2, client="greedy"), _gen(3, client="strict", ok=False, error="UnverifiableError: again"),
            _gen(4, client="strict", ok=False, error="MissingBlocksError: [0, 4)"), _gen(5, client="strict")]
    greedy, strict = sorted(soakstats.client_rows(gens, 10.0), key=lambda r: r["client"])
    assert (greedy["generations"], greedy["lost"], greedy["errors"]) == (1, 0, {})
    assert (strict["generations"], strict["lost"]) == (1, 3)
    assert strict["errors"] == {"UnverifiableError": 2, "MissingBlocksError": 1}
    assert strict["first_error"] == "UnverifiableError: no other peer"
    assert soakstats.fault_summary(strict["errors"]) == "UnverifiableError 2, MissingBlocksError 1"


def test_resource_table_marks_restarts_and_gaps_and_reports_growth():
    mib = 2**20
    samples = [{"t": 0, "name": "peer0", "pid": 10, "rss": 100 * mib, "fds": 50, "threads": 9},
               {"t": 0, "name": "dht", "pid": 20, "rss": 80 * mib, "fds": 30, "threads": 5},
               {"t": 300, "name": "peer0", "pid": 10, "rss": 130 * mib, "fds": 52, "threads": 9},
               {"t": 600, "name": "peer0", "pid": 10, "rss": 160 * mib, "fds": 52, "threads": 9},
               {"t": 600, "name": "dht", "pid": 21, "rss": 70 * mib, "fds": 31, "threads": 5}]
    headers, rows = soakstats.resource_rows(samples)
    assert headers == ["process", "0.0 min", "5.0 min", "10.0 min", "RSS growth MiB"]
    assert rows[0] == ["peer0", "100 / 50 / 9", "130 / 52 / 9", "160 / 52 / 9", "+60"]
    assert rows[1] == ["dht", "80 / 30 / 5", "—", "70 / 31 / 5*", "-10"]
    samples[0]["requests"], samples[2]["requests"], samples[3]["requests"] = 5, 40, 90
    assert soakstats.steps_rows(samples) == (headers[:-1] + ["served"], [["peer0", "5", "40", "90", "85"]])


def test_peer_spans_keep_every_block_served_by_the_stable_peers_and_several_others():
    spans = soakstats.peer_spans(8, 10, 2, 4)
    assert spans[:2] == [(0, 4), (4, 8)]
    assert spans[2:] == [(0, 4), (4, 8), (1, 5), (0, 4), (4, 8), (2, 6), (0, 4), (4, 8)]
    for block in range(8):  # besides its stable peer, at least three churned peers serve each block
        assert sum(a <= block < b for a, b in spans[2:]) >= 3
    assert soakstats.peer_spans(4, 3, 1, 4) == [(0, 4), (0, 4), (0, 4)]
    with pytest.raises(ValueError, match="stable peers"):
        soakstats.peer_spans(8, 10, 0, 4)
    with pytest.raises(ValueError, match="width"):
        soakstats.peer_spans(8, 10, 2, 9)
