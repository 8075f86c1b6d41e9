"""The health page: a pure snapshot builder, and a real swarm seen through the page in headless Chromium."""

from __future__ import annotations

import json
import pathlib
import shutil
import signal
import time
import urllib.request

import pytest

from dht.records import PeerRecord, PeerState, VerdictRecord
from health.snapshot import Ping, build
from swarmllm import launch

ARTIFACTS = pathlib.Path(__file__).resolve().parents[1] / "test-artifacts"


def rec(peer, start, end, state=PeerState.ONLINE, model="m-6L-x", **kw):
    return PeerRecord(peer_id=peer, model_id=model, start=start, end=end, state=state, throughput=5.0,
                      dtype="float32", cache_tokens_left=100, version="t", model_blocks=6, **kw)


def test_snapshot_coverage_gaps_and_states():
    records = [rec("a", 0, 3, model_type="mixtral", num_parameters=42), rec("b", 0, 2), rec("c", 4, 6, PeerState.DRAINING), rec("d", 4, 6),
               rec("gone", 0, 6, PeerState.OFFLINE), rec("x", 0, 6, model="other-6L-y")]
    pings = {p: Ping(0.01) for p in "abcx"}  # d does not answer
    snap = build(records, pings, [], now=1.0)
    m = {s.model_id: s for s in snap.models}["m-6L-x"]
    assert [c.online for c in m.coverage] == [2, 2, 1, 0, 0, 0]
    assert m.gaps == [(3, 6)] and m.min_coverage == 0
    assert {p.peer_id for p in m.peers} == {"a", "b", "c", "d"}  # offline peers are not listed
    assert {p.peer_id: p.reachable for p in m.peers}["d"] is False
    assert all(p.audits_passed is None for p in m.peers)  # no verdicts: no reputation columns
    assert len(snap.models) == 2
    assert m.model_type == "mixtral" and {p.peer_id: p.num_parameters for p in m.peers}["a"] == 42
    assert {s.model_id: s for s in snap.models}["other-6L-y"].model_type == ""


def test_snapshot_counts_published_verdicts():
    v = lambda target, verdict, t: VerdictRecord(author="client", target=target, model_id="m-6L-x", start=0, end=3,
                                                 verdict=verdict, median_error=0.1, max_error=0.2, time=t)
    snap = build([rec("a", 0, 6), rec("b", 0, 6)], {"a": Ping(0.01), "b": Ping(0.01)},
                 [v("a", "pass", 1), v("a", "gross_fail", 2), v("a", "pass", 0.5)], now=3.0)
    peers = {p.peer_id: p for p in snap.models[0].peers}
    assert (peers["a"].audits_passed, peers["a"].audits_failed, peers["a"].last_verdict) == (2, 1, "gross_fail")
    assert peers["b"].audits_passed is None
    assert (snap.audits_passed, snap.audits_failed) == (2, 1)


def test_snapshot_and_page_list_proven_liars():
    from dht.records import ProofRecord
    from health.app import PAGE

    proof = lambda accused, t: ProofRecord("12D3KooWauthor", accused, "m-6L-x", 3, 6, "ab" * 32, (), t)
    snap = build([rec("a", 0, 6), rec("liar", 3, 6)], {"a": Ping(0.01)},
                 [], now=3.0, proofs=[(proof("liar", 1.0), "signed"), (proof("a", 2.0), "forged")])
    m = snap.models[0]
    assert [(p.accused, p.status) for p in m.proofs] == [("a", "forged"), ("liar", "signed")]  # newest first
    html = PAGE.render(snap=snap, when="now", refresh=10)
    assert "Proven liars" in html and 'data-peer="liar"' in html.split("Proven liars")[1]
    assert 'class="liar" data-peer="a"' not in html  # a forged proof proves nothing against its accused
    assert "Proven liars" not in PAGE.render(snap=build([rec("a", 0, 6)], {}, [], now=3.0), when="now", refresh=10)


def _get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


@pytest.fixture(scope="module")
def health_swarm(tiny_checkpoint, make_swarm):
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    peers = swarm.add_peers(path, [(0, 2), (0, 3)], extra=["--metrics-port", "0"])
    # blocks 3 uncovered; this peer is killed by a test below, and its record (announced for 2.5 x 300 s)
    # outlives that test: the page still has its row then, which must say it is unreachable
    peers += swarm.add_peers(path, [(4, 6)], extra=["--name", "<script>alert('x')</script>", "--announce-period", "300"])
    health = launch.SwarmProcess("health", launch.swarmllm_command(
        "health", "--initial-peers", *swarm.initial_peers, "--port", "0", "--refresh-period", "1"))
    swarm.procs.append(health)
    health.wait_ready(60)
    return swarm, peers, health.ready["url"]


def test_json_state_and_metrics(health_swarm):
    _, peers, url = health_swarm
    state = json.loads(_get(url + "api/v1/state?refresh=true"))
    model, = state["models"]
    assert [c["online"] for c in model["coverage"]] == [2, 2, 1, 0, 1, 1]
    assert model["gaps"] == [[3, 4]]
    assert model["model_type"] == "llama" and all(p["num_parameters"] > 0 for p in model["peers"])
    assert len(model["peers"]) == 3 and all(p["reachable"] and p["rtt_ms"] > 0 for p in model["peers"])
    one = json.loads(_get(url + f"api/v1/peers/{peers[0].ready['peer_id']}"))
    assert (one["start"], one["end"]) == (0, 2)
    assert "swarmllm_min_coverage" in _get(url + "metrics")
    assert "/api/v1/state" in _get(url + "openapi.json")


def _cell(page, row, column: str) -> str:
    """The text of ``row``'s cell in the column headed ``column``."""
    headers = [h.strip() for h in page.locator("thead th").all_inner_texts()]
    return row.locator("td").nth(headers.index(column)).inner_text().strip()


def _without_auto_refresh(route):
    response = route.fetch()
    route.fulfill(response=response, body=response.text().replace('http-equiv="refresh"', 'http-equiv="x-off"'))


def test_page_in_headless_chromium_and_a_killed_peer_leaves_coverage_and_shows_unreachable(health_swarm):
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    _, peers, url = health_swarm
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 700})
            # The page reloads itself every --refresh-period (1 s here); on a busy machine that reload can
            # start before a load finishes and interrupt page.goto. The browser gets the page as served
            # but with the reload switched off, so each goto is one navigation; that it is served with
            # the reload is checked on the raw HTML.
            assert '<meta http-equiv="refresh" content="1">' in _get(url)
            page.route(url, _without_auto_refresh)
            page.goto(url, timeout=30_000)
            cells = page.locator(".cell")
            assert cells.count() == 6
            assert [cells.nth(i).get_attribute("data-online") for i in range(6)] == ["2", "2", "1", "0", "1", "1"]
            assert "c0" in cells.nth(3).get_attribute("class")
            assert page.locator("tr.peer").count() == 3
            assert "Family: llama" in page.locator("p.family").inner_text()
            assert "Not served: block 3." in page.content()
            assert page.locator("script").count() == 0  # the peer's name is shown, never run
            assert "<script>alert('x')</script>" in page.locator("table").inner_text()
            killed = peers[2].ready["peer_id"]
            row = page.locator(f"tr[data-peer='{killed}']")
            assert row.count() == 1 and _cell(page, row, "reachable") == "yes" and _cell(page, row, "RTT").endswith(" ms")
            page.screenshot(path=str(ARTIFACTS / "health.png"), full_page=True)

            peers[2].signal(signal.SIGKILL)  # serves blocks 4-5 alone
            deadline = time.monotonic() + 15
            while True:
                state = json.loads(_get(url + "api/v1/state"))
                gaps = state["models"][0]["gaps"]
                if gaps == [[3, 6]]:
                    break
                assert time.monotonic() < deadline, f"killed peer still counted: {gaps}"
                time.sleep(0.5)
            # its record is still there: listed, but unreachable (which is why blocks 4-5 count as unserved)
            listed = {p["peer_id"]: p for p in state["models"][0]["peers"]}
            assert (listed[killed]["reachable"], listed[killed]["rtt_ms"], listed[killed]["state"]) == (False, None, "online")
            page.goto(url, timeout=30_000)
            assert "Not served: blocks 3–5" in page.content()
            row = page.locator(f"tr[data-peer='{killed}']")
            assert row.count() == 1
            assert (_cell(page, row, "blocks"), _cell(page, row, "state")) == ("4–5", "online")
            assert (_cell(page, row, "reachable"), _cell(page, row, "RTT")) == ("no", "—")
        finally:
            browser.close()


def test_peer_metrics_port(health_swarm):
    import urllib.error
    import urllib.request

    _, peers, _ = health_swarm
    url = f"http://127.0.0.1:{peers[0].ready['metrics_port']}"
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        assert r.headers["Content-Type"].startswith("text/plain; version=")  # prometheus_client's exposition
        text = r.read().decode()
    assert "swarmllm_peer_sessions 0.0" in text and "swarmllm_peer_cache_tokens_total 16384.0" in text
    assert "# HELP swarmllm_peer_requests_total Steps answered." in text
    assert "# TYPE swarmllm_peer_requests_total counter" in text
    assert "swarmllm_peer_throughput_steps_per_second" in text
    assert "# TYPE swarmllm_peer_phase_seconds histogram" in text  # where its steps' time goes (wire/phases.py)
    assert 'swarmllm_peer_phase_seconds_count{phase="compute"}' in text
    with pytest.raises(urllib.error.HTTPError) as e:  # one path
        urllib.request.urlopen(url + "/", timeout=10)
    assert e.value.code == 404
