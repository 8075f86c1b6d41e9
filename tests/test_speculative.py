"""Speculative decoding through the swarm with transformers' generate() unchanged: prompt lookup and
draft models check several tokens per trip, rejected draft tokens are rolled back on every hop (a flag
on the next step, no extra message), and the outputs equal local transformers'.

One swarm for the module: a tiny Llama over [0, 3) + [3, 6), with a spare [3, 6) for the failover case."""

from __future__ import annotations

import signal

import pytest
import torch
from transformers import AutoModelForCausalLM, LogitsProcessorList

from client import AutoDistributedModelForCausalLM
from client.session import SessionCore
import wire
from tests.test_failover import OnStep, _current_route


@pytest.fixture(scope="module")
def swarm(make_swarm, path):
    swarm = make_swarm()
    swarm.path = path
    swarm.peers = swarm.add_peers(path, [(0, 3), (3, 6), (3, 6)])
    return swarm


@pytest.fixture(scope="module")
def models(swarm, path):
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, step_timeout=5.0,
                                                             refresh_period=1.0, ban_base=1.0)
    yield local, remote
    remote.swarm.shutdown()


class _Crops(list):
    expect_failover = False


@pytest.fixture
def crops(monkeypatch, models):
    """Every roll-back a session makes: (tokens before, tokens kept). Checks afterwards that no peer
    failed meanwhile (a failover would replay the session and hide a broken roll-back)."""
    retries = models[1].swarm.core.retries
    seen = _Crops()
    original = SessionCore.crop

    def spy(self, length):
        seen.append((self.position, length))
        return original(self, length)

    monkeypatch.setattr(SessionCore, "crop", spy)
    yield seen
    failovers = models[1].swarm.core.retries - retries
    assert failovers >= 1 if seen.expect_failover else failovers == 0, f"{failovers} failovers"


def _repetitive(seed: int, length: int = 24) -> torch.Tensor:
    """A prompt that repeats a short phrase: prompt lookup finds drafts in it."""
    phrase = torch.randint(3, 250, (6,), generator=torch.Generator().manual_seed(seed))
    return phrase.repeat(length // 6)[None, :length]


def _draft(tiny_checkpoint, seed: int):
    """A different tiny Llama with the same vocabulary: its drafts are often rejected."""
    return AutoModelForCausalLM.from_pretrained(tiny_checkpoint("llama", hidden_size=32, intermediate_size=64,
                                                                num_hidden_layers=2, num_attention_heads=2,
                                                                num_key_value_heads=1), dtype=torch.float32).eval()


def test_prompt_lookup_equals_local_greedy(models, crops):
    local, remote = models
    ids = _repetitive(0)
    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    ref = local.generate(ids, **kwargs)
    out = remote.generate(ids, prompt_lookup_num_tokens=4, **kwargs)
    assert out.tolist() == ref.tolist()
    assert out.tolist() == local.generate(ids, prompt_lookup_num_tokens=4, **kwargs).tolist()
    assert crops, "no draft token was ever rejected: the roll-back path was not exercised"


def test_a_draft_that_is_often_wrong_still_gives_local_tokens(models, crops, tiny_checkpoint):
    local, remote = models
    draft = _draft(tiny_checkpoint, 1)
    ids = _repetitive(1, 12)
    kwargs = dict(max_new_tokens=16, do_sample=False, pad_token_id=0)
    ref = local.generate(ids, **kwargs)
    assert remote.generate(ids, assistant_model=draft, **kwargs).tolist() == ref.tolist()
    assert len(crops) >= 3


def test_a_draft_that_always_agrees_checks_several_tokens_per_trip(models, crops, path, monkeypatch):
    local, remote = models
    steps = []
    original = SessionCore.step

    async def count(self, hidden, *args, **kwargs):
        if self.rpc == wire.RPC_INFERENCE:  # not the background audits of earlier tests' sessions
            steps.append(hidden.shape[1])
        return await original(self, hidden, *args, **kwargs)

    monkeypatch.setattr(SessionCore, "step", count)
    ids = _repetitive(2, 12)
    kwargs = dict(max_new_tokens=24, do_sample=False, pad_token_id=0)
    same = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # a random model is never confident: let it draft 6 tokens every time (transformers stops at 0.4)
    same.generation_config.update(assistant_confidence_threshold=0.0, num_assistant_tokens=6,
                                  num_assistant_tokens_schedule="constant")
    assert remote.generate(ids, assistant_model=same, **kwargs).tolist() == local.generate(ids, **kwargs).tolist()
    assert len(steps) <= 1 + 24 / 5, f"{len(steps)} trips for 24 tokens: {steps}"
    assert min(steps[1:-1]) >= 5, steps  # drafted tokens checked per round trip


def test_sampled_speculative_run_equals_local_with_the_same_draft_and_seed(models, tiny_checkpoint):
    local, remote = models
    draft = _draft(tiny_checkpoint, 1)
    ids = _repetitive(3, 12)
    kwargs = dict(max_new_tokens=12, do_sample=True, top_k=30, pad_token_id=0, assistant_model=draft)
    torch.manual_seed(11)
    ref = local.generate(ids, **kwargs)
    torch.manual_seed(11)
    assert remote.generate(ids, **kwargs).tolist() == ref.tolist()


def test_failover_during_a_speculative_run(swarm, models, crops):
    """The peer of [3, 6) is SIGKILLed mid-run: its replacement is rebuilt from the accepted tokens only."""
    local, remote = models
    ids = _repetitive(4)
    by_id = {p.ready["peer_id"]: p for p in swarm.peers}
    killed = []

    def kill(step):
        if step == 6 and not killed:
            victim = by_id[next(h for h in _current_route(remote) if h.start == 3).peer_id]
            victim.signal(signal.SIGKILL)
            killed.append(victim)

    kwargs = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    ref = local.generate(ids, **kwargs)
    crops.expect_failover = True
    out = remote.generate(ids, prompt_lookup_num_tokens=4, logits_processor=LogitsProcessorList([OnStep(kill)]),
                          **kwargs)
    assert killed
    assert out.tolist() == ref.tolist()
    assert crops


@pytest.mark.parametrize("sample", [False, True])
def test_beam_search_equals_local(models, sample):
    """Beam search (and beam sampling): the peers' caches follow the beams inside the next step's message."""
    local, remote = models
    lengths = [5, 9]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, 9 - n:] = _repetitive(10 + row, 12)[0, :n]
        mask[row, 9 - n:] = 1
    kwargs = dict(attention_mask=mask, num_beams=3, num_return_sequences=2, max_new_tokens=8, do_sample=sample,
                  pad_token_id=0, early_stopping=True)
    if sample:
        kwargs["top_k"] = 20
    torch.manual_seed(5)
    ref = local.generate(ids, **kwargs)
    torch.manual_seed(5)
    assert remote.generate(ids, **kwargs).tolist() == ref.tolist()


def test_beam_search_survives_a_failover(swarm, models):
    """A hop killed mid-search is rebuilt from the reordered inputs and gives the local beams."""
    local, remote = models
    alive = [p for p in swarm.peers if p.alive() and p.ready["blocks"] == [3, 6]]
    if len(alive) < 2:  # the speculative failover test killed one
        swarm.peers += swarm.add_peers(swarm.path, [(3, 6)])
    by_id = {p.ready["peer_id"]: p for p in swarm.peers}
    killed = []

    def kill(step):
        if step == 4 and not killed:
            victim = by_id[next(h for h in _current_route(remote) if h.start == 3).peer_id]
            victim.signal(signal.SIGKILL)
            killed.append(victim)

    ids = _repetitive(7, 10)
    kwargs = dict(num_beams=3, max_new_tokens=10, do_sample=False, pad_token_id=0)
    ref = local.generate(ids, **kwargs)
    out = remote.generate(ids, logits_processor=LogitsProcessorList([OnStep(kill)]), **kwargs)
    assert killed
    assert out.tolist() == ref.tolist()
