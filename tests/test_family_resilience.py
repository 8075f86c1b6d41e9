"""Audits and failover on a MoE family (Mixtral) and an ALiBi family (BLOOM), in real swarms: a lying
peer is caught and the generation it served is redone, and a peer killed mid-generation is replaced by
replay; the tokens always equal local transformers'. (The dense family, Llama, has the full suites in
test_verify_swarm.py and test_failover.py.) Push is on, as by default."""

from __future__ import annotations

import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

from client import AutoDistributedModelForCausalLM
from tests.test_failover import OnStep
from verify.policy import AuditRates
from verify.reputation import Status, Verdict

SLOW = ["--throughput", "10"]  # honest peers look slow, so the liar is routed through first
FAST = ["--throughput", "10000"]


@pytest.fixture(scope="module", params=["mixtral", "bloom"])
def fleet(request, tiny_checkpoint, swarm):  # conftest's swarm: one DHT node for both families
    path = tiny_checkpoint(request.param)
    procs = swarm.add_peers(path, [(0, 3), (3, 6), (0, 3), (3, 6)], extra=SLOW)
    try:
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        yield path, swarm, procs, local
    finally:
        swarm.stop(procs)  # one family's peers at a time


def _prompt(seed: int, length: int = 8) -> torch.Tensor:
    return torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(seed))


def test_a_lying_peer_is_caught_and_its_generation_redone(fleet):
    path, swarm, _, local = fleet
    liar, = swarm.add_peers(path, [(3, 6)], extra=["--adversary", "noise", *FAST])
    liar_id = liar.ready["peer_id"]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, swarm.initial_peers, audit_rates=AuditRates.always(), verify_mode="redo", reputation_path=None)
    try:
        ids = _prompt(1)
        kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert model.generate(ids, **kwargs).tolist() == local.generate(ids, **kwargs).tolist()
        book = model.swarm.core.book
        assert book.status(liar_id) == Status.BANNED
        caught = [r for r in model.swarm.core.audits.auditor.results if r.peer_id == liar_id]
        assert caught and caught[-1].verdict in (Verdict.FAIL, Verdict.GROSS_FAIL)
        honest = [r for r in model.swarm.core.audits.auditor.results if r.peer_id != liar_id]
        assert all(r.verdict in (Verdict.PASS, Verdict.IMPOSSIBLE) for r in honest), honest
    finally:
        model.swarm.shutdown()
        liar.stop()


def test_a_peer_killed_mid_generation_is_replaced_exactly(fleet):
    path, swarm, procs, local = fleet
    by_id = {p.ready["peer_id"]: p for p in procs}
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, swarm.initial_peers, step_timeout=3.0, refresh_period=1.0, ban_base=1.0, reputation_path=None)
    killed = []

    def kill(step):
        if step == 4:
            victim = by_id[model._generate_sessions[0].route[1].peer_id]
            victim.signal(signal.SIGKILL)
            killed.append(victim)

    try:
        ids = _prompt(2)
        ref = local.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        out = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([OnStep(kill)]))
        assert killed and out.tolist() == ref.tolist()
        assert model.swarm.core.retries >= 1
    finally:
        model.swarm.shutdown()
