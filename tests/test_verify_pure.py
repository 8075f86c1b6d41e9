"""Pure tests of verification: comparison, sampling, reputation, and a network-free simulation."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest
import torch

from peer.adversary import Adversary
from verify.compare import THRESHOLDS, compare, token_errors
from verify.auditor import Auditor, ServedSpan
from verify.policy import AuditRates, SamplingPolicy, detection_probability, expected_wrong_before_audit
from verify.reputation import Entry, ReputationBook, ReputationRules, Status, Verdict, identity_signals


def _block(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A stand-in span: y = x + small update; the update is what is compared."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(x.shape[-1], x.shape[-1], generator=g) / x.shape[-1] ** 0.5
    return x + torch.tanh(x @ w)


def _x(tokens=8, hidden=64, seed=1):
    x = torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(seed))
    x[..., 0] *= 1000  # a "massive activation" that passes through unchanged
    return x


def test_identical_outputs_agree_and_update_metric_sees_through_massive_activations():
    x = _x()
    y = _block(x)
    assert compare(x, y, y.clone(), "float32", "float32").agree
    assert float(token_errors(x, y, x).min()) == pytest.approx(1.0)  # identity: e = 1 exactly
    verdict = compare(x, y, x.clone(), "float32", "float32")  # returns its input: Δ = 0
    assert not verdict.agree and verdict.gross
    # measured on the output, the massive activation hides the difference; on the update it cannot
    assert float((y - x).norm() / y.norm()) < 0.01


@pytest.mark.parametrize("attack, gross", [
    (lambda x, y: y + 0.3 * (y - x).norm(dim=-1, keepdim=True) * torch.randn_like(y) / y.shape[-1] ** 0.5, False),
    (lambda x, y: _block(x, seed=99), True),  # wrong weights
    (lambda x, y: x + 1.5 * (y - x), False),  # scaled update
    (lambda x, y: torch.where(torch.arange(y.shape[1])[None, :, None] == 3, x, y), True),  # one token corrupted
    (lambda x, y: y.masked_fill(torch.zeros_like(y, dtype=torch.bool).index_fill(2, torch.tensor([5]), True), float("nan")), True),
])
def test_attacks_are_caught(attack, gross):
    x = _x()
    y = _block(x)
    result = compare(x, y, attack(x, y), "float32", "float32")
    assert not result.agree
    assert result.gross == gross or result.maximum > THRESHOLDS["float32"].maximum


def test_different_dtypes_are_never_judged():
    x = _x()
    result = compare(x, _block(x), x, "float32", "bfloat16")
    assert not result.comparable and result.agree


def test_padding_positions_are_ignored():
    x = _x()
    y = _block(x)
    bad = y.clone()
    bad[:, :2] = 0
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[:, :2] = 0
    assert compare(x, y, bad, "float32", "float32", mask=mask).agree


def test_honest_precision_noise_passes_at_each_dtype():
    """bf16/fp16 peers compute the same span with rounding; their honest disagreement stays under τ."""
    x = _x(tokens=32, hidden=256)
    ref = _block(x)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 256, generator=g) / 16
    for name in ("bfloat16", "float16"):
        dtype = getattr(torch, name)
        xd = x.to(dtype)
        a = (xd + torch.tanh(xd @ w.to(dtype))).float()  # computed in the low dtype
        b = (xd.float() + torch.tanh(xd.float() @ w)).to(dtype).float()  # in fp32, rounded at the end
        result = compare(xd.float(), a, b, name, name)
        assert result.agree, (name, result)


def test_sampling_rates_follow_status_and_never_reach_zero():
    rates = AuditRates()
    assert rates.for_status(Status.PROBATION) == 0.25 and rates.for_status(Status.TRUSTED) == 0.02
    policy = SamplingPolicy(rates, random.Random(0))
    hits = sum(policy.should_audit(Status.ACTIVE) for _ in range(20000))
    assert 800 < hits < 1200  # 5 %
    assert all(policy.should_audit(Status.SUSPECT) for _ in range(100))


def test_reputation_probation_trust_and_bans():
    now = [0.0]
    rules = ReputationRules(probation_passes=3, trusted_passes=6, ban_base=100.0)
    book = ReputationBook(rules, clock=lambda: now[0])
    assert book.status("new") == Status.PROBATION
    # a fail during probation bans at once
    assert book.record("cheat", Verdict.FAIL) == Status.BANNED
    now[0] += 101
    assert book.status("cheat") != Status.BANNED
    assert book.record("cheat", Verdict.FAIL) == Status.BANNED  # second ban: twice as long
    now[0] += 150
    assert book.status("cheat") == Status.BANNED
    # honest peer: probation -> active -> trusted; one fail makes it a suspect, not banned
    for _ in range(3):
        book.record("good", Verdict.PASS)
    assert book.status("good") == Status.ACTIVE
    for _ in range(17):
        book.record("good", Verdict.PASS)
    assert book.status("good") == Status.TRUSTED  # enough passes and a score >= 0.9
    for _ in range(100):
        book.record("veteran", Verdict.PASS)
    assert book.record("veteran", Verdict.FAIL) == Status.SUSPECT
    assert book.record("veteran", Verdict.FAIL) == Status.BANNED  # 2 fails within a week, whatever the history
    assert book.record("x", Verdict.GROSS_FAIL) == Status.BANNED
    assert book.record("y", Verdict.INCONCLUSIVE) == Status.SUSPECT
    assert book.record("z", Verdict.IMPOSSIBLE) == Status.PROBATION  # not a pass
    assert book.entry("z").passes == 0


def test_reputation_book_persists(tmp_path):
    book = ReputationBook(ReputationRules(probation_passes=1))
    book.record("a", Verdict.PASS)
    book.record("b", Verdict.GROSS_FAIL)
    path = str(tmp_path / "book.json")
    book.save(path)
    again = ReputationBook(ReputationRules(probation_passes=1))
    again.load(path)
    assert again.status("a") == Status.ACTIVE and again.status("b") == Status.BANNED
    (tmp_path / "junk.json").write_text("{not json")
    again.load(str(tmp_path / "junk.json"))  # ignored
    assert again.status("a") == Status.ACTIVE


def test_simulated_honest_swarm_bans_no_one():
    """10^4 honest sessions, each audited at the probation/active rate, with honest replay noise
    (prefill vs step-by-step in float32: ~1e-7 relative) and occasional batch-shape noise."""
    rng = random.Random(0)
    book = ReputationBook(ReputationRules())
    policy = SamplingPolicy(AuditRates(), rng)
    peers = [f"p{i}" for i in range(20)]
    x = _x(tokens=16, hidden=64)
    y = _block(x)
    audits = 0
    for session in range(10_000):
        peer = rng.choice(peers)
        if not policy.should_audit(book.status(peer)):
            continue
        audits += 1
        noise = 1e-7 * (1 + rng.random() * 10)
        y_b = y + noise * y.abs().mean() * torch.randn(y.shape, generator=torch.Generator().manual_seed(session))
        result = compare(x, y, y_b, "float32", "float32")
        book.record(peer, Verdict.PASS if result.agree else Verdict.FAIL)
    assert audits > 500
    assert book.banned() == frozenset() and book.suspects() == frozenset()


def test_simulated_one_percent_cheater_detection_follows_the_formula():
    """A peer corrupting 1 % of sessions, audited with p = 0.25: the fraction of trials in which it is
    caught within n sessions follows 1 - (1 - p q d)^n (d = 1: every audited corruption is caught)."""
    rng = random.Random(1)
    p, q, trials = 0.25, 0.01, 600
    x = _x()
    y = _block(x)
    cheat = y + 0.3 * torch.randn_like(y)
    detect_at = []
    for _ in range(trials):
        n = 0
        while True:
            n += 1
            corrupted = rng.random() < q
            if rng.random() < p and corrupted and not compare(x, y, cheat, "float32", "float32").agree:
                detect_at.append(n)
                break
    for n in (100, 400, 1200):
        expected = detection_probability(p, q, 1.0, n)
        observed = sum(d <= n for d in detect_at) / trials
        sigma = math.sqrt(expected * (1 - expected) / trials)
        assert abs(observed - expected) < 4 * sigma + 1e-9, (n, observed, expected)


def test_identity_signals_name_what_an_operator_keeps():
    signals = identity_signals(["/ip4/81.2.69.142/tcp/31337/p2p/QmA", "/ip4/127.0.0.1/tcp/4001",
                                "/ip6/2a00:1450:4001:81a::200e/tcp/1", "/dns4/Peer.Example.org/tcp/1",
                                "/ip4/81.2.69.1/tcp/1/p2p/QmRelay/p2p-circuit"], " Alice ")
    assert signals == {"net4:81.2.69", "addr:127.0.0.1:4001", "net6:2a00:1450:4001", "dns:peer.example.org",
                       "name:alice"}
    assert identity_signals(["/ip4/10.0.0.5/tcp/7"]) == {"addr:10.0.0.5:7"}  # private: exactly, port and all


def test_a_banned_operators_new_identity_starts_as_a_suspect():
    book = ReputationBook(ReputationRules())
    liar = identity_signals(["/ip4/81.2.69.142/tcp/31337"], "mallory")
    book.observe("old", liar)
    assert book.record("old", Verdict.GROSS_FAIL) == Status.BANNED
    # same /24, another port and name; the same name elsewhere; an unrelated newcomer
    assert book.observe("new", identity_signals(["/ip4/81.2.69.7/tcp/1"], "bob")) == Status.SUSPECT
    assert book.entry("new").linked_to == "old"
    assert book.observe("renamed", identity_signals(["/ip4/5.6.7.8/tcp/1"], "Mallory")) == Status.SUSPECT
    assert book.observe("stranger", identity_signals(["/ip4/5.6.9.8/tcp/1"], "carol")) == Status.PROBATION
    assert book.related("new", "old") and not book.related("stranger", "old")
    # a peer the book already knows is not re-labelled by its neighbours
    book.record("known", Verdict.PASS)
    assert book.observe("known", liar) == Status.PROBATION


def test_new_identities_are_audited_every_session_until_they_passed_enough():
    policy = SamplingPolicy(AuditRates(first_sessions=3), random.Random(0))
    assert all(policy.should_audit(Status.PROBATION, passes) for passes in (0, 1, 2) for _ in range(50))
    assert sum(policy.should_audit(Status.PROBATION, 3) for _ in range(4000)) < 1200  # then 25 %
    assert not any(SamplingPolicy(AuditRates.never()).should_audit(Status.PROBATION, 0) for _ in range(50))


@pytest.mark.parametrize("text, want", [
    ("wrong_weights", Adversary("wrong_weights", 1.0, 0)),
    ("noise:0.3", Adversary("noise", 0.3, 0)),
    ("wrong_weights@after=20", Adversary("wrong_weights", 1.0, 20)),
    ("noise:0.5@after=0", Adversary("noise", 0.5, 0)),
])
def test_adversary_text_parses(text, want):
    assert Adversary.parse(text) == want


@pytest.mark.parametrize("text, message", [
    ("lies", "mode must be one of"),
    ("noise:x", "rate must be a number"),
    ("noise:0", r"rate must be in \(0, 1\]"),
    ("noise@before=3", r"MODE\[:RATE\]\[@after=N\]"),
    ("noise@after", r"MODE\[:RATE\]\[@after=N\]"),
    ("noise@after=three", "whole number of steps"),
    ("noise@after=1.5", "whole number of steps"),
    ("noise@after=-1", "whole number of steps >= 0, got -1"),
    ("noise@after=2@after=3", "whole number of steps"),
])
def test_malformed_adversary_text_says_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        Adversary.parse(text)


def test_a_long_con_adversary_is_honest_for_its_first_steps_then_lies(tiny_checkpoint):
    """identity@after=2: the first two forward calls are the honest runner's, every one after returns its
    input; an equivocator's first pushes go out unchanged the same way."""
    from peer.adversary import AdversarialRunner, PushTamper
    from peer.blocks import BlockRunner

    honest = BlockRunner(tiny_checkpoint("llama"), 0, 2)
    runner = AdversarialRunner(honest, Adversary.parse("identity@after=2"), "", seed=0)
    hidden = torch.randn(1, 3, honest.hidden_size, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(3)[None]
    outs = [runner.forward(hidden, positions, None, runner.new_cache()) for _ in range(4)]
    want = honest.forward(hidden, positions, None, honest.new_cache())
    assert torch.equal(outs[0], want) and torch.equal(outs[1], want)
    assert torch.equal(outs[2], hidden) and torch.equal(outs[3], hidden)
    assert runner.steps == 4
    tamper = PushTamper(Adversary.parse("equivocate@after=3"), seed=0)
    pushed = [tamper(want) for _ in range(5)]
    assert all(p is want for p in pushed[:3]) and not any(torch.equal(p, want) for p in pushed[3:])


def _veteran(book: ReputationBook, peer: str = "veteran", passes: int = 500) -> None:
    for _ in range(passes):
        book.record(peer, Verdict.PASS)


def test_a_long_con_costs_a_trusted_peer_its_standing_on_its_first_failed_audit():
    """500 passed audits, then a lie: suspect at once (audited every session), banned on the second lie."""
    book = ReputationBook(ReputationRules())
    _veteran(book)
    assert book.status("veteran") == Status.TRUSTED and book.entry("veteran").score > 0.98
    assert book.record("veteran", Verdict.FAIL) == Status.SUSPECT
    assert book.status("veteran") == Status.SUSPECT and AuditRates().rate(Status.SUSPECT, 0) == 1.0
    assert book.record("veteran", Verdict.FAIL) == Status.BANNED
    assert "veteran" in book.banned()


def test_the_audit_floor_rises_with_the_sessions_served_since_the_last_audit():
    rates = AuditRates()
    assert [rates.rate(Status.TRUSTED, n) for n in (0, 1, 9, 48, 49, 80)] == [0.02, 0.04, 0.2, 0.98, 1.0, 1.0]
    assert [rates.rate(Status.ACTIVE, n) for n in (0, 1, 9, 19)] == [0.05, 0.1, 0.5, 1.0]
    assert rates.rate(Status.PROBATION, 1000) == 0.25  # probation and suspects keep their own rates
    assert AuditRates(trusted_every=0).rate(Status.TRUSTED, 1000) == 0.02  # no floor: the base rate
    assert AuditRates.never().rate(Status.TRUSTED, 1000) == 0.0


def _span(peer: str) -> ServedSpan:
    x = torch.zeros(1, 1, 4)
    return ServedSpan(peer, 0, 1, "float32", [x], [torch.zeros(1, 1, dtype=torch.long)], None, [x])


class _NeverBelow:
    """An rng whose draws are all just under 1: only a rate of 1 audits."""

    def random(self) -> float:
        return 1.0 - 1e-12


def test_a_trusted_peer_is_audited_at_least_once_in_every_50_sessions_exactly(tmp_path):
    book = ReputationBook(ReputationRules())
    _veteran(book)
    auditor = Auditor(book, SamplingPolicy(AuditRates(), _NeverBelow()), lambda *a: [], replay=None)
    audited = [n for n in range(1, 201) if auditor.sampled(_span("veteran"))]
    assert audited == [50, 100, 150, 200]  # the luckiest liar: never drawn until the rate reaches 1
    for _ in range(7):
        auditor.sampled(_span("veteran"))
    assert book.entry("veteran").unchecked == 7
    path = str(tmp_path / "book.json")
    book.save(path)
    again = ReputationBook(ReputationRules())
    again.load(path)
    assert again.entry("veteran").unchecked == 7  # kept across runs: a restart does not reset the count
    assert auditor.sampled(_span("veteran"), every=True) and book.entry("veteran").unchecked == 0
    # with a real rng: no run of unaudited sessions reaches 50
    book.entry("veteran").unchecked = 0
    auditor = Auditor(book, SamplingPolicy(AuditRates(), random.Random(0)), lambda *a: [], replay=None)
    drawn = [auditor.sampled(_span("veteran")) for _ in range(20_000)]
    runs = "".join("x" if d else "." for d in drawn).split("x")
    assert max(len(r) for r in runs) <= 49
    assert 0.10 < sum(drawn) / len(drawn) < 0.135  # the load: 1 / (1 + 7.54) = 11.7 % of its sessions


def test_an_old_book_without_the_unchecked_count_still_loads(tmp_path):
    import json

    path = tmp_path / "old.json"
    old = {k: v for k, v in dataclasses.asdict(Entry(passes=300, r=90.0, s=0.1)).items() if k != "unchecked"}
    path.write_text(json.dumps({"version": 1, "peers": {"old": old}}))
    book = ReputationBook(ReputationRules())
    book.load(str(path))
    assert book.status("old") == Status.TRUSTED and book.entry("old").unchecked == 0


def test_expected_wrong_generations_of_a_long_con_liar_before_its_first_audit():
    """A liar that turns just after an audit and lies in every session: the unaudited sessions it serves
    before an audit is drawn, sum over k of P(sessions 1..k all missed), against a simulation."""
    rates = AuditRates()
    assert expected_wrong_before_audit(AuditRates(trusted_every=0), Status.TRUSTED) == pytest.approx(49.0)
    assert expected_wrong_before_audit(rates, Status.SUSPECT) == 0.0
    assert expected_wrong_before_audit(AuditRates.never(), Status.TRUSTED) == float("inf")
    trusted = expected_wrong_before_audit(rates, Status.TRUSTED)
    active = expected_wrong_before_audit(rates, Status.ACTIVE)
    assert trusted == pytest.approx(7.543, abs=1e-3) and active == pytest.approx(4.294, abs=1e-3)
    rng = random.Random(2)
    policy = SamplingPolicy(rates, rng)
    for status, want in ((Status.TRUSTED, trusted), (Status.ACTIVE, active)):
        missed = []
        for _ in range(20_000):
            n = 0
            while not policy.should_audit(status, unchecked=n):
                n += 1
            missed.append(n)
        mean = sum(missed) / len(missed)
        sigma = (sum((m - mean) ** 2 for m in missed) / len(missed) / len(missed)) ** 0.5
        assert abs(mean - want) < 4 * sigma, (status, mean, want)
        assert max(missed) <= rates.every(status) - 1


def test_the_least_loaded_checker_is_picked_at_random_among_equals():
    policy = SamplingPolicy(AuditRates(), random.Random(0))
    load = {"a": 2, "b": 0, "c": 0, "d": 1}.__getitem__
    picked = {policy.pick(["a", "b", "c", "d"], load) for _ in range(50)}
    assert picked == {"b", "c"}  # never a busier one, and not always the same of the idle ones
    assert {policy.pick(["a", "b", "c", "d"]) for _ in range(200)} == {"a", "b", "c", "d"}  # no load: any
