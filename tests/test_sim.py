"""The swarm simulator (sim/): deterministic, sensible metrics for every policy, and it runs the
project's real placement and routing code (not copies)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from sim import POLICIES, SimConfig, make_workload, run
from sim.workload import WorkloadConfig

SMALL = WorkloadConfig(peers=60, clients=300, duration=900.0, seed=3)


def _run(placement: str, routing: str, workload=None):
    return run(workload or make_workload(SMALL), SimConfig(placement=placement, routing=routing, warmup=300.0))


@pytest.fixture(scope="module")
def workload():
    return make_workload(SMALL)


@pytest.fixture(scope="module")
def results(workload):
    return {pair: _run(*pair, workload) for pair in POLICIES}


def _leaving(workload, warmup: float = 300.0) -> int:
    """Peers whose lifetime ends inside the measurement window (each one fails over its open sessions)."""
    leave = workload.arrive + workload.lifetime
    return int(((leave >= warmup) & (leave < workload.cfg.duration)).sum())


def _immortal(workload):
    """The same workload, except that no peer ever leaves."""
    return dataclasses.replace(workload, lifetime=np.full_like(workload.lifetime, 1e9))


def test_same_seed_same_result(workload, results):
    again = _run("ours", "ours", make_workload(SMALL))
    ours = results[("ours", "ours")].metrics
    assert again.metrics == ours
    assert again.series_tokens_per_s == results[("ours", "ours")].series_tokens_per_s
    # the counts compared are not trivially equal (zero), and they depend on the seed
    assert ours["failovers"] > 0 and ours["route_plans"] > 0 and ours["sessions_completed"] > 0
    other = _run("ours", "ours", make_workload(dataclasses.replace(SMALL, seed=4))).metrics
    assert (other["failovers"], other["route_plans"], other["sessions_completed"]) != \
        (ours["failovers"], ours["route_plans"], ours["sessions_completed"])


def test_workload_is_common_to_policies_and_seeded(workload):
    other = make_workload(WorkloadConfig(peers=60, clients=300, duration=900.0, seed=4))
    assert (make_workload(SMALL).arrive == workload.arrive).all()
    assert len(other.arrive) != len(workload.arrive) or (other.arrive != workload.arrive).any()


@pytest.mark.parametrize("pair", POLICIES)
def test_every_policy_gives_sensible_metrics(results, pair):
    m = results[pair].metrics
    assert m["tokens_per_s"] > 0
    assert 0.0 <= m["uncovered_fraction"] <= 1.0
    assert 0 < m["p50_latency_s"] <= m["p99_latency_s"]
    assert m["sessions_completed"] > 0
    assert m["failovers"] > 0  # peers leave during the measurement (see the next test): their sessions fail over


def test_workload_has_peers_leaving_while_measured(workload):
    assert _leaving(workload) > 0


@pytest.mark.parametrize("pair", POLICIES)
def test_failovers_come_from_peers_leaving(results, workload, pair):
    """The same workload with peers that never leave: fewer failovers (what remains comes from plans made
    on a stale snapshot: a peer that moved or filled its cache since)."""
    still = _run(*pair, _immortal(workload)).metrics
    assert _leaving(_immortal(workload)) == 0
    assert still["failovers"] < results[pair].metrics["failovers"], (still, results[pair].metrics)


def test_a_crowded_start_is_rebalanced_by_moves(monkeypatch, workload):
    """Every peer joins on block 0 (initial placement stubbed out, should_move left real): rebalancing moves
    peers, and the swarm covers far more of the model than the same start where nobody may move."""
    import peer.placement
    import sim.policies

    monkeypatch.setattr(sim.policies.OurPlacement, "choose", lambda self, others, n, rng: 0)
    moved = _run("ours", "ours", workload).metrics
    monkeypatch.setattr(peer.placement, "should_move", lambda *a, **k: None)
    stuck = _run("ours", "ours", workload).metrics
    assert stuck["moves"] == 0 and stuck["uncovered_fraction"] == 1.0
    assert moved["moves"] > 0
    assert moved["uncovered_fraction"] < stuck["uncovered_fraction"]
    assert moved["tokens_per_s"] > stuck["tokens_per_s"]


def test_it_calls_the_projects_routing(monkeypatch, workload, results):
    import client.routing

    calls = []
    real = client.routing.plan_route

    def counting(*args, **kwargs):
        calls.append(kwargs.get("start", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(client.routing, "plan_route", counting)
    again = _run("ours", "ours", workload)
    assert len(calls) == again.metrics["route_plans"] > 0
    assert again.metrics == results[("ours", "ours")].metrics  # counting changes nothing


def test_it_calls_the_projects_placement(monkeypatch, workload, results):
    import peer.placement

    monkeypatch.setattr(peer.placement, "choose_start", lambda throughputs, n, rng: 0)  # everyone at block 0
    monkeypatch.setattr(peer.placement, "should_move", lambda *a, **k: None)
    crowded = _run("ours", "ours", workload)
    assert crowded.metrics["moves"] == 0
    assert crowded.metrics["uncovered_fraction"] > results[("ours", "ours")].metrics["uncovered_fraction"]
