"""Pure tests of route planning over small snapshots."""

from __future__ import annotations

import pytest

from client.errors import MissingBlocksError
from client.routing import plan_route, uncovered
from dht.records import PeerRecord, PeerState

MODEL = "m-8L-x"


def rec(peer, start, end, throughput=100.0, state=PeerState.ONLINE, model=MODEL):
    return PeerRecord(peer_id=peer, model_id=model, start=start, end=end, state=state, throughput=throughput,
                      dtype="float32", cache_tokens_left=1000, version="t")


def spans(route):
    return [(h.peer_id, h.start, h.end) for h in route]


def test_single_chain():
    route = plan_route([rec("b", 4, 8), rec("a", 0, 4)], MODEL, 8)
    assert spans(route) == [("a", 0, 4), ("b", 4, 8)]


def test_prefers_lower_latency():
    records = [rec("slow", 0, 8, throughput=1.0), rec("a", 0, 4), rec("b", 4, 8)]
    assert [h.peer_id for h in plan_route(records, MODEL, 8)] == ["a", "b"]
    # measured RTTs count too: a far-away pair loses to one nearby fast peer
    records = [rec("one", 0, 8, throughput=50.0), rec("a", 0, 4), rec("b", 4, 8)]
    assert [h.peer_id for h in plan_route(records, MODEL, 8, rtts={"one": 0.001, "a": 0.5, "b": 0.5})] == ["one"]


def test_ties_are_deterministic():
    records = [rec("z", 0, 8), rec("a", 0, 8)]
    assert [h.peer_id for h in plan_route(records, MODEL, 8)] == ["a"]


def test_gap_is_named():
    with pytest.raises(MissingBlocksError, match=r"\[4, 6\)") as info:
        plan_route([rec("a", 0, 4), rec("b", 6, 8)], MODEL, 8)
    assert info.value.missing == [(4, 6)]


def test_banned_offline_and_other_models_are_skipped():
    records = [rec("a", 0, 8), rec("b", 0, 8, state=PeerState.DRAINING), rec("c", 0, 8, model="other-1L-y"),
               rec("d", 0, 8, state=PeerState.JOINING)]
    with pytest.raises(MissingBlocksError):
        plan_route(records, MODEL, 8, banned={"a"})
    assert [h.peer_id for h in plan_route(records, MODEL, 8)] == ["a"]


def test_overlapping_spans_that_do_not_line_up_report_the_unreachable_part():
    with pytest.raises(MissingBlocksError) as info:
        plan_route([rec("a", 0, 5), rec("b", 3, 8)], MODEL, 8)
    assert info.value.missing == [(5, 8)]


def test_uncovered():
    assert uncovered([rec("a", 1, 3), rec("b", 5, 6)], 0, 8) == [(0, 1), (3, 5), (6, 8)]
    assert uncovered([rec("a", 0, 8)], 0, 8) == []
