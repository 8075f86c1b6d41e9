"""Pure tests of route planning over small snapshots."""

from __future__ import annotations

import heapq
import random

import pytest

from client.errors import MissingBlocksError
from client.routing import (EXPLORE, JITTER, believed_speeds, check_format, choose_format, claimed_speed, plan_route,
                            uncovered)
from dht.records import PeerRecord, PeerState
from verify.policy import AuditRates, standing_cost
from verify.reputation import Status

MODEL = "m-8L-x"


def rec(peer, start, end, throughput=100.0, state=PeerState.ONLINE, model=MODEL, dtype="float32", **extra):
    return PeerRecord(peer_id=peer, model_id=model, start=start, end=end, state=state, throughput=throughput,
                      dtype=dtype, cache_tokens_left=1000, version="t", **extra)


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


def test_overlapping_ranges_are_cut_into_sub_ranges():
    assert spans(plan_route([rec("a", 0, 5), rec("b", 3, 8)], MODEL, 8)) in (
        [("a", 0, 3), ("b", 3, 8)], [("a", 0, 5), ("b", 5, 8)])


def test_a_peer_covering_more_than_needed_runs_a_sub_range():
    route = plan_route([rec("big", 0, 8), rec("x", 0, 2)], MODEL, 8, start=2, end=6)
    assert spans(route) == [("big", 2, 6)]
    # failover of the middle of a route: only [3, 5) is re-planned
    route = plan_route([rec("a", 0, 4), rec("b", 4, 8), rec("c", 2, 6)], MODEL, 8, start=3, end=5, banned={"a"})
    assert spans(route) == [("c", 3, 5)]


def test_load_cache_and_relay_make_a_peer_cost_more():
    assert [h.peer_id for h in plan_route([rec("busy", 0, 8, num_sessions=8), rec("idle", 0, 8, throughput=60.0)],
                                          MODEL, 8)] == ["idle"]
    full = rec("full", 0, 8, throughput=1000.0)
    full = PeerRecord(**{**full.__dict__, "cache_tokens_left": 10})
    assert [h.peer_id for h in plan_route([full, rec("roomy", 0, 8)], MODEL, 8, cache_tokens_needed=100)] == ["roomy"]
    assert [h.peer_id for h in plan_route([full, rec("roomy", 0, 8)], MODEL, 8, cache_tokens_needed=5)] == ["full"]
    assert [h.peer_id for h in plan_route([rec("relayed", 0, 8, relayed=True), rec("direct", 0, 8, throughput=50.0)],
                                          MODEL, 8, rtts={"relayed": 0.02, "direct": 0.02})] == ["direct"]


def test_hop_seconds_keep_a_route_from_splitting_for_a_small_gain():
    records = [rec("fast", 0, 2, throughput=10000.0), rec("whole", 0, 8, throughput=100.0)]  # 0.05, 1.25 ms/block
    rtts = {"fast": 0.001, "whole": 0.001}
    assert spans(plan_route(records, MODEL, 8, rtts=rtts)) == [("fast", 0, 2), ("whole", 2, 8)]
    # one hop less (one KV cache reserved less) is worth more than the 1.4 ms the split saves
    assert spans(plan_route(records, MODEL, 8, rtts=rtts, hop_seconds=0.05)) == [("whole", 0, 8)]


def test_jitter_spreads_clients_over_near_equal_routes_but_not_over_clearly_worse_ones():
    records = [rec("a", 0, 8), rec("b", 0, 8, throughput=99.0), rec("slow", 0, 8, throughput=50.0)]
    rtts = {"a": 0.001, "b": 0.001, "slow": 0.001}  # costs: a 11 ms, b 11.1 ms, slow 21 ms

    def pick(rng):
        return plan_route(records, MODEL, 8, rtts=rtts, rng=rng)[0].peer_id

    assert {pick(None) for _ in range(20)} == {"a"}  # no rng: deterministic
    picked = [pick(random.Random(seed)) for seed in range(200)]
    assert 40 < picked.count("b") < 160 and "slow" not in picked
    assert picked == [pick(random.Random(seed)) for seed in range(200)]  # a seeded rng: reproducible


def test_uncovered():
    assert uncovered([rec("a", 1, 3), rec("b", 5, 6)], 0, 8) == [(0, 1), (3, 5), (6, 8)]
    assert uncovered([rec("a", 0, 8)], 0, 8) == []


def test_ban_list_backs_off_exponentially_and_forgives_on_success():
    from client.bans import BanList

    now = [100.0]
    bans = BanList(base=2.0, factor=2.0, cap=10.0, clock=lambda: now[0])
    assert bans.fail("p") == 2.0 and bans.banned() == {"p"}
    now[0] += 2.5
    assert bans.banned() == set()
    assert bans.fail("p") == 4.0
    assert bans.fail("p") == 8.0
    assert bans.fail("p") == 10.0  # capped
    bans.succeed("p")
    assert bans.banned() == set() and bans.failures("p") == 0


def test_formats_filter_and_name_the_others():
    records = [rec("q", 0, 8, quant="nf4", throughput=1000.0), rec("a", 0, 4), rec("b", 4, 8, dtype="bfloat16")]
    assert [h.peer_id for h in plan_route(records, MODEL, 8, formats=["nf4"])] == ["q"]
    assert [(h.peer_id, h.quant) for h in plan_route(records, MODEL, 8, formats=["float32/none", "bfloat16"])] == [
        ("a", "none"), ("b", "none")]
    with pytest.raises(MissingBlocksError, match=r"\[4, 8\).*format float32/none.*other formats serve it: "
                                                 r"bfloat16, float32/nf4"):
        plan_route(records, MODEL, 8, formats=["float32/none"])


def test_choose_format_prefers_full_coverage_then_precision():
    full_nf4 = [rec("q", 0, 8, quant="nf4")]
    assert choose_format(full_nf4 + [rec("a", 0, 4)], MODEL, 8) == "float32/nf4"  # float32 covers half
    assert choose_format(full_nf4 + [rec("a", 0, 4), rec("b", 4, 8)], MODEL, 8) == "float32/none"
    assert choose_format(full_nf4 + [rec("i", 0, 8, quant="int8")], MODEL, 8) == "float32/int8"
    assert choose_format([rec("h", 0, 8, dtype="float16"), rec("b", 0, 8, dtype="bfloat16")], MODEL, 8) == (
        "bfloat16/none")
    assert choose_format(full_nf4 + [rec("i", 0, 8, quant="int8")], MODEL, 8, banned={"i"}) == "float32/nf4"


@pytest.mark.parametrize("good", ["nf4", "int8", "none", "bfloat16", "float16/int8", "float32/none"])
def test_format_patterns(good):
    assert check_format(good) == good


@pytest.mark.parametrize("bad", ["fp4", "nf4/float32", "float32/", "", "float32/nf4/x"])
def test_bad_format_patterns(bad):
    with pytest.raises(ValueError, match="DTYPE, QUANT or DTYPE/QUANT"):
        check_format(bad)


def test_a_claim_attracts_nothing_once_the_client_has_measured_what_peers_deliver():
    records = [rec("liar", 0, 4, throughput=1000.0), rec("a", 0, 4, throughput=10.0), rec("b", 0, 4, throughput=10.0),
               rec("nf4", 0, 4, throughput=10.0, quant="nf4")]
    # nothing measured: claims count, but none for more than 2x the median claim of its format
    speeds = believed_speeds(records, {})
    assert speeds["liar"] == pytest.approx(claimed_speed(records[1]) / 2) and speeds["a"] == claimed_speed(records[1])
    assert spans(plan_route(records, MODEL, 4, speeds=speeds)) == [("liar", 0, 4)]
    # the liar was tried and is slow; unmeasured peers are believed a little faster than the median
    # measured peer of their format, whatever they claim, so they are tried next
    speeds = believed_speeds(records, {"liar": 0.05})
    assert speeds["liar"] == 0.05 and speeds["a"] == speeds["b"] == speeds["nf4"] == pytest.approx(EXPLORE * 0.05)
    assert plan_route(records, MODEL, 4, speeds=speeds)[0].peer_id != "liar"
    # measured: ranked by what they deliver
    speeds = believed_speeds(records, {"liar": 0.05, "a": 0.001, "b": 0.002})
    assert speeds["nf4"] == pytest.approx(EXPLORE * 0.002)  # the median measured peer of any format
    assert spans(plan_route(records, MODEL, 4, speeds=speeds, formats=["float32"])) == [("a", 0, 4)]


def test_standing_makes_suspects_and_new_peers_cost_more_than_trusted_ones():
    rates = AuditRates()
    costs = {s: standing_cost(s, rates) for s in (Status.TRUSTED, Status.ACTIVE, Status.PROBATION, Status.SUSPECT)}
    assert costs[Status.TRUSTED] < costs[Status.ACTIVE] < costs[Status.PROBATION] < costs[Status.SUSPECT]
    assert costs[Status.PROBATION] == pytest.approx(1.25) and costs[Status.SUSPECT] == pytest.approx(3.0)
    # strict re-runs every session, a trusted peer's too: every standing pays 2x, a suspect 3x
    assert [standing_cost(s, rates, strict=True) for s in (Status.TRUSTED, Status.ACTIVE, Status.PROBATION,
                                                           Status.SUSPECT)] == [2.0, 2.0, 2.0, 3.0]
    records = [rec("new", 0, 4), rec("old", 0, 4)]
    same = {"new": 0.01, "old": 0.01}
    standing = {"new": costs[Status.PROBATION], "old": costs[Status.TRUSTED]}
    assert spans(plan_route(records, MODEL, 4, speeds=same, standing=standing)) == [("old", 0, 4)]
    # ... unless the new one is enough faster to pay for it
    faster = {"new": 0.001, "old": 0.01}
    assert spans(plan_route(records, MODEL, 4, speeds=faster, standing=standing)) == [("new", 0, 4)]


# ---- the indexed planner against the plain one it replaced ------------------------------------------

def _reference_believed_speeds(records, measured):
    """``believed_speeds`` as first written: the median of a format recomputed for every record."""
    def median(values):
        return sorted(values)[len(values) // 2]

    by_format = {}
    for r in records:
        by_format.setdefault(r.format, []).append(r)
    all_measured = [measured[r.peer_id] for r in records if r.peer_id in measured]
    speeds = {}
    for r in records:
        if r.peer_id in measured:
            speeds[r.peer_id] = measured[r.peer_id]
            continue
        alike = [measured[o.peer_id] for o in by_format[r.format] if o.peer_id in measured] or all_measured
        if alike:
            speeds[r.peer_id] = EXPLORE * median(alike)
        else:
            speeds[r.peer_id] = max(claimed_speed(r), median([claimed_speed(o) for o in by_format[r.format]]) / 2.0)
    return speeds


def _reference_plan_route(records, model_id, num_blocks, *, rtts, banned, start, end, cache_tokens_needed, formats,
                          speeds, standing, hop_seconds=0.0, rng=None):
    """``plan_route`` as first written: Dijkstra trying every record and every boundary at each node."""
    from client.routing import CACHE_PENALTY, DEFAULT_RTT, LOAD_FACTOR, RELAY_PENALTY, format_matches, usable_records

    def cost_of(r, blocks):
        rtt = rtts.get(r.peer_id, DEFAULT_RTT)
        network = (2 * rtt + RELAY_PENALTY if r.relayed else rtt) + hop_seconds
        speed = speeds.get(r.peer_id)
        compute = blocks * (claimed_speed(r) if speed is None else speed)
        compute *= 1 + LOAD_FACTOR * r.num_sessions
        penalty = CACHE_PENALTY if r.cache_tokens_left < cache_tokens_needed else 0.0
        return (network + compute + penalty) * (standing.get(r.peer_id, 1.0) * jitter.get(r.peer_id, 1.0))

    usable = [r for r in usable_records(records, model_id, num_blocks, banned) if r.start < end and r.end > start
              and (formats is None or format_matches(r, formats))]
    jitter = {}
    for r in usable if rng is not None else ():
        if r.peer_id not in jitter:  # one factor per peer, drawn in ``usable`` order
            jitter[r.peer_id] = rng.uniform(1.0, 1.0 + JITTER)
    boundaries = sorted({start, end} | {b for r in usable for b in (r.start, r.end) if start < b < end})
    best, came_from, heap = {start: (0.0, 0, ())}, {}, [(0.0, 0, (), start)]
    while heap:
        cost, hops, path, node = heapq.heappop(heap)
        if best.get(node) != (cost, hops, path):
            continue
        if node == end:
            break
        for r in usable:
            if not r.start <= node < r.end:
                continue
            for b in boundaries:
                if node < b <= min(r.end, end):
                    candidate = (cost + cost_of(r, b - node), hops + 1, path + (r.peer_id,))
                    if b not in best or candidate < best[b]:
                        best[b], came_from[b] = candidate, (r, node)
                        heapq.heappush(heap, (*candidate, b))
    if end not in best:
        return uncovered(usable, start, end) or [(max(best), end)]
    route, node = [], end
    while node != start:
        r, a = came_from[node]
        route.append((r.peer_id, a, node, r.dtype, r.quant))
        node = a
    return route[::-1]


def _random_swarm(rng):
    """Records with coarse values, so that equal costs (ties) are common."""
    blocks = rng.randint(1, 24)
    records = []
    for i in range(rng.randint(0, 40)):
        start = rng.randrange(blocks)
        end = rng.randint(start + 1, min(blocks, start + rng.choice([1, 2, 4, 8, 24])))
        peer = f"p{rng.randrange(60)}" if rng.random() < 0.1 else f"p{i:02d}"  # a few ids appear twice
        state = rng.choice([PeerState.ONLINE] * 8 + [PeerState.JOINING, PeerState.DRAINING])
        records.append(PeerRecord(
            peer_id=peer, model_id=MODEL if rng.random() < 0.95 else "other-1L-y", start=start, end=end,
            state=state, throughput=rng.choice([0.0, 1.0, 5.0, 10.0, 10.0, 20.0, 100.0]),
            dtype=rng.choice(["float32", "float32", "bfloat16"]), quant=rng.choice(["none", "none", "nf4"]),
            cache_tokens_left=rng.choice([0, 100, 1000]), num_sessions=rng.choice([0, 0, 1, 3]),
            relayed=rng.random() < 0.2, version="t"))
    rng.shuffle(records)  # ids out of order: ties between equal costs are broken by id, not by position
    return blocks, records


def test_plan_route_and_believed_speeds_match_the_plain_reference_on_random_swarms():
    rng, missing = random.Random(1234), 0
    for _ in range(400):
        blocks, records = _random_swarm(rng)
        ids = sorted({r.peer_id for r in records})
        pick = lambda p: [x for x in ids if rng.random() < p]  # noqa: E731
        measured = {x: rng.choice([0.001, 0.002, 0.01]) for x in pick(0.3)} if rng.random() < 0.6 else {}
        speeds = believed_speeds(records, measured)
        assert speeds == _reference_believed_speeds(records, measured)
        start = rng.randrange(blocks)
        end = rng.randint(start + 1, blocks) if rng.random() < 0.5 else blocks
        kwargs = dict(
            rtts={x: rng.choice([0.0, 0.01, 0.05, 0.2]) for x in pick(0.7)}, banned=set(pick(0.15)),
            start=start, end=end, cache_tokens_needed=rng.choice([0, 0, 500]),
            formats=rng.choice([None, None, ("float32",), ("nf4",), ("bfloat16/none", "float32/nf4")]),
            speeds=rng.choice([{}, speeds]), standing={x: rng.choice([1.0, 1.25, 3.0]) for x in pick(0.3)})
        if rng.random() < 0.3:
            kwargs["hop_seconds"] = rng.choice([0.01, 0.05])
        seed = rng.randrange(3)  # 0: no jitter
        expected = _reference_plan_route(records, MODEL, blocks, **kwargs, rng=random.Random(seed) if seed else None)
        try:
            route = plan_route(records, MODEL, blocks, **kwargs, rng=random.Random(seed) if seed else None)
        except MissingBlocksError as e:
            missing += 1
            assert e.missing == expected
        else:
            assert [(h.peer_id, h.start, h.end, h.dtype, h.quant) for h in route] == expected
    assert 40 < missing < 360  # both outcomes were exercised
