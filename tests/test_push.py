"""Issue 6 through a real swarm: server-to-server push (and its fallback), pipelined prefill of a long
prompt, 16-bit wire transport, and decode steps of concurrent sessions batched on the peers."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from client import hop as client_hop

SPANS = [(0, 2), (2, 4), (4, 6)]


@pytest.fixture(scope="module")
def push_swarm(tiny_checkpoint, make_swarm):
    """(checkpoint, local model, swarm) of 3 peers over a tiny Llama that accepts 4k-token prompts."""
    path = tiny_checkpoint("llama", max_position_embeddings=8192)
    swarm = make_swarm()
    swarm.add_peers(path, SPANS, extra=["--cache-tokens", "20000"])
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return path, local, swarm


@pytest.fixture(scope="module")
def remote(push_swarm):
    path, _, swarm = push_swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, max_chunk_tokens=512)
    yield model
    model.swarm.shutdown()


def _prompt(length: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (1, length), generator=g)


def _stats(model) -> dict[int, dict]:
    """Each peer's statistics (its info RPC), by the first block it serves."""
    core = model.swarm.core
    out = {}
    for record in model.swarm.loop.run(_fetch(core)):
        meta, _ = model.swarm.loop.run(core.transport.info(record.peer_id))
        out[record.start] = meta
    return out


async def _fetch(core):
    await core.refresh()
    return core.records


def test_push_is_exact_and_peers_forward_to_each_other(push_swarm, remote):
    _, local, _ = push_swarm
    before = _stats(remote)
    ids = _prompt(9)
    ref = local.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with remote.inference_session(max_length=32) as session:
        out = remote.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert [(h.start, h.end) for h in session.route] == SPANS
    assert out.tolist() == ref.tolist()
    after = _stats(remote)
    steps = 10  # one prefill + 9 decode steps reach each hop
    assert after[0]["pushes_received"] == before[0]["pushes_received"]  # the client sends to the first hop
    for start in (2, 4):
        assert after[start]["pushes_received"] - before[start]["pushes_received"] == steps
    for start in (0, 2):
        assert after[start]["pushes_sent"] - before[start]["pushes_sent"] == steps
    assert after[4]["pushes_sent"] == before[4]["pushes_sent"]  # the last hop answers only the client


def test_relay_mode_is_exact_and_pushes_nothing(push_swarm):
    path, local, swarm = push_swarm
    relay = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, push=False)
    try:
        before = _stats(relay)
        ids = _prompt(6, seed=2)
        ref = local.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert relay.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0).tolist() == ref.tolist()
        after = _stats(relay)
        assert all(after[s]["pushes_received"] == before[s]["pushes_received"] for s in (0, 2, 4))
    finally:
        relay.swarm.shutdown()


def test_a_link_that_cannot_push_is_relayed_by_the_client(push_swarm, remote, monkeypatch, caplog):
    """The second peer is told a session id the third does not have: its pushes fail, it says so in its
    result, and the client relays that link itself; the tokens do not change."""
    _, local, _ = push_swarm
    real = client_hop.HopSession.push_target

    def broken(self):
        target = real(self)
        return {**target, "session_id": "no-such-session"} if self.hop.start == 4 else target

    monkeypatch.setattr(client_hop.HopSession, "push_target", broken)
    before = _stats(remote)
    ids = _prompt(8, seed=3)
    ref = local.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with caplog.at_level(logging.INFO, logger="client.step"):
        assert remote.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0).tolist() == ref.tolist()
    after = _stats(remote)
    assert after[2]["pushes_failed"] - before[2]["pushes_failed"] == 5
    assert after[2]["errors"].get("unknown_session", 0) == before[2]["errors"].get("unknown_session", 0)
    assert after[4]["pushes_received"] == before[4]["pushes_received"]
    assert after[2]["pushes_received"] - before[2]["pushes_received"] == 5  # the first link still pushes
    assert "relaying that link" in caplog.text


def test_4k_token_prompt_is_prefilled_in_pipelined_chunks(push_swarm, remote):
    """4096 tokens in chunks of 512: all eight go to the first peer at once and flow down the route."""
    _, local, _ = push_swarm
    ids = _prompt(4096, seed=4)
    ref = local.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    before = _stats(remote)
    out = remote.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.tolist() == ref.tolist()
    after = _stats(remote)
    assert after[4]["pushes_received"] - before[4]["pushes_received"] == 8 + 2


def test_bfloat16_wire_halves_the_bytes_and_stays_close(push_swarm):
    path, local, swarm = push_swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, wire_dtype="bfloat16")
    try:
        ids = _prompt(12, seed=5)
        with torch.no_grad():
            ref = local(ids).logits
        with model.inference_session(max_length=16) as session:
            model.generate(ids, max_new_tokens=1, do_sample=False, pad_token_id=0)
            hops = session._core.hops
            assert all(o.dtype == torch.bfloat16 for h in hops for o in h.outputs)
            assert all(x.hidden.dtype == torch.bfloat16 for h in hops for x in h.history)
        with torch.no_grad():
            got = model(ids).logits
        assert got.dtype == torch.float32
        assert not torch.equal(got, ref)  # 16-bit transport rounds the hidden states
        torch.testing.assert_close(got, ref, atol=0.05 * ref.abs().max().item(), rtol=0.05)
    finally:
        model.swarm.shutdown()


def test_concurrent_sessions_are_batched_on_the_peers(push_swarm, remote):
    """Four sessions decode at once: peers run their steps together, and each session gets what it
    gets alone (within fp32 rounding)."""
    swarm = remote.swarm
    hidden = remote.config.hidden_size
    steps = 24
    inputs = [torch.randn(steps, 1, 1, hidden, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    before = _stats(remote)
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def decode(k: int) -> None:
        try:
            session = swarm.open_session(1, steps)
            try:
                results[k] = [session.step(x, torch.tensor([[t]]), None) for t, x in enumerate(inputs[k])]
            finally:
                session.close()
        except BaseException as e:  # surfaced in the main thread below
            errors.append(e)

    threads = [threading.Thread(target=decode, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 4
    after = _stats(remote)
    assert sum(after[s]["batched_steps"] - before[s]["batched_steps"] for s in (0, 2, 4)) > 0
    for k in range(2):  # alone, afterwards: the same outputs up to rounding
        session = swarm.open_session(1, steps)
        try:
            for t, x in enumerate(inputs[k]):
                torch.testing.assert_close(results[k][t], session.step(x, torch.tensor([[t]]), None),
                                           atol=1e-4, rtol=1e-4)
        finally:
            session.close()


def test_a_peer_that_pushes_other_bits_than_it_returns_is_caught(tiny_checkpoint, make_swarm):
    """An equivocating first peer returns honest hidden states to the client but pushes a noisy copy:
    the next peer's input digest gives it away, the client bans it, rebuilds the hops that computed on
    the copy, and the text is still exactly the local one."""
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    liar = swarm.add_peers(path, [(0, 2)], extra=["--adversary", "equivocate", "--throughput", "1000"])[0]
    swarm.add_peers(path, SPANS, extra=["--throughput", "50"])
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers)
    try:
        liar_id = liar.ready["peer_id"]
        assert model.swarm.route()[0].peer_id == liar_id  # the fast liar is the preferred first hop
        ids = _prompt(7, seed=6)
        ref = local.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        with model.inference_session(max_length=16) as session:
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert liar_id not in [h.peer_id for h in session.route]
        assert out.tolist() == ref.tolist()
        assert liar_id in model.swarm.core.bans.banned()
    finally:
        model.swarm.shutdown()


def test_each_side_times_the_phases_of_its_steps(push_swarm, remote):
    """Peers and the client keep where each step's time went (wire/phases.py): every phase a pushed decode
    step goes through is recorded once per step, on every peer of the route and on the client."""
    from wire.phases import CLIENT_PHASES

    before = {start: s["phases"] for start, s in _stats(remote).items()}
    client_before = remote.swarm.core.phases.counts()
    new_tokens = 6
    remote.generate(_prompt(5, seed=7), max_new_tokens=new_tokens, do_sample=False)
    after = {start: s["phases"] for start, s in _stats(remote).items()}
    steps = new_tokens  # the prompt, then a step per new token but the last
    for start, phases in after.items():
        count = {name: phases.get(name, {}).get("count", 0) - before[start].get(name, {}).get("count", 0)
                 for name in ("decode", "queue", "validate", "compute_wait", "compute", "handback", "encode", "sign",
                              "reply", "push")}
        expected_push = steps if start < SPANS[-1][0] else 0  # the last peer pushes to nobody
        assert count == {"decode": steps, "queue": steps, "validate": steps, "compute_wait": steps, "compute": steps,
                         "handback": steps, "encode": steps, "sign": steps, "reply": steps, "push": expected_push}, start
        assert phases["compute"]["p50_ms"] > 0
    client = remote.swarm.core.phases.counts()
    grew = {name: client[name] - client_before[name] for name in CLIENT_PHASES}
    assert grew == {"handoff": steps, "prepare": steps, "wait": steps, "decode": steps, "model": steps - 1}
