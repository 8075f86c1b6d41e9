"""Prefix reuse: a peer keeps the caches of recent sessions' histories (within its cache budget, least
recently used evicted first) and a session that starts with the same inputs copies them instead of
computing them, on every hop. Output unchanged.

In-process cases drive the peer's handler on a real BlockRunner; the swarm cases run a tiny Llama over
two peer processes [0, 3) + [3, 6) and compare generate() with local transformers."""

from __future__ import annotations

import asyncio
import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
import wire
from peer import prefixes
from peer.blocks import BlockRunner
from peer.handler import PeerHandler
from peer.sessions import SessionTable
from wire import WireError
from swarmllm import launch
from tests.conftest import CPU
from tests.test_failover import OnStep
from tests.test_push import _stats
from verify.policy import AuditRates


@pytest.fixture(scope="module")
def runner(path):
    return BlockRunner(path, 0, 6)


class Peer:
    """A handler over a real runner, driven step by step as its streams would drive it."""

    def __init__(self, runner: BlockRunner, budget: int = 4096, prefix_cache: bool = True):
        self.runner = runner
        self.handler = PeerHandler(runner, SessionTable(budget), prefix_cache=prefix_cache)
        self.store = self.handler.sessions.prefixes
        self._count = 0
        self.loop = asyncio.new_event_loop()  # one loop for the handler's life, as in a peer process

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def open(self, batch: int = 1, max_length: int = 256, **meta):
        self._count += 1
        return self.handler._open({"op": "open", "session_id": f"s{self._count}", "start": 0, "end": 6,
                                   "batch_size": batch, "max_length": max_length, **meta}, ephemeral=False)

    def step(self, session, hidden, positions, mask=None, **meta) -> tuple[dict, torch.Tensor]:
        tensors = [hidden, positions] + ([] if mask is None else [mask])
        meta = {"op": "step", "session_id": session.session_id, "offset": meta.pop("offset", session.length), **meta}
        reply = self.run(self.handler._step(session, meta, tensors))
        meta, out = wire.unpack(reply)
        return meta, out[0]

    def close(self, session) -> None:
        self.handler.sessions.close(session.session_id)


def _inputs(runner, tokens: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randn(batch, tokens, runner.hidden_size, generator=torch.Generator().manual_seed(seed))


def _positions(begin: int, end: int, batch: int = 1) -> torch.Tensor:
    return torch.arange(begin, end).expand(batch, -1).contiguous()


def test_a_known_prefix_is_copied_not_computed_and_gives_the_same_outputs(runner):
    peer = Peer(runner)
    prefix, tail_a, tail_b = _inputs(runner, 40, 1), _inputs(runner, 5, 2), _inputs(runner, 7, 3)
    first = peer.open()
    meta, out_a = peer.step(first, torch.cat([prefix, tail_a], 1), _positions(0, 45))
    assert "reused" not in meta
    peer.step(first, _inputs(runner, 1, 4), _positions(45, 46))  # a decode step: the entry grows
    peer.close(first)
    assert len(peer.store) == 1 and peer.store.frozen_tokens >= 46
    assert peer.handler.sessions.tokens_left == 4096  # kept prefixes make way: a session can have it all

    computed_before = peer.handler.counts.steps_computed
    second = peer.open()
    meta, out_b = peer.step(second, torch.cat([prefix, tail_b], 1), _positions(0, 47))
    assert meta["reused"] == 40 and peer.handler.counts.steps_computed - computed_before == 7
    torch.testing.assert_close(out_b[:, :40], out_a[:, :40], rtol=0, atol=0)  # the kept outputs
    # and what a fresh computation gives, up to the rounding of another chunking
    fresh = runner.forward(torch.cat([prefix, tail_b], 1), _positions(0, 47), None, runner.new_cache())
    torch.testing.assert_close(out_b, fresh, rtol=1e-5, atol=1e-5)
    # the next decode step runs on the copied cache: equal to a fresh session's
    x = _inputs(runner, 1, 5)
    _, out = peer.step(second, x, _positions(47, 48))
    cache = runner.new_cache()
    runner.forward(torch.cat([prefix, tail_b], 1), _positions(0, 47), None, cache)
    torch.testing.assert_close(out, runner.forward(x, _positions(47, 48), None, cache), rtol=1e-5, atol=1e-5)
    peer.close(second)
    assert peer.store.statistics()["prefix_tokens_reused"] == 40


def test_chunked_prefill_and_a_batch_with_padding_reuse_token_by_token(runner):
    peer = Peer(runner)
    batch = 2
    prompt = _inputs(runner, 30, 6, batch)
    mask = torch.ones(batch, 30, dtype=torch.long)
    mask[1, :4] = 0  # left padding on row 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    first = peer.open(batch)
    _, whole = peer.step(first, prompt, positions, mask)
    peer.close(first)
    second = peer.open(batch)
    outs = []
    for begin in range(0, 30, 8):  # the same prompt in chunks of 8: every chunk is copied
        meta, out = peer.step(second, prompt[:, begin:begin + 8], positions[:, begin:begin + 8],
                              mask[:, :min(begin + 8, 30)])
        assert meta["reused"] == out.shape[1]
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), whole, rtol=0, atol=0)
    peer.close(second)
    other = mask.clone()
    other[0, :2] = 0  # another mask is another history: nothing is reused
    third = peer.open(batch)
    meta, _ = peer.step(third, prompt, positions, other)
    assert "reused" not in meta
    peer.close(third)


def test_rollback_and_beam_reordering_keep_the_index_true(runner):
    peer = Peer(runner)
    prompt = _inputs(runner, 12, 7)
    first = peer.open()
    peer.step(first, prompt, _positions(0, 12))
    peer.step(first, _inputs(runner, 3, 8), _positions(12, 15))  # draft tokens, then rejected:
    peer.step(first, _inputs(runner, 2, 9), _positions(13, 15), offset=13, rewrite=True)
    assert first.prefix.tokens == 15
    peer.close(first)
    second = peer.open()
    x = _inputs(runner, 3, 8)  # the rejected draft is no longer a known history past token 13
    meta, _ = peer.step(second, torch.cat([prompt, x], 1), _positions(0, 15))
    assert meta["reused"] == 13
    peer.close(second)

    beams = peer.open(batch=2)
    peer.step(beams, _inputs(runner, 6, 10, 2), _positions(0, 6, 2))
    peer.step(beams, _inputs(runner, 1, 11, 2), _positions(6, 7, 2), reorder=[1, 1], reorders=1)
    assert beams.prefix is None  # its rows no longer follow one history each: kept as it was, not grown
    frozen = len(peer.store)
    peer.close(beams)
    assert len(peer.store) == frozen


def test_kept_prefixes_live_in_the_budget_and_the_oldest_go_first(runner):
    peer = Peer(runner, budget=80)
    table = peer.handler.sessions
    for k in range(3):  # one after another: each reserves 40 tokens while open, then leaves its history
        session = peer.open(max_length=40)
        peer.step(session, _inputs(runner, 30, 20 + k), _positions(0, 30))
        peer.close(session)
        assert table.used_tokens + table.prefixes.frozen_tokens <= table.budget_tokens
    # an entry costs its keys/values plus its outputs, in cache tokens: more than 30, so 3 do not fit
    assert len(table.prefixes) == 2 and 60 < table.prefixes.frozen_tokens <= 80
    # the newest is a hit; the oldest was evicted (least recently used first)
    probe = peer.open(max_length=40)
    assert peer.step(probe, _inputs(runner, 30, 22), _positions(0, 30))[0]["reused"] == 30
    peer.close(probe)
    probe = peer.open(max_length=40)
    assert "reused" not in peer.step(probe, _inputs(runner, 30, 20), _positions(0, 30))[0]
    peer.close(probe)
    # a session that needs the room evicts kept prefixes rather than being refused
    big = peer.open(max_length=80)
    assert table.prefixes.frozen_tokens == 0 and table.tokens_left == 0
    peer.close(big)


def test_opting_out_and_bad_flags(runner):
    peer = Peer(runner)
    session = peer.open(prefix_cache=False)
    assert session.prefix is None
    peer.step(session, _inputs(runner, 10, 30), _positions(0, 10))
    peer.close(session)
    assert len(peer.store) == 0
    with pytest.raises(WireError, match="prefix_cache must be true or false"):
        peer.open(prefix_cache="yes")
    off = Peer(runner, prefix_cache=False)
    assert off.open().prefix is None
    # another runner's entries (other weights, even of the same blocks) never match
    assert prefixes.scope(runner.prefix_nonce, 0, 6) != prefixes.scope(prefixes.new_nonce(), 0, 6)
    assert prefixes.scope(runner.prefix_nonce, 0, 6) != prefixes.scope(runner.prefix_nonce, 0, 5)


def test_a_pushed_step_may_name_its_first_inputs_by_a_kept_prefix(runner):
    peer = Peer(runner)
    prompt = _inputs(runner, 20, 40)
    first = peer.open()
    _, whole = peer.step(first, prompt, _positions(0, 20))
    peer.close(first)
    root = prefixes.root_digest(1)
    named = prefixes.chain(root, prompt, _positions(0, 20), None, 0)[15].hex()  # tokens [0, 16)
    second = peer.open()
    peer.handler._inboxes[second.session_id] = asyncio.Queue()
    peer.handler._open_sessions[second.session_id] = second

    def push(prefix, hidden):
        meta = {"op": "step", "session_id": second.session_id, "offset": 0, "prefix": prefix}
        reply = peer.run(peer.handler.rpc_push(wire.request(meta, [hidden, _positions(0, 20)]), None))
        return wire.unpack(reply)[0]

    assert push({"tokens": 16, "chain": named}, prompt[:, 16:])["op"] == "queued"
    item = peer.handler._inboxes[second.session_id].get_nowait()
    assert "prefix" not in item.meta and torch.equal(item.tensors[0], prompt)  # rebuilt in full
    meta, out = peer.step(second, *item.tensors)
    assert meta["reused"] == 20 and torch.equal(out, whole)
    # a prefix it does not keep, or a malformed one, is refused: the pusher sends the step in full
    assert push({"tokens": 16, "chain": "00" * 32}, prompt[:, 16:])["error"]["code"] == "unknown_prefix"
    assert push({"tokens": 15, "chain": named}, prompt[:, 15:])["error"]["code"] == "unknown_prefix"
    for bad in ({"tokens": 0, "chain": named}, {"tokens": 16, "chain": "zz" * 32}, "yes", {"tokens": True}):
        assert push(bad, prompt[:, 16:])["error"]["code"] == "bad_request"
    assert peer.handler._inboxes[second.session_id].empty()
    peer.close(second)


def test_replies_name_reused_outputs_and_a_fetch_hands_them_over(runner):
    peer = Peer(runner)
    prompt = _inputs(runner, 24, 50)
    first = peer.open()
    _, whole = peer.step(first, prompt, _positions(0, 24))
    peer.close(first)
    second = peer.open(lazy_outputs=True)
    peer.handler._open_sessions[second.session_id] = second
    meta, tail = peer.step(second, torch.cat([prompt, _inputs(runner, 2, 51)], 1), _positions(0, 26))
    # 24 reused: their outputs stay on the peer, committed to by their digest; the rest are sent
    assert meta["reused"] == 24 and meta["omitted"] == 24 and tail.shape[1] == 2
    assert meta["omitted_digest"] == wire.digest(whole)

    def fetch(**fields):
        request = wire.request({"session_id": second.session_id, "kind": "outputs", "offset": 0, "tokens": 24,
                                **fields}, [])
        return wire.unpack(peer.run(peer.handler.rpc_fetch(request, None)))

    meta, got = fetch()
    assert meta["op"] == "fetched" and torch.equal(got[0], whole)
    _, got = fetch(kind="inputs", offset=4, tokens=8)
    assert torch.equal(got[0], prompt[:, 4:12])
    assert fetch(tokens=27)[0]["error"]["code"] == "unknown_prefix"  # more than the session holds
    assert fetch(session_id="nope")[0]["error"]["code"] == "unknown_session"
    for bad in ({"kind": "weights"}, {"tokens": 0}, {"offset": -1}, {"tokens": "24"}):
        assert fetch(**bad)[0]["error"]["code"] == "bad_request"
    # a step marked full, the last token, and a client that did not opt in: always sent
    meta, out = peer.step(second, _inputs(runner, 1, 52), _positions(26, 27), full_outputs=True)
    assert "omitted" not in meta and out.shape[1] == 1
    peer.close(second)
    plain = peer.open()
    meta, out = peer.step(plain, prompt, _positions(0, 24))
    assert meta["reused"] == 24 and "omitted" not in meta and torch.equal(out, whole)
    peer.close(plain)


def test_a_probe_finds_the_longest_kept_history_and_pins_it(runner):
    peer = Peer(runner)
    prompt = _inputs(runner, 40, 60)
    first = peer.open()
    _, whole = peer.step(first, prompt, _positions(0, 40))
    peer.close(first)
    chain = prefixes.chain(prefixes.root_digest(1), prompt, _positions(0, 40), None, 0)
    other = prefixes.chain(prefixes.root_digest(1), _inputs(runner, 40, 61), _positions(0, 40), None, 0)

    def probe(session, positions, digests, **fields):
        return peer.handler._probe(session, {"op": "probe", "offset": 0, "positions": positions,
                                             "digests": [d.hex() for d in digests], **fields})

    second = peer.open()
    assert probe(second, [8, 16, 32, 48], [chain[7], chain[15], chain[31], other[39]])["tokens"] == 32
    assert second.pinned is not None and peer.handler.counts.probe_hits == 1
    assert probe(second, [8], [other[7]])["tokens"] == 0
    for bad in ({"positions": [16, 8]}, {"positions": [0]}, {"digests": ["zz"]}, {"positions": "8"}):
        with pytest.raises(WireError, match="a probe carries"):
            peer.handler._probe(second, {"offset": 0, "positions": [8], "digests": [chain[7].hex()], **bad})
    # the found history is pinned: evicted meanwhile, the session's next step may still name it
    probe(second, [32], [chain[31]])
    while peer.store.evict_one():
        pass
    meta = {"op": "step", "session_id": second.session_id, "offset": 0,
            "prefix": {"tokens": 31, "chain": chain[30].hex()}}
    meta, tensors = peer.handler._resolve_prefix(second, meta, [prompt[:, 31:], _positions(0, 40)])
    assert torch.equal(tensors[0], prompt) and meta["named_tokens"] == 31
    reply, out = wire.unpack(peer.run(peer.handler._step(second, meta, tensors)))
    assert reply["input_split"] == 31 and reply["input_digests"][0] == wire.digest(prompt[:, :31])
    assert torch.equal(out[0], whole) and second.pinned is None
    peer.close(second)


# ---- through the swarm --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarm(make_swarm, path):
    swarm = make_swarm()
    swarm.peers = swarm.add_peers(path, [(0, 3), (3, 6)])
    return swarm


@pytest.fixture(scope="module")
def models(swarm, path):
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, step_timeout=10.0)
    yield local, remote
    remote.swarm.shutdown()


def _reused(model) -> dict[int, int]:
    return {start: stats["prefix_tokens_reused"] for start, stats in _stats(model).items()}


def test_a_new_session_with_a_known_prefix_skips_it_on_every_hop(models, path, swarm):
    local, remote = models
    g = torch.Generator().manual_seed(40)
    system = torch.randint(3, 250, (1, 150), generator=g)  # a system prompt both chats start with
    first = torch.cat([system, torch.randint(3, 250, (1, 9), generator=g)], 1)
    second = torch.cat([system, torch.randint(3, 250, (1, 11), generator=g)], 1)
    kwargs = dict(max_new_tokens=6, do_sample=False)
    assert torch.equal(remote.generate(first, **kwargs), local.generate(first, **kwargs))
    before = _reused(remote)
    # another client, prefilling in chunks of 64: the histories match token by token, not by message
    chunked = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, max_chunk_tokens=64)
    try:
        assert torch.equal(chunked.generate(second, **kwargs), local.generate(second, **kwargs))
        after = _reused(remote)
        assert {s: after[s] - before[s] for s in after} == {0: 150, 3: 150}
        # the first peer named those 150 inputs to the second instead of sending them
        assert _stats(remote)[0]["prefix_pushes"] >= 1
        # a client that opts out neither reuses nor leaves its history behind
        shy = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, prefix_cache=False)
        try:
            kept = {s: stats["prefix_entries"] for s, stats in _stats(remote).items()}
            assert torch.equal(shy.generate(second, **kwargs), local.generate(second, **kwargs))
            assert _reused(remote) == after
            assert {s: stats["prefix_entries"] for s, stats in _stats(remote).items()} == kept
        finally:
            shy.swarm.shutdown()
    finally:
        chunked.swarm.shutdown()


def test_a_repeated_left_padded_batch_equals_local(models):
    local, remote = models
    g = torch.Generator().manual_seed(41)
    ids = torch.randint(3, 250, (2, 20), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    want = local.generate(ids, **kwargs)
    assert torch.equal(remote.generate(ids, **kwargs), want)
    before = _reused(remote)
    assert torch.equal(remote.generate(ids, **kwargs), want)  # every prompt token and the decode steps
    after = _reused(remote)
    assert all(after[s] - before[s] >= 2 * 20 for s in after)


def _delta(model, before: dict, name: str) -> dict[int, int]:
    return {start: stats[name] - before[start][name] for start, stats in _stats(model).items()}


def test_a_known_prompt_is_named_not_uploaded_nor_returned_and_audits_fetch_it(swarm, path, models):
    local, _ = models
    client = AutoDistributedModelForCausalLM.from_pretrained(
        path, swarm.initial_peers, probe_min_bytes=0, audit_rates=AuditRates.always(), reputation_path=None)
    try:
        ids = torch.randint(3, 250, (1, 90), generator=torch.Generator().manual_seed(70))
        kwargs = dict(max_new_tokens=5, do_sample=False)
        want = local.generate(ids, **kwargs)
        assert torch.equal(client.generate(ids, **kwargs), want)
        client.swarm.wait_audits()
        before = _stats(client)
        assert torch.equal(client.generate(ids, **kwargs), want)  # the whole prompt is a known history
        # the first peer told the client it keeps it (the client named it instead of uploading it), and
        # both peers named their outputs for it instead of returning them
        assert _delta(client, before, "probe_hits")[0] == 1
        assert all(n >= 89 for n in _delta(client, before, "outputs_omitted").values())
        client.swarm.wait_audits()  # every span is audited: what the replies named was fetched for it
        assert all(n >= 1 for n in _delta(client, before, "fetches").values())
        assert not client.swarm.core.book.banned()
    finally:
        client.swarm.shutdown()


def test_failover_after_replies_named_outputs_equals_local(swarm, path, models):
    """Kill the first peer, then the second, right after a prefill whose outputs they named: the client
    fetches what it needs from the surviving neighbour and replays into a fresh peer (this test replaces
    the module's peers, so it runs last)."""
    local, remote = models
    ids = torch.randint(3, 250, (1, 60), generator=torch.Generator().manual_seed(71))
    kwargs = dict(max_new_tokens=6, do_sample=False)
    want = local.generate(ids, **kwargs)
    assert torch.equal(remote.generate(ids, **kwargs), want)
    for victim_index, (a, b) in ((0, (0, 3)), (1, (3, 6))):
        assert torch.equal(remote.generate(ids, **kwargs), want)  # the route keeps the prompt (again)
        seen = {}

        def kill(step):
            if step == 1:
                session = remote._generate_sessions[0]
                seen["holes"] = len(session._core.holes)
                victim = next(p for p in swarm.peers if p.ready["peer_id"] == session.route[victim_index].peer_id)
                victim.signal(signal.SIGKILL)
                fresh = launch.start_peer(path, swarm.initial_peers, a, b, name=f"peer{a}-{b}", wait=False,
                                          forked=swarm.forked, extra=CPU)
                swarm.procs.append(fresh)
                swarm.peers[swarm.peers.index(victim)] = fresh

        out = remote.generate(ids, logits_processor=[OnStep(kill)], **kwargs)
        assert seen["holes"] >= 1 and torch.equal(out, want)
        for p in swarm.peers:
            p.wait_ready(timeout=120)
