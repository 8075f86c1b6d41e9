"""Lying peers in a real swarm: audits catch each adversary mode, routing then avoids the liar, and the
generation it served is generated again (verify_mode="redo"), so the user gets exactly local's tokens."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM, UnverifiableError
from client.errors import Equivocation
from verify import proofs
from verify.policy import AuditRates, standing_cost
from verify.reputation import ReputationBook, Status, Verdict

FAST = ["--throughput", "10000"]  # the liar looks fastest, so routes go through it first
SLOW = ["--throughput", "10"]  # 0.1 s per step: far costlier than any loopback round trip


@pytest.fixture(scope="module")
def honest_swarm(tiny_checkpoint, make_swarm):
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    # a claim counts for at most 2x the median claim per block (client/routing.py): the whole-model peer
    # claims half the others' speed per block, so a route through the liar's [3, 6) looks cheapest
    swarm.add_peers(path, [(0, 6)], extra=["--throughput", "5"])
    swarm.add_peers(path, [(0, 3), (3, 6), (3, 6)], extra=SLOW)  # two honest checkers for [3, 6)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, swarm, local


# a partial liar lies on half its steps: over a 10-token generation it is honest throughout 0.1 % of the
# time (and once a peer is measured as no faster than the others, routing may never pick it again)
@pytest.mark.parametrize("mode", ["noise", "identity", "skip", "wrong_weights", "low_precision", "noise:0.5"])
def test_each_adversary_is_caught_avoided_and_its_generation_redone(honest_swarm, mode):
    path, swarm, local = honest_swarm
    liar, = swarm.add_peers(path, [(3, 6)], extra=["--adversary", mode, *FAST])
    liar_id = liar.ready["peer_id"]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, swarm.initial_peers, audit_rates=AuditRates.always(), verify_mode="redo", reputation_path=None)
    try:
        book = model.swarm.core.book
        for seed in range(4 if ":" in mode else 1):  # a partial liar may be honest on a whole session
            ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(seed))
            kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
            assert model.generate(ids, **kwargs).tolist() == local.generate(ids, **kwargs).tolist()
            if book.status(liar_id) == Status.BANNED:
                break
        assert book.status(liar_id) == Status.BANNED
        caught = [r for r in model.swarm.core.audits.auditor.results if r.peer_id == liar_id]
        assert caught and caught[-1].verdict in (Verdict.FAIL, Verdict.GROSS_FAIL)
        assert caught[-1].referee is not None  # confirmed 2 of 3
        assert liar_id not in [h.peer_id for h in model.swarm.route()]
        honest = [r for r in model.swarm.core.audits.auditor.results if r.peer_id != liar_id]
        assert all(r.verdict in (Verdict.PASS, Verdict.IMPOSSIBLE) for r in honest), honest  # never blamed
    finally:
        model.swarm.shutdown()
        liar.stop()


def test_no_second_peer_means_the_audit_is_impossible_not_passed(tiny_checkpoint, make_swarm):
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    swarm.add_peers(path, [(0, 6)])
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, swarm.initial_peers, audit_rates=AuditRates.always(), reputation_path=None)
    try:
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        model.swarm.wait_audits()
        results = model.swarm.core.audits.auditor.results
        assert [r.verdict for r in results] == [Verdict.IMPOSSIBLE]
        assert model.swarm.core.book.entry(results[0].peer_id).passes == 0
    finally:
        model.swarm.shutdown()


def test_verdicts_are_published_signed_by_their_author(honest_swarm):
    import asyncio

    from dht import directory

    path, swarm, _ = honest_swarm
    liar, = swarm.add_peers(path, [(3, 6)], extra=["--adversary", "identity", *FAST])
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, swarm.initial_peers, audit_rates=AuditRates.always(), verify_mode="redo", reputation_path=None)
    try:
        model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, do_sample=False, pad_token_id=0)
        model.swarm.wait_audits()
        reader = directory.start_node(None, swarm.initial_peers, client_mode=True)
        try:
            verdicts = asyncio.run(directory.fetch_verdicts(reader, model.swarm.cfg.model_id))
        finally:
            reader.shutdown()
        mine = {v.target: v for v in verdicts if v.author == model.swarm.identity.peer_id}
        assert mine[liar.ready["peer_id"]].verdict == "gross_fail"
        assert mine[liar.ready["peer_id"]].median_error > 0.5
    finally:
        model.swarm.shutdown()
        liar.stop()


STRICT_MODES = ["noise", "identity", "skip", "wrong_weights", "low_precision", "equivocate", "noise:0.3",
                "wrong_weights:0.3"]


def _watch(model) -> list[tuple]:
    """What the client does, in order, recorded as it goes by wrapping its own plan() and mark_failed() (on
    this client only): ("route", its peers, the peers its reputation book banned when it was planned) for
    every route planned, ("failed", peer, error) for every hop it failed over from."""
    core = model.swarm.core
    events = []
    plan, mark_failed = core.plan, core.mark_failed

    async def planned(*args, **kwargs):
        banned = core.book.banned()
        hops = await plan(*args, **kwargs)
        events.append(("route", [h.peer_id for h in hops], banned))
        return hops

    def failed(peer_id, error):
        events.append(("failed", peer_id, error))
        return mark_failed(peer_id, error)

    core.plan, core.mark_failed = planned, failed
    return events


def _stats(model, peer_id: str) -> dict:
    """A peer's own counters (its info RPC)."""
    return model.swarm.loop.run(model.swarm.core.transport.info(peer_id), timeout=60)[0]


def test_strict_mode_never_hands_over_a_wrong_generation(honest_swarm):
    """A liar on the preferred route, each adversary mode in turn: 20 generations each, every one equal to
    local. A liar that computes wrong (each step, or 30 % of them) is routed to, caught lying by an audit
    and banned; the equivocator (a first hop, which pushes to the next) is caught by the next hop's input
    digest. No honest peer is blamed."""
    path, swarm, local = honest_swarm
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    prompts = [torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(seed)) for seed in range(20)]
    wants = [local.generate(ids, **kwargs).tolist() for ids in prompts]
    for mode in STRICT_MODES:
        # the equivocator serves the first hop: it pushes to the [3, 6) hop (the last hop pushes to nobody)
        span = (0, 3) if mode == "equivocate" else (3, 6)
        liar, = swarm.add_peers(path, [span], extra=["--adversary", mode, *FAST])
        liar_id = liar.ready["peer_id"]
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, swarm.initial_peers, verify_mode="strict", reputation_path=None)
        try:
            assert liar_id in [h.peer_id for h in model.swarm.route()], mode  # preferred before anything is measured
            if ":" in mode:  # a partial liar stays on the preferred route until it is caught: its claimed
                model.swarm.core.timed = lambda *a: None  # speed is never replaced by a measured one
            events = _watch(model)
            wrong = sum(model.generate(ids, **kwargs).tolist() != want for ids, want in zip(prompts, wants))
            assert wrong == 0, f"{mode}: {wrong} wrong generations handed over"
            routes = [(i, peers, banned) for i, (kind, peers, banned) in enumerate(events) if kind == "route"]
            assert any(liar_id in peers for _, peers, _ in routes), mode  # it served generations
            results = model.swarm.core.audits.auditor.results
            equivocations = [(i, p, e) for i, (kind, p, e) in enumerate(events)
                             if kind == "failed" and isinstance(e, Equivocation)]
            if mode == "equivocate":
                # it pushed (its own counter), the next hop's input digest gave it away, only it is blamed, and
                # the route that replaced it went around it
                assert _stats(model, liar_id)["pushes_sent"] > 0
                assert equivocations and all(p == liar_id and e.peer_id == liar_id for _, p, e in equivocations), \
                    equivocations
                replacement = next(peers for i, peers, _ in routes if i > equivocations[0][0])
                assert liar_id not in replacement, events
                # it computes honestly: audits of what it returned pass (an equivocation is caught inline)
                assert not any(r.peer_id == liar_id and r.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL)
                               for r in results)
            else:
                assert not equivocations, (mode, equivocations)
                # routed to, lied at least once (a partial liar too: 30 % of ~4 steps a generation, and it stays
                # preferred until caught), caught by an audit, banned, and never routed to once banned
                caught = [r for r in results if r.peer_id == liar_id and r.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL)]
                assert caught, (mode, results)
                assert model.swarm.core.book.status(liar_id) == Status.BANNED, mode
                after_ban = [peers for _, peers, banned in routes if liar_id in banned]
                assert after_ban and not any(liar_id in peers for peers in after_ban), (mode, routes)
                assert liar_id not in [h.peer_id for h in model.swarm.route()], mode
            honest = [r for r in results if r.peer_id != liar_id]  # never blamed (the liar as a checker may
            # leave one inconclusive, which strict mode then generates again)
            assert not any(r.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL) for r in honest), (mode, honest)
        finally:
            model.swarm.shutdown()
            liar.stop()


LONG_CON_STEPS = 4  # one 4-token generation's steps through [3, 6): its prefill and 3 decode steps
LONG_CON_KWARGS = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


@contextlib.contextmanager
def _trusted_liar(honest_swarm, tmp_path, **options):
    """Issue 24's long con, set up: a liar on [3, 6) that serves its first generation honestly, then computes
    with wrong weights on every step, and a client (``options``: ClientConfig fields) whose book says it
    passed 500 audits (trusted). It claims most, so it is preferred, and its claimed speed stands (no timing
    replaces it), so it stays preferred until caught. Yields its id, the client and the client's events
    (``_watch``)."""
    path, swarm, _ = honest_swarm
    liar, = swarm.add_peers(path, [(3, 6)], extra=["--adversary", f"wrong_weights@after={LONG_CON_STEPS}", *FAST])
    liar_id = liar.ready["peer_id"]
    try:
        book_path = str(tmp_path / "reputation.json")
        book = ReputationBook()
        for _ in range(500):
            book.record(liar_id, Verdict.PASS)
        book.save(book_path)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, swarm.initial_peers, reputation_path=book_path, **options)
        try:
            core = model.swarm.core
            assert core.book.status(liar_id) == Status.TRUSTED
            assert liar_id in [h.peer_id for h in model.swarm.route()]  # it claims most: preferred
            core.timed = lambda *a: None
            yield liar_id, model, _watch(model)
        finally:
            model.swarm.shutdown()
    finally:
        liar.stop()


def test_strict_mode_checks_a_trusted_peer_that_turns_liar(honest_swarm, tmp_path):
    """Issue 24's long con: the client's book says the liar passed 500 audits (trusted), and it serves
    [3, 6) honestly for its first generation, then with wrong weights on every step. Strict mode re-runs
    its spans like anyone's: every generation equals local, it is caught on its first lie and loses its
    standing (suspect, banned if it is routed to and lies again)."""
    local = honest_swarm[2]
    with _trusted_liar(honest_swarm, tmp_path, verify_mode="strict") as (liar_id, model, events):
        core = model.swarm.core
        prompts = [torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(seed)) for seed in range(4)]
        wrong = sum(model.generate(ids, **LONG_CON_KWARGS).tolist() != local.generate(ids, **LONG_CON_KWARGS).tolist()
                    for ids in prompts)
        assert wrong == 0, f"{wrong} of {len(prompts)} generations handed over wrong"
        assert any(kind == "route" and liar_id in peers for kind, peers, _ in events), events  # it served
        about = [r.verdict for r in core.audits.auditor.results if r.peer_id == liar_id]
        assert about[0] == Verdict.PASS, about  # honest while it waited: checked all the same
        assert Verdict.FAIL in about or Verdict.GROSS_FAIL in about, about
        assert core.book.status(liar_id) in (Status.SUSPECT, Status.BANNED)
        honest = [r for r in core.audits.auditor.results if r.peer_id != liar_id]
        assert not any(r.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL) for r in honest), honest


LONG_CON_EVERY = 4  # M: the trusted floor of the default-mode test, small so that it bites within a few generations


def test_default_mode_hands_over_at_most_the_floors_bound_from_a_trusted_peer_that_turns_liar(honest_swarm, tmp_path):
    """Issue 24's long con in default mode (background audits: generate() never waits for them), with the
    trusted floor at M = 4 (a trusted peer is audited at least once in every 4 sessions it serves): the
    liar is routed to after it turned, so wrong generations reach the user, but the floor bounds them:
    at least one (it acted), at most M since its last audit (M - 1 no audit saw, then the caught one,
    handed over too). Then it is caught (a confirmed fail) and loses its standing; no honest peer is
    blamed. The count is printed (pytest -s)."""
    local = honest_swarm[2]
    rates = AuditRates(trusted_every=LONG_CON_EVERY)
    with _trusted_liar(honest_swarm, tmp_path, verify_mode="background", audit_rates=rates) as (liar_id, model, events):
        core = model.swarm.core
        served, wrong, caught = [], 0, []
        for seed in range(3 * LONG_CON_EVERY + 2):  # 1 honest generation, then <= M lying ones, with room
            ids = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(seed))
            seen = len(events)
            wrong += model.generate(ids, **LONG_CON_KWARGS).tolist() != local.generate(ids, **LONG_CON_KWARGS).tolist()
            served.append(any(kind == "route" and liar_id in peers for kind, peers, _ in events[seen:]))
            model.swarm.wait_audits()  # its audit, if drawn, has its verdict before the next generation
            caught = [r for r in core.audits.auditor.results
                      if r.peer_id == liar_id and r.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL)]
            if caught:
                break
        print(f"\nlong con, default mode, M = {LONG_CON_EVERY}: caught after {len(served)} generations, "
              f"{wrong} wrong handed over")
        assert any(served[1:]), served  # routed to after it turned (its first generation was honest)
        assert caught, core.audits.auditor.results
        assert core.book.status(liar_id) in (Status.SUSPECT, Status.BANNED)
        assert 1 <= wrong <= LONG_CON_EVERY, f"{wrong} wrong generations handed over, bound {LONG_CON_EVERY}"
        model.swarm.wait_audits()  # once caught, the sessions it served unaudited are re-checked
        fails = [r for r in core.audits.auditor.results if r.peer_id == liar_id and r.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL)]
        assert len(fails) >= wrong, (wrong, core.audits.auditor.results)  # every wrong one found out
        honest = [r for r in core.audits.auditor.results if r.peer_id != liar_id]
        assert not any(r.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL) for r in honest), honest


def test_strict_mode_says_which_blocks_no_one_can_check(tiny_checkpoint, make_swarm):
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    swarm.add_peers(path, [(0, 3), (0, 3), (3, 6)])  # nobody else serves [3, 6)
    model = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, verify_mode="strict",
                                                            reputation_path=None)
    try:
        with pytest.raises(UnverifiableError, match=r"blocks \[3, 6\) served by"):
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=0)
        with pytest.raises(UnverifiableError, match="inference session"):
            with model.inference_session(max_length=8):
                pass
    finally:
        model.swarm.shutdown()


def test_strict_mode_waits_for_a_checker_that_is_frozen_for_a_while(tiny_checkpoint, make_swarm):
    """The only other peer of the blocks is frozen (a restart, a stall) when the generation's spans are
    checked: strict mode waits for it to answer again and generates once more, instead of refusing."""
    import signal

    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    served, checker = swarm.add_peers(path, [(0, 6), (0, 6)], extra=SLOW)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, verify_mode="strict",
                                                            reputation_path=None)
    waited = []
    wait_for_checkers = model.swarm.wait_for_checkers

    def thaw_then_wait(results, timeout):  # the client starts waiting: the checker comes back
        waited.append([r.peer_id for r in results])
        checker.signal(signal.SIGCONT)
        return wait_for_checkers(results, timeout)

    model.swarm.wait_for_checkers = thaw_then_wait
    try:
        model.swarm.core.plan = _pinned_plan(model.swarm.core, served.ready["peer_id"])
        checker.signal(signal.SIGSTOP)
        ids = torch.tensor([[5, 6, 7, 8]])
        kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        assert model.generate(ids, **kwargs).tolist() == local.generate(ids, **kwargs).tolist()
        assert waited == [[served.ready["peer_id"]]]  # its check found no checker once, and waited
        results = model.swarm.core.audits.auditor.results
        assert results[-1].verdict == Verdict.PASS and results[-1].checker == checker.ready["peer_id"]
    finally:
        checker.signal(signal.SIGCONT)
        model.swarm.shutdown()


def _pinned_plan(core, peer_id: str):
    """core.plan that routes every session (not audits' re-runs, which pick their checkers) through ``peer_id``."""
    plan = core.plan

    async def pinned(*args, exclude=frozenset(), **kwargs):
        others = frozenset(r.peer_id for r in core.records if r.peer_id != peer_id)
        return await plan(*args, exclude=exclude | others, **kwargs)
    return pinned


def test_a_peer_claiming_more_than_it_delivers_gets_no_more_traffic_than_its_speed_earns(honest_swarm):
    path, swarm, local = honest_swarm
    liar, = swarm.add_peers(path, [(3, 6)], extra=["--adversary", "slow", *FAST])  # honest, 250 ms slower
    liar_id = liar.ready["peer_id"]
    model = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, reputation_path=None)
    try:
        assert liar_id in [h.peer_id for h in model.swarm.route()]  # nothing measured yet: its claim counts
        through_liar = 0
        for seed in range(8):
            ids = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(seed))
            through_liar += liar_id in [h.peer_id for h in model.swarm.route()]
            model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        speeds = model.swarm.core.speeds
        others = sorted(v for p, v in speeds.items() if p != liar_id)
        assert speeds[liar_id] > others[len(others) // 2]  # measured slower than the median honest peer
        assert through_liar <= 2, f"{through_liar} of 8 routes went through the peer that claims most"
        assert liar_id not in [h.peer_id for h in model.swarm.route()]
    finally:
        model.swarm.shutdown()
        liar.stop()


def test_a_banned_liar_back_with_a_new_identity_on_the_same_address_starts_as_a_suspect(honest_swarm):
    import socket

    path, swarm, local = honest_swarm
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extra = ["--adversary", "identity", *FAST, "--port", str(port)]
    liar, = swarm.add_peers(path, [(3, 6)], extra=extra)
    liar_id = liar.ready["peer_id"]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, swarm.initial_peers, audit_rates=AuditRates.always(), verify_mode="redo", reputation_path=None)
    try:
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        want = local.generate(ids, **kwargs).tolist()
        assert model.generate(ids, **kwargs).tolist() == want
        book = model.swarm.core.book
        assert book.status(liar_id) == Status.BANNED
        liar.stop()
        again, = swarm.add_peers(path, [(3, 6)], extra=extra)  # a fresh key, the same address
        try:
            new_id = again.ready["peer_id"]
            assert new_id != liar_id
            model.swarm.loop.run(model.swarm.core.refresh())
            assert book.status(new_id) == Status.SUSPECT and book.entry(new_id).linked_to == liar_id
            # audited every session, and a route pays 3x its expected time to go through it (1.25x for a newcomer)
            assert standing_cost(book.status(new_id), model.swarm.cfg.audit_rates) == 3.0
            assert model.generate(ids, **kwargs).tolist() == want
        finally:
            again.stop()
    finally:
        model.swarm.shutdown()
        liar.stop()


def test_split_audits_catch_a_liar_no_single_peer_can_check(tiny_checkpoint, make_swarm):
    """The liar alone serves [0, 6) whole: other peers split it differently, and a chain of two of them
    re-runs its span (another chain referees)."""
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    swarm.add_peers(path, [(0, 3), (3, 6), (0, 2), (2, 6)], extra=SLOW)
    liar, = swarm.add_peers(path, [(0, 6)], extra=["--adversary", "wrong_weights", *FAST])
    liar_id = liar.ready["peer_id"]
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, swarm.initial_peers, audit_rates=AuditRates.always(), verify_mode="redo", reputation_path=None)
    try:
        assert [h.peer_id for h in model.swarm.route()] == [liar_id]
        ids = torch.tensor([[5, 6, 7, 8, 9]])
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert model.generate(ids, **kwargs).tolist() == local.generate(ids, **kwargs).tolist()
        caught = [r for r in model.swarm.core.audits.auditor.results if r.peer_id == liar_id]
        assert caught[0].verdict in (Verdict.FAIL, Verdict.GROSS_FAIL)
        assert "+" in caught[0].checker and "+" in caught[0].referee
        assert model.swarm.core.book.status(liar_id) == Status.BANNED
        honest = [r for r in model.swarm.core.audits.auditor.results if r.peer_id != liar_id]
        assert all(r.verdict == Verdict.PASS for r in honest), honest  # each honest span is checkable too
    finally:
        model.swarm.shutdown()


def test_a_fraud_proof_makes_a_fresh_client_avoid_the_liar_before_its_first_session(honest_swarm):
    """One client catches a liar and publishes a proof of what the liar signed; a second client, whose book
    knows nothing, judges the proof at start (re-running the liar's inputs on other peers) and bans the
    liar before it plans a route, so the liar is never routed to although it claims to be the fastest."""
    path, swarm, local = honest_swarm
    liar, = swarm.add_peers(path, [(3, 6)], extra=["--adversary", "wrong_weights", *FAST])
    liar_id = liar.ready["peer_id"]
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    accuser = AutoDistributedModelForCausalLM.from_pretrained(
        path, swarm.initial_peers, audit_rates=AuditRates.always(), verify_mode="redo", reputation_path=None)
    try:
        ids = torch.tensor([[9, 8, 7, 6, 5]])
        assert liar_id in [h.peer_id for h in accuser.swarm.route()]
        assert accuser.generate(ids, **kwargs).tolist() == local.generate(ids, **kwargs).tolist()
        accuser.swarm.wait_audits()
        published = accuser.swarm.core.audits.proofs.published
        assert [p.accused for p in published] == [liar_id]
        proof = accuser.swarm.core.audits.proofs.kept[published[0].digest]
        assert proof.claims and proofs.check(proof) is None  # the liar's own signatures on its lies
        assert (liar_id, "signed") in _health_proofs(swarm)  # the health page lists it
        fresh = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, reputation_path=None)
        try:
            core = fresh.swarm.core
            assert core.audits.proofs.rulings[(accuser.swarm.identity.peer_id, published[0].digest)] == "proven"
            assert core.book.status(liar_id) == Status.BANNED  # before its first session
            events = _watch(fresh)
            ids = torch.tensor([[4, 5, 6, 7, 8]])
            assert fresh.generate(ids, **kwargs).tolist() == local.generate(ids, **kwargs).tolist()
            routes = [peers for kind, peers, _ in events if kind == "route"]
            assert routes and not any(liar_id in peers for peers in routes), events
        finally:
            fresh.swarm.shutdown()
    finally:
        accuser.swarm.shutdown()
        liar.stop()


def _health_proofs(swarm) -> list[tuple[str, str]]:
    """(accused, status) of every fraud proof a health monitor sees in the swarm."""
    import asyncio

    from dht.node import Node
    from health.monitor import Monitor

    async def look():
        node = await Node.start(None, swarm.initial_peers, client_mode=True)
        try:
            monitor = Monitor(node)
            await monitor.start()
            return [(p.accused, p.status) for m in monitor.latest.models for p in m.proofs]
        finally:
            await node.shutdown()
    return asyncio.run(look())


def test_back_to_back_generations_take_at_most_one_wrong_one_from_a_new_liar(honest_swarm):
    """Default mode, generations back to back (no pause for audits): the next session waits for the running
    audit of a peer not trusted yet before routing through it, so a new liar hands over one wrong generation,
    not two (bench.soak saw two when the second session was planned while the first's audit still ran)."""
    path, swarm, local = honest_swarm
    liar, = swarm.add_peers(path, [(3, 6)], extra=["--adversary", "wrong_weights", *FAST])
    liar_id = liar.ready["peer_id"]
    model = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, reputation_path=None)
    try:
        import asyncio

        events, core = _watch(model), model.swarm.core
        # the first audit finishes only once the next session is being planned (the soak's race, made certain)
        planned, replay, next_planned = core.plan, core.audits.auditor.replay, []

        async def plan(*args, **kwargs):
            if not next_planned:
                next_planned.append(asyncio.Event())
            if sum(kind == "route" for kind, _, _ in events) >= 1:
                next_planned[0].set()
            return await planned(*args, **kwargs)

        async def late_replay(*args):
            await next_planned[0].wait()
            return await replay(*args)

        core.plan, core.audits.auditor.replay = plan, late_replay
        kwargs = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
        prompts = [torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(100 + n)) for n in range(3)]
        wrong = [model.generate(ids, **kwargs).tolist() != local.generate(ids, **kwargs).tolist() for ids in prompts]
        routes = [peers for kind, peers, _ in events if kind == "route"]
        assert liar_id in routes[0] and wrong[0], (routes, wrong)  # it was routed to and lied
        assert sum(wrong) == 1, wrong
        assert model.swarm.core.book.status(liar_id) == Status.BANNED
    finally:
        model.swarm.shutdown()
        liar.stop()


def _served_spans(model, hidden_size: int) -> list:
    """What each peer of one honest session (prefill + one decode step) served this client, signed."""
    with model.swarm.open_session(1, 8) as session:
        session.step(torch.randn(1, 4, hidden_size), torch.arange(4).unsqueeze(0), None)
        session.step(torch.randn(1, 1, hidden_size), torch.tensor([[4]]), None)
        return [hop.served() for hop in session._core.hops]


def test_a_proof_that_does_not_hold_bans_its_accuser_not_the_accused(honest_swarm):
    """Two slanderers publish proofs against honest peers: one with outputs the peer did sign (they re-run
    the same elsewhere: refuted), one with a signature that is not the peer's (forged). A fresh client
    bans both authors and neither accused."""
    path, swarm, local = honest_swarm
    slanderers = [AutoDistributedModelForCausalLM.from_pretrained(
        path, swarm.initial_peers, audit_rates=AuditRates.never(), reputation_path=None) for _ in range(2)]
    try:
        accused = []
        for n, slanderer in enumerate(slanderers):
            span = _served_spans(slanderer, local.config.hidden_size)[-1]
            proof = proofs.build(span, slanderer.swarm.cfg.model_id, slanderer.swarm.identity.peer_id)
            assert proof is not None and proofs.check(proof) is None  # an honest peer's signed work
            if n == 1:
                claim = proof.claims[-1]
                bad = dataclasses.replace(claim.receipt, signature=bytes(64))
                proof = dataclasses.replace(proof, claims=proof.claims[:-1] + (dataclasses.replace(claim, receipt=bad),))
            assert slanderer.swarm.loop.run(slanderer.swarm.core.audits.proofs.publish(proof), timeout=30)
            accused.append(span.peer_id)
        judge = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, reputation_path=None)
        try:
            core = judge.swarm.core
            rulings = {author: ruling for (author, _), ruling in core.audits.proofs.rulings.items()}
            assert not core.audits.proofs.retry_at.keys() & {(s.swarm.identity.peer_id, d) for s in slanderers
                                                                 for d in s.swarm.core.audits.proofs.kept}
            refuted, forged = (s.swarm.identity.peer_id for s in slanderers)
            assert rulings[refuted] == "refuted" and "signature" in rulings[forged], rulings
            assert core.book.status(refuted) == Status.BANNED and core.book.status(forged) == Status.BANNED
            assert not any(core.book.status(p) == Status.BANNED for p in accused)
        finally:
            judge.swarm.shutdown()
    finally:
        for slanderer in slanderers:
            slanderer.swarm.shutdown()
