"""Pure tests of the step phase timings (wire/phases.py): what a timeline records, and how."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from wire.phases import Phases, Timeline


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_timeline_records_each_phase_once_per_step_summing_repeated_marks():
    phases, clock = Phases(("decode", "compute", "wait"), prefix="t", clock=Clock()), Clock()
    timeline = Timeline(phases, clock)
    clock.now = 0.001
    timeline.mark("decode")
    clock.now = 0.004
    timeline.mark("wait")
    clock.now = 0.006
    timeline.mark("decode")  # a second hop's reply: added to the step's decode
    clock.now = 0.012
    timeline.split(("compute", 0.010), "wait")  # compute ended at 0.010 (read on another thread), then 2 ms of wait
    assert timeline.spent == pytest.approx({"decode": 0.003, "wait": 0.005, "compute": 0.004})
    timeline.done()
    assert phases.counts() == {"decode": 1, "compute": 1, "wait": 1}
    summary = phases.summary()
    assert abs(summary["decode"]["p50_ms"] - 3.0) < 1e-9 and abs(summary["compute"]["mean_ms"] - 4.0) < 1e-9


def test_the_summary_is_over_recent_steps_and_the_histogram_is_prometheus():
    clock = Clock()
    phases = Phases(("compute",), prefix="swarmllm_peer", keep=10, clock=clock)
    for ms in range(1, 101):  # 1..100 ms; only the last 10 are kept for the summary
        phases.observe("compute", ms / 1000)
    clock.now = 5.0
    summary = phases.summary()["compute"]
    assert summary["count"] == 100 and summary["p50_ms"] == 96.0 and summary["p90_ms"] == 100.0
    phases.observe("compute", 1.0)
    again = phases.summary()["compute"]
    assert again["count"] == 101 and again["p90_ms"] == 100.0  # the count is current, the percentiles are reused
    clock.now = 6.5
    assert phases.summary()["compute"]["p90_ms"] == 1000.0  # a second later: computed again
    text = generate_latest(phases.registry).decode()
    assert "# TYPE swarmllm_peer_phase_seconds histogram" in text
    assert 'swarmllm_peer_phase_seconds_count{phase="compute"} 101.0' in text
    assert 'swarmllm_peer_phase_seconds_bucket{le="0.05",phase="compute"} 50.0' in text
