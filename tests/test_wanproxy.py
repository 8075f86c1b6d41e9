"""bench/wanproxy.py: bytes arrive intact and in order, and a round trip takes at least twice the delay.

Only lower bounds on time (a correctness check of the delay); how fast it goes is bench/'s business.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from bench.wanproxy import WanProxy

DELAY = 0.1  # seconds one way


@pytest.fixture
def echo_port():
    """An echo server on 127.0.0.1 that answers every connection until the client closes it."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    stop = threading.Event()
    threads = []

    def serve_one(conn):
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            conn.settimeout(10)
            t = threading.Thread(target=serve_one, args=(conn,), daemon=True)
            t.start()
            threads.append(t)

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    yield server.getsockname()[1]
    stop.set()
    acceptor.join(timeout=5)
    server.close()
    for t in threads:
        t.join(timeout=5)


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        data = sock.recv(min(65536, n - got))
        if not data:
            raise ConnectionError(f"the proxy closed the connection after {got} of {n} bytes")
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def test_round_trip_is_delayed_and_intact(echo_port):
    with WanProxy(echo_port, DELAY) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            began = time.monotonic()
            sock.sendall(b"ping")
            assert _recv_exactly(sock, 4) == b"ping"
            assert time.monotonic() - began >= 2 * DELAY

            payload = os.urandom(3 * 2**20)  # many chunks in flight: order must survive the delay queue
            sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
            sender.start()
            assert _recv_exactly(sock, len(payload)) == payload
            sender.join(timeout=10)


def test_connections_are_independent_and_rate_cap_delays(echo_port):
    rate_mbit = 8.0  # 1 MB/s: 100 KB takes >= 0.1 s to serialise one way
    with WanProxy(echo_port, 0.0, rate_mbit=rate_mbit) as proxy:
        socks = [socket.create_connection(("127.0.0.1", proxy.port), timeout=10) for _ in range(2)]
        try:
            for i, sock in enumerate(socks):
                payload = bytes([i]) * 100_000
                began = time.monotonic()
                sock.sendall(payload)
                assert _recv_exactly(sock, len(payload)) == payload
                assert time.monotonic() - began >= len(payload) / (rate_mbit * 1e6 / 8) * 0.99  # one way, at least
        finally:
            for sock in socks:
                sock.close()


def test_unreachable_target_drops_the_connection():
    with socket.create_server(("127.0.0.1", 0)) as s:
        dead_port = s.getsockname()[1]  # closed again below: nothing listens there
    with WanProxy(dead_port, DELAY) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            assert sock.recv(1) == b""


def test_jitter_and_loss_keep_bytes_in_order_and_loss_costs_a_retransmission(echo_port):
    with WanProxy(echo_port, 0.01, jitter=0.05, seed=1) as proxy:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            payload = os.urandom(2**20)
            sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
            sender.start()
            assert _recv_exactly(sock, len(payload)) == payload
            sender.join(timeout=10)
    with WanProxy(echo_port, 0.01, loss=0.999, seed=1) as proxy:  # (almost) every chunk is retransmitted
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            began = time.monotonic()
            sock.sendall(b"ping")
            assert _recv_exactly(sock, 4) == b"ping"
            assert time.monotonic() - began >= 2 * 0.2  # one minimum RTO each way


def test_upload_cap_slows_only_what_the_target_sends(echo_port):
    upload_mbit = 8.0  # 1 MB/s from the target; the client's direction is unlimited
    with WanProxy(echo_port, 0.0, upload_mbit=upload_mbit) as proxy:
        assert proxy.rate is None and proxy.upload == upload_mbit * 1e6 / 8
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
            payload = b"u" * 100_000
            began = time.monotonic()
            sock.sendall(payload)
            assert _recv_exactly(sock, len(payload)) == payload
            assert time.monotonic() - began >= len(payload) / (upload_mbit * 1e6 / 8) * 0.99


def test_rejects_bad_settings():
    with pytest.raises(ValueError, match="delay"):
        WanProxy(1, -1.0)
    with pytest.raises(ValueError, match="rate_mbit"):
        WanProxy(1, 0.0, rate_mbit=0)
    with pytest.raises(ValueError, match="upload_mbit"):
        WanProxy(1, 0.0, upload_mbit=-1)
    with pytest.raises(ValueError, match="jitter"):
        WanProxy(1, 0.0, jitter=-0.1)
    with pytest.raises(ValueError, match="loss"):
        WanProxy(1, 0.0, loss=1.0)


def test_a_benchmark_workload_needs_no_tokenizer(tiny_checkpoint):
    """bench.concurrency and friends run on a checkpoint without tokenizer files: they need token ids only."""
    import argparse

    import torch

    from bench import harness
    args = argparse.Namespace(model_dir=tiny_checkpoint("llama"), peers=2, prompt_tokens=12, threads=None)
    work = harness.workload(args, lambda message: None)
    first = work.prompts.next()  # seeded random ids, since there is no tokenizer
    assert work.tokenizer is None and tuple(first.shape) == (1, 12) and work.spans == [(0, 3), (3, 6)]
    assert torch.equal(first, harness.workload(args, lambda message: None).prompts.next())  # seeded
    assert isinstance(work.pad, int)
