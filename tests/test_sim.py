"""The swarm simulator (sim/): deterministic, sensible metrics for every policy, and it runs the
project's real placement and routing code (not copies)."""

from __future__ import annotations

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


def test_same_seed_same_result(workload, results):
    again = _run("ours", "ours", make_workload(SMALL))
    assert again.metrics == results[("ours", "ours")].metrics
    assert again.series_tokens_per_s == results[("ours", "ours")].series_tokens_per_s


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
    assert m["failovers"] >= 0 and m["moves"] >= 0


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
