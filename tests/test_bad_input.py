"""Every bad input gets a typed error naming the problem; the peer and its sessions keep serving."""

from __future__ import annotations

import time

import pytest
import torch
from hivemind.p2p import PeerID

from client import PeerBusy, PeerError
from client import ClientConfig, RemoteSwarm
from dht.records import derive_model_id
import wire
from peer.blocks import BlockRunner, load_config

HIDDEN = 64  # tiny checkpoints' hidden size
ROUTE_TIMEOUT = 600.0  # seconds the setup's client would wait for peers covering missing blocks


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, make_swarm):
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    strict, = swarm.add_peers(path, [(0, 3)], extra=["--max-message-bytes", "65536"])
    small, = swarm.add_peers(path, [(3, 6)], extra=["--cache-tokens", "64", "--idle-timeout", "2"])
    # route_timeout: how long a route waits for peers to cover missing blocks; far longer than any test here
    # runs, so that a client that waited for it instead of answering "busy" at once would be caught
    client = RemoteSwarm(ClientConfig(tuple(swarm.initial_peers), derive_model_id(load_config(path).to_dict()), 6, HIDDEN,
                                      route_timeout=ROUTE_TIMEOUT))
    runner = BlockRunner(path, 0, 3)
    yield client, strict.ready, small.ready, runner
    client.shutdown()


def _run(client, coro):
    return client.loop.run(coro, timeout=60)


def _stream(client, ready, rpc=wire.RPC_INFERENCE):
    _run(client, client.core.transport.connect(ready["peer_id"], tuple(ready["maddrs"])))
    return _run(client, client.core.transport.open_stream(ready["peer_id"], rpc))


def _call(client, stream, meta, tensors=()):
    return _run(client, stream.call(meta, list(tensors), timeout=30))


def _open(client, stream, start, end, max_length=16, batch_size=1, session_id="s1"):
    return _call(client, stream, {"op": "open", "session_id": session_id, "start": start, "end": end,
                                  "batch_size": batch_size, "max_length": max_length})


def _step(client, stream, hidden, offset, session_id="s1", mask=None, rewrite=False):
    positions = torch.arange(offset, offset + hidden.shape[1]).expand(hidden.shape[0], -1).contiguous()
    tensors = [hidden, positions] + ([] if mask is None else [mask])
    meta = {"op": "step", "session_id": session_id, "offset": offset, **({"rewrite": True} if rewrite else {})}
    return _call(client, stream, meta, tensors)


def _expect(code, fn, *args, match=None):
    with pytest.raises(PeerError) as info:
        fn(*args)
    assert info.value.code == code.value, str(info.value)
    if match:
        assert match in str(info.value)
    return info.value


def test_each_bad_step_is_rejected_and_the_session_survives(setup):
    client, ready, _, runner = setup
    s = _stream(client, ready)
    try:
        _expect(wire.ErrorCode.WRONG_BLOCKS, _open, client, s, 0, 4, match="serves blocks [0, 3)")
        _expect(wire.ErrorCode.UNKNOWN_SESSION, _step, client, s, torch.zeros(1, 1, HIDDEN), 0)
        _open(client, s, 0, 3)
        torch.manual_seed(0)
        first = torch.randn(1, 4, HIDDEN)
        _, (out1,) = _step(client, s, first, 0)

        bad = [
            (wire.ErrorCode.BAD_SHAPE, (torch.zeros(1, 1, HIDDEN - 1), 4), "hidden=64"),
            (wire.ErrorCode.BAD_SHAPE, (torch.zeros(2, 1, HIDDEN), 4), "batch=1"),
            (wire.ErrorCode.BAD_SHAPE, (torch.zeros(1, HIDDEN), 4), None),
            (wire.ErrorCode.BAD_DTYPE, (torch.zeros(1, 1, HIDDEN, dtype=torch.float64), 4), "float64"),
            (wire.ErrorCode.BAD_DTYPE, (torch.zeros(1, 1, HIDDEN, dtype=torch.int32), 4), None),
            (wire.ErrorCode.OUT_OF_ORDER, (torch.zeros(1, 1, HIDDEN), 7), "holds 4 tokens"),
            (wire.ErrorCode.OUT_OF_ORDER, (torch.zeros(1, 1, HIDDEN), 0), None),
            (wire.ErrorCode.TOO_LARGE, (torch.zeros(1, 13, HIDDEN), 4), "max_length 16"),
            (wire.ErrorCode.TOO_LARGE, (torch.zeros(1, 300, HIDDEN), 4), "limit of 65536"),
            (wire.ErrorCode.BAD_REQUEST, (torch.full((1, 1, HIDDEN), float("nan")), 4), "NaN"),
        ]
        for code, args, match in bad:
            _expect(code, _step, client, s, *args, match=match)
        _expect(wire.ErrorCode.UNKNOWN_SESSION, _step, client, s, torch.zeros(1, 1, HIDDEN), 4, "other")
        _expect(wire.ErrorCode.BAD_SHAPE, _step, client, s, torch.zeros(1, 1, HIDDEN), 4, "s1",
                torch.ones(1, 3, dtype=torch.long))
        _expect(wire.ErrorCode.BAD_REQUEST, _call, client, s, {"op": "dance"})
        _expect(wire.ErrorCode.BAD_REQUEST, _call, client, s, {"op": "step", "session_id": "s1", "offset": "4"})

        # Nothing accepted was lost: the next good step continues the same cache exactly.
        second = torch.randn(1, 2, HIDDEN)
        meta, (out2,) = _step(client, s, second, 4)
        assert meta["length"] == 6
        cache = runner.new_cache()
        ref1 = runner.forward(first, torch.arange(4)[None], None, cache)
        ref2 = runner.forward(second, torch.arange(4, 6)[None], None, cache)
        assert torch.equal(out1, ref1) and torch.equal(out2, ref2)
    finally:
        _run(client, s.close())


def test_a_rewrite_rolls_the_cache_back_and_a_bad_one_loses_nothing(setup):
    """Speculative decoding's roll-back: a step marked rewrite at offset p crops the cache to p first."""
    client, ready, _, runner = setup
    s = _stream(client, ready)
    try:
        _open(client, s, 0, 3)
        torch.manual_seed(1)
        first, draft, fixed, more = (torch.randn(1, n, HIDDEN) for n in (4, 3, 2, 1))
        _step(client, s, first, 0)
        _step(client, s, draft, 4)  # 7 tokens; the last 3 get rejected
        _expect(wire.ErrorCode.OUT_OF_ORDER, _step, client, s, fixed, 8, "s1", None, True, match="holds only 7")
        _expect(wire.ErrorCode.BAD_SHAPE, _step, client, s, torch.zeros(1, 2, HIDDEN - 1), 4, "s1", None, True)
        meta, (out,) = _step(client, s, fixed, 4, rewrite=True)
        assert meta["length"] == 6
        meta, (last,) = _step(client, s, more, 6)
        cache = runner.new_cache()
        runner.forward(first, torch.arange(4)[None], None, cache)
        assert torch.equal(out, runner.forward(fixed, torch.arange(4, 6)[None], None, cache))
        assert torch.equal(last, runner.forward(more, torch.arange(6, 7)[None], None, cache))
    finally:
        _run(client, s.close())


def test_a_beam_reordering_applies_once_and_a_bad_one_loses_nothing(setup):
    client, ready, _, runner = setup
    s = _stream(client, ready)
    try:
        _open(client, s, 0, 3, batch_size=2)
        torch.manual_seed(2)
        first, nxt = torch.randn(2, 3, HIDDEN), torch.randn(2, 1, HIDDEN)
        positions = torch.tensor([[3], [3]])
        _step(client, s, first, 0)
        for order, n, code in [([0, 2], 1, wire.ErrorCode.BAD_REQUEST), ([1], 1, wire.ErrorCode.BAD_REQUEST),
                               ([1, 0], "1", wire.ErrorCode.BAD_REQUEST), ([1, 0], 2, wire.ErrorCode.OUT_OF_ORDER)]:
            meta = {"op": "step", "session_id": "s1", "offset": 3, "reorder": order, "reorders": n}
            _expect(code, _call, client, s, meta, [nxt, positions])
        meta = {"op": "step", "session_id": "s1", "offset": 3, "reorder": [1, 1], "reorders": 1}
        _, (out,) = _call(client, s, meta, [nxt, positions])
        cache = runner.new_cache()
        runner.forward(first, torch.arange(3).expand(2, -1), None, cache)
        cache.reorder_cache(torch.tensor([1, 1]))
        assert torch.equal(out, runner.forward(nxt, positions, None, cache))
    finally:
        _run(client, s.close())


def test_garbage_metadata_and_raw_bytes(setup):
    client, ready, _, _ = setup
    s = _stream(client, ready)
    try:
        from hivemind.proto import runtime_pb2
        s._queue.put_nowait(runtime_pb2.ExpertRequest(metadata=b"\xc1\xc1 not msgpack"))
        reply = _run(client, s._replies.__anext__())
        assert wire.WireError.from_metadata(wire.unpack(reply)[0]).code == wire.ErrorCode.BAD_REQUEST
    finally:
        _run(client, s.close())

    async def send_junk():
        _, reader, writer = await client.core.transport.p2p.call_binary_stream_handler(
            PeerID.from_base58(ready["peer_id"]), wire.RPC_INFERENCE)
        writer.write(b"\x05\x00\x00\x00\x00\x00\x00\x00garbage-that-is-not-protobuf" * 3)
        await writer.drain()
        writer.close()

    _run(client, send_junk())
    stats, _ = _run(client, client.core.transport.info(ready["peer_id"]))
    assert stats["end"] == 3  # still serving


def test_stateless_forward_rejects_bad_input_too(setup):
    client, ready, _, runner = setup
    s = _stream(client, ready, wire.RPC_FORWARD)
    try:
        _open(client, s, 0, 3, max_length=5)
        _expect(wire.ErrorCode.BAD_SHAPE, _step, client, s, torch.zeros(1, 5, 32), 0)
        hidden = torch.randn(1, 5, HIDDEN)
        _, (out,) = _step(client, s, hidden, 0)
        assert torch.equal(out, runner.forward(hidden, torch.arange(5)[None], None, runner.new_cache()))
    finally:
        _run(client, s.close())


def test_full_cache_budget_answers_busy_then_recovers(setup):
    client, _, ready, _ = setup
    a, b = _stream(client, ready), _stream(client, ready)
    try:
        _expect(wire.ErrorCode.TOO_LARGE, _open, client, b, 3, 6, 65, 1, "huge")
        _open(client, a, 3, 6, max_length=48, session_id="a")
        err = _expect(wire.ErrorCode.BUSY, _open, client, b, 3, 6, 32, 1, "b")
        assert isinstance(err, PeerBusy) and err.retry_after and err.retry_after > 0
        stats, _ = _run(client, client.core.transport.info(ready["peer_id"]))
        assert stats["cache_tokens_left"] == 16
        _run(client, a.close())
        deadline = time.monotonic() + 60
        while True:  # the peer frees the budget when it sees the stream end
            try:
                _open(client, b, 3, 6, max_length=32, session_id="b")
                break
            except PeerBusy:
                assert time.monotonic() < deadline, "budget not freed 60 s after the session closed"
                time.sleep(0.1)
        _, (out,) = _step(client, b, torch.randn(1, 3, HIDDEN), 0, "b")
        assert out.shape == (1, 3, HIDDEN)
    finally:
        _run(client, a.close())
        _run(client, b.close())


def _stats(client, ready) -> dict:
    return _run(client, client.core.transport.info(ready["peer_id"]))[0]


def _until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.1)


def test_idle_session_expires(setup):
    client, _, ready, _ = setup
    s = _stream(client, ready)
    try:
        _open(client, s, 3, 6, max_length=8, session_id="idle")
        # nothing more is sent: the peer's own reply, once the session has sat idle its 2 s, is the error
        err = _expect(wire.ErrorCode.EXPIRED, lambda: client.loop.run(s.receive(timeout=60), timeout=90),
                      match="session idle for over 2 s")
        assert err.peer_id == ready["peer_id"]
        # and it freed the session and its cache budget (once it has left the stream's loop)
        def freed():
            stats = _stats(client, ready)
            return (stats["sessions"], stats["cache_tokens_left"]) == (0, 64)
        _until(freed, "the expired session's budget was not freed")
    finally:
        _run(client, s.close())


def test_client_gets_a_prompt_busy_error_when_no_other_peer_can_serve(setup):
    """Prompt: the busy error comes back without waiting route_timeout for another peer to show up (a
    client that waited would blow the deadline below, a fifth of it, however busy the machine)."""
    from client.session import SessionCore

    client, _, _, _ = setup
    assert client.cfg.route_timeout == ROUTE_TIMEOUT
    holder = client.open_session(batch_size=1, max_length=48)  # takes 48 of the small peer's 64 tokens
    try:
        opening = SessionCore(client.core, 1, 32)  # what client.open_session(1, 32) opens, with a deadline
        with pytest.raises(PeerBusy, match="cache budget full"):
            client.loop.run(opening.open(), timeout=ROUTE_TIMEOUT / 5)
    finally:
        holder.close()
    deadline = time.monotonic() + 60
    while True:  # and it recovers once the peer has seen the first session's stream end
        try:
            client.open_session(batch_size=1, max_length=32).close()
            break
        except PeerBusy:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def _raw_request(metadata: bytes):
    from hivemind.proto import runtime_pb2  # the wire package does not re-export it

    return runtime_pb2.ExpertRequest(metadata=metadata)


def _push(client, ready, message):
    from hivemind.proto import runtime_pb2

    async def call():
        reply = await client.core.transport.p2p.call_protobuf_handler(
            PeerID.from_base58(ready["peer_id"]), wire.RPC_PUSH, message, runtime_pb2.ExpertResponse)
        return wire.unpack(reply)[0]
    return _run(client, call())


def test_bad_pushes_and_push_chains_are_rejected_and_the_session_survives(setup):
    """Pushes into unknown sessions, garbage pushes, malformed 'next' chains and wire dtypes get typed
    errors; a chain that points nowhere is reported as a failed push and the step still counts."""
    client, ready, other, _ = setup
    s = _stream(client, ready)
    try:
        _expect(wire.ErrorCode.BAD_DTYPE, _call, client, s, {"op": "open", "session_id": "p1", "start": 0, "end": 3,
                                                            "batch_size": 1, "max_length": 16, "wire_dtype": "int8"})
        _open(client, s, 0, 3, session_id="p1")
        hidden, positions = torch.randn(1, 2, HIDDEN), torch.arange(2)[None]
        step = {"op": "step", "session_id": "p1", "offset": 0}
        for chain, match in [("peer", "list"), ([{"peer_id": "x"}], "session_id"),
                             ([{"peer_id": "not-a-peer-id", "session_id": "a"}], "invalid peer id"),
                             ([{"peer_id": ready["peer_id"], "session_id": "a", "maddrs": [1]}], "maddrs")]:
            _expect(wire.ErrorCode.BAD_REQUEST, _call, client, s, {**step, "next": chain}, [hidden, positions],
                    match=match)
        unknown = _push(client, ready, wire.request({**step, "session_id": "nope"}, [hidden, positions]))
        assert unknown["error"]["code"] == wire.ErrorCode.UNKNOWN_SESSION.value
        garbage = _push(client, ready, _raw_request(b"\xc1\xff"))
        assert garbage["error"]["code"] == wire.ErrorCode.BAD_REQUEST.value
        not_a_step = _push(client, ready, wire.request({"op": "open", "session_id": "p1"}))
        assert not_a_step["error"]["code"] == wire.ErrorCode.BAD_REQUEST.value
        # a push chain to a session the next peer does not have: computed, answered, push reported failed
        target = {"peer_id": other["peer_id"], "session_id": "gone", "maddrs": other["maddrs"]}
        meta, (out,) = _call(client, s, {**step, "next": [target]}, [hidden, positions])
        assert meta["length"] == 2 and meta["pushed"] is False and "unknown_session" in meta["push_error"]
        assert meta["input_digest"] == wire.digest(hidden)
        # the same step again is a duplicate: acknowledged, not computed twice
        again, tensors = _run(client, _resend(s, {**step}, [hidden, positions]))
        assert again == {"op": "result", "length": 2, "duplicate": True} and tensors == []
        # a push to this very peer (two consecutive hops on it) is delivered without dialing
        here = {"peer_id": ready["peer_id"], "session_id": "gone-too"}
        meta, _ = _call(client, s, {"op": "step", "session_id": "p1", "offset": 2, "next": [here]},
                        [torch.randn(1, 1, HIDDEN), torch.tensor([[2]])])
        assert meta["length"] == 3 and "unknown_session" in meta["push_error"]
        # a pushed step that overtakes the step before it waits for it instead of failing out of order
        ahead = _push(client, ready, wire.request({"op": "step", "session_id": "p1", "offset": 4},
                                                  [torch.randn(1, 1, HIDDEN), torch.tensor([[4]])]))
        assert ahead == {"op": "queued"}
        meta, _ = _step(client, s, torch.randn(1, 1, HIDDEN), 3, session_id="p1")
        assert meta["length"] == 4
        meta, _ = _run(client, s.receive(30))
        assert meta["length"] == 5
    finally:
        _run(client, s.close())


async def _resend(stream, meta, tensors):
    """Send and read the raw next reply (Stream.receive skips duplicate acknowledgements)."""
    stream.send(meta, tensors)
    from client.transport import _check
    return _check(stream.peer_id, await stream._replies.__anext__())
