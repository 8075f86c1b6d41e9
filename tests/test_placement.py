"""Pure tests of block placement and rebalancing decisions."""

from __future__ import annotations

import random

import pytest

from dht.records import PeerRecord, PeerState
from peer.placement import block_throughputs, choose_start, should_move


def rec(peer, start, end, throughput=10.0, state=PeerState.ONLINE):
    return PeerRecord(peer_id=peer, model_id="m-8L-x", start=start, end=end, state=state, throughput=throughput,
                      dtype="float32", cache_tokens_left=100, version="t")


def test_throughputs_count_joining_peers_as_average():
    th = block_throughputs([rec("a", 0, 4, 10.0), rec("b", 2, 6, 30.0), rec("j", 6, 8, 0.0, PeerState.JOINING),
                            rec("off", 0, 8, 99.0, PeerState.OFFLINE)], 8)
    assert th == [10, 10, 40, 40, 30, 30, 20, 20]


def test_choose_uncovered_window_first():
    th = block_throughputs([rec("a", 0, 4)], 8)
    assert choose_start(th, 4, random.Random(0)) == 4
    th = block_throughputs([rec("a", 0, 3), rec("b", 5, 8)], 8)
    assert choose_start(th, 2, random.Random(0)) == 3


def test_ties_prefer_aligned_windows_then_random():
    starts = {choose_start([0.0] * 8, 2, random.Random(seed)) for seed in range(40)}
    assert starts == {0, 2, 4, 6}
    assert {choose_start([0.0] * 7, 3, random.Random(seed)) for seed in range(40)} == {0, 3, 4}
    assert choose_start([5.0, 5.0, 0.0, 0.0, 0.0, 5.0], 2, random.Random(0)) in (2, 3)


def test_greedy_choices_tile_the_model():
    for seed in range(20):
        rng, records = random.Random(seed), []
        for i in range(3):
            start = choose_start(block_throughputs(records, 6), 2, rng)
            records.append(rec(f"p{i}", start, start + 2))
        assert sorted((r.start, r.end) for r in records) == [(0, 2), (2, 4), (4, 6)]


def test_choose_rejects_impossible_sizes():
    with pytest.raises(ValueError, match="cannot place 9 blocks"):
        choose_start([0.0] * 8, 9, random.Random(0))


def test_move_to_cover_a_gap_but_never_leave_a_block_alone():
    a, b, me = rec("a", 0, 4), rec("b", 0, 4), rec("me", 0, 4)
    assert should_move([a, b, me], me, 8, threshold=0.2, rng=random.Random(0)) == 4
    alone = rec("me", 4, 8)
    assert should_move([a, alone], alone, 8, threshold=0.2, rng=random.Random(0)) is None


def test_move_only_for_a_clear_gain():
    # blocks 0-3: 20 + 10 (me), blocks 4-7: 25 -> moving makes 4-7 stronger but 0-3 weaker: 20 vs 25 min
    others = [rec("a", 0, 4, 20.0), rec("b", 4, 8, 25.0)]
    me = rec("me", 0, 4, 10.0)
    assert should_move(others + [me], me, 8, threshold=0.2, rng=random.Random(0)) is None  # 20 -> 20
    others = [rec("a", 0, 4, 30.0), rec("b", 4, 8, 5.0)]
    assert should_move(others + [me], me, 8, threshold=0.2, rng=random.Random(0)) == 4  # 5 -> 15
