"""Lying peers in a real swarm: audits catch each adversary mode, routing then avoids the liar, and the
generation it served is generated again (verify_mode="redo"), so the user gets exactly local's tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from verify.policy import AuditRates
from verify.reputation import Status, Verdict

FAST = ["--throughput", "10000"]  # the liar looks fastest, so routes go through it first
SLOW = ["--throughput", "10"]  # 0.1 s per step: far costlier than any loopback round trip


@pytest.fixture(scope="module")
def honest_swarm(tiny_checkpoint, make_swarm):
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    swarm.add_peers(path, [(0, 6), (3, 6), (3, 6)], extra=SLOW)  # two honest checkers for [3, 6)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, swarm, local


@pytest.mark.parametrize("mode", ["noise", "identity", "skip", "wrong_weights", "low_precision", "noise:0.3"])
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
        caught = [r for r in model.swarm.core.auditor.results if r.peer_id == liar_id]
        assert caught and caught[-1].verdict in (Verdict.FAIL, Verdict.GROSS_FAIL)
        assert caught[-1].referee is not None  # confirmed 2 of 3
        assert liar_id not in [h.peer_id for h in model.swarm.route()]
        honest = [r for r in model.swarm.core.auditor.results if r.peer_id != liar_id]
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
        results = model.swarm.core.auditor.results
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
