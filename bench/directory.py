"""Directory benchmark (issue 16): the swarm's DHT directory at thousands of peers, on real hivemind
DHT nodes (each its own process with its own p2pd) holding real signed records written by
``dht.directory.announce``.

``--nodes`` DHT server nodes form the DHT. ``--identities`` simulated peers (Ed25519 identities, a
record each: a span of a ``--blocks``-block model, two multiaddrs, a public name) are spread over
``--models`` models (Zipf-like: the first model gets the most peers) and announced by ``--writers``
client-mode nodes, each signing for its share of the identities (``start_node(signers=...)``), at
most ``--concurrency`` announces in flight per writer. Measured:

- announce latency (first announce and a refresh), and the DHT writes one announce makes;
- lookup latency of one model's peers (``fetch_peers``: its 16 shards and layout 1's key in one
  lookup), of the models index and of the whole index (``fetch_index``, what the health page reads),
  and that each lookup found every peer;
- bytes stored per DHT node (its storage and its cache, msgpack-encoded), the largest single value;
- the health page's refresh (``health.monitor.Monitor.refresh``: index, verdicts, pings; the simulated
  peers do not exist, so every ping fails after ``--ping-timeout``) and its directory part alone;
- the first ``--layout1-identities`` announced the old way (layout 1: every record under the model's
  one key and again under the global index), for comparison: announce latency, the index lookup, the
  largest value, bytes per node. Only a few hundred: hivemind's store first looks the key up, and
  the lookup's replies carry the key's value, every subkey of which the writer validates (a
  signature check each), so in layout 1 every announce checks every peer's signature: O(peers) per
  announce, O(peers^2) to fill the index. In layout 2 an announce checks its shard's (1/16 of its
  model's peers) and the models index's entries.

    .venv/bin/python -m bench.directory [--nodes 50] [--identities 2000] [--models 20]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import random
import resource
import statistics
import time
import types

import hivemind
import msgpack
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hivemind.utils import get_dht_time

from bench import harness
from dht import directory, records
from dht.identity import Identity
from dht.records import PeerRecord, PeerState
from health.monitor import Monitor


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _ms(values: list[float]) -> dict:
    return {"p50_ms": 1000 * statistics.median(values), "p99_ms": 1000 * _quantile(values, 0.99),
            "max_ms": 1000 * max(values), "n": len(values)}


def start_nodes(n: int, log) -> list[hivemind.DHT]:
    """``n`` DHT server nodes: a first one, then the rest (4 starting at a time), each told about up to 3
    random nodes already up."""
    first = directory.start_node(None, startup_timeout=120)
    nodes, rng = [first], random.Random(0)
    maddrs = [directory.visible_maddrs(first)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        while len(nodes) < n:
            batch = min(4, n - len(nodes))
            known = [m for ms in rng.sample(maddrs, min(3, len(maddrs))) for m in ms]
            started = list(pool.map(lambda _: directory.start_node(None, known, startup_timeout=120), range(batch)))
            nodes += started
            maddrs += [directory.visible_maddrs(node) for node in started]
            log(f"  {len(nodes)}/{n} DHT nodes up")
    return nodes


def make_records(identities: list[Identity], models: int, blocks: int, rng: random.Random) -> list[PeerRecord]:
    weights = [1 / (m + 1) for m in range(models)]  # Zipf-like: a few popular models, a long tail
    result = []
    for i, ident in enumerate(identities):
        model = rng.choices(range(models), weights)[0]
        span = rng.choice([4, 8, 8, 16, 16, 32])
        start = rng.randrange(0, blocks - span + 1)
        ip = f"{rng.randrange(1, 224)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
        result.append(PeerRecord(
            peer_id=ident.peer_id, model_id=f"bench{model}-{blocks}L-0123456789ab", start=start, end=start + span,
            state=PeerState.ONLINE, throughput=rng.lognormvariate(1.0, 0.8), dtype=rng.choice(records.DTYPES[:2]),
            cache_tokens_left=rng.randrange(1000, 100000), version="0.1.0", public_name=f"volunteer-{i}",
            maddrs=(f"/ip4/{ip}/tcp/31337/p2p/{ident.peer_id}", f"/ip6/2001:db8::{i:x}/tcp/31337/p2p/{ident.peer_id}"),
            num_sessions=rng.randrange(0, 4), model_blocks=blocks, model_type="llama",
            num_parameters=span * 200_000_000, quant=rng.choice(records.QUANTS), backward=rng.random() < 0.5))
    return result


async def announce_layout1(dht: hivemind.DHT, record: PeerRecord, *, ttl: float) -> bool:
    """What peers before layout 2 did (kept here only to compare): the record under the model's single key
    and again under the global index."""
    expiration, value, subkey = get_dht_time() + ttl, records.encode(record), records.subkey_for(record.peer_id)
    stored = await asyncio.gather(*(dht.store(key, subkey=subkey, value=value, expiration_time=expiration,
                                              return_future=True)
                                     for key in (records.model_key(record.model_id), records.INDEX_KEY)))
    return all(stored)


async def announce_all(writers: list[hivemind.DHT], share: list[list[PeerRecord]], announce, concurrency: int,
                       restart) -> tuple[list[float], int, int]:
    """Announce every record from its writer; (latency of each, how many no node accepted, writers
    restarted). hivemind's DHT process has died under this load (its command pipe read mid-message,
    EAGAIN, then EOF): a dead writer is replaced by ``restart(w)`` (a new node signing for the same
    identities) and its announce retried once; the latency counts from the first try."""
    latencies, failed, restarted = [], 0, 0
    locks = [asyncio.Lock() for _ in writers]

    async def live(w: int) -> hivemind.DHT:
        nonlocal restarted
        async with locks[w]:
            if not writers[w].is_alive():
                writers[w].shutdown()
                writers[w] = await asyncio.to_thread(restart, w)
                restarted += 1
            return writers[w]

    async def one(w, record, slots):
        nonlocal failed
        async with slots:
            began, ok = time.perf_counter(), False
            for _ in range(2):
                try:
                    ok = await asyncio.wait_for(announce(await live(w), record, ttl=3600), 60)
                    break
                except asyncio.TimeoutError:
                    continue
            latencies.append(time.perf_counter() - began)
            failed += not ok

    tasks = []
    for w, mine in enumerate(share):
        slots = asyncio.Semaphore(concurrency)
        tasks += [one(w, r, slots) for r in mine]
    await asyncio.gather(*tasks)
    return latencies, failed, restarted


async def _stored_bytes(_dht, node) -> dict:
    """Runs inside a DHT node's process: bytes it stores (and caches), its largest value."""
    def sizes(storage):
        return [len(msgpack.packb(item.value.packb() if hasattr(item.value, "packb") else item.value))
                for _, item in storage.items()]
    stored, cached = sizes(node.protocol.storage), sizes(node.protocol.cache)
    return {"stored": sum(stored), "cached": sum(cached), "keys": len(stored), "largest": max(stored, default=0)}


def storage_report(nodes: list[hivemind.DHT]) -> dict:
    per_node = [node.run_coroutine(_stored_bytes) for node in nodes]
    stored = [p["stored"] for p in per_node]
    return {"stored_bytes_median": statistics.median(stored), "stored_bytes_max": max(stored),
            "stored_bytes_total": sum(stored), "cached_bytes_total": sum(p["cached"] for p in per_node),
            "largest_value_bytes": max(p["largest"] for p in per_node), "per_node": per_node}


async def _timed(coro_fn, repeats: int) -> tuple[list[float], object]:
    times, result = [], None
    for _ in range(repeats):
        began = time.perf_counter()
        result = await coro_fn()
        times.append(time.perf_counter() - began)
    return times, result


def main() -> None:
    # Long on purpose: a benchmark script, one timed phase after another in the order the README reports them.
    parser = argparse.ArgumentParser(prog="python -m bench.directory", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50, help="DHT server nodes (each a process and a p2pd)")
    parser.add_argument("--identities", type=int, default=2000, help="simulated peers announcing")
    parser.add_argument("--models", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=80, help="blocks per model")
    parser.add_argument("--writers", type=int, default=8, help="client-mode nodes announcing for the identities")
    parser.add_argument("--concurrency", type=int, default=2, help="announces in flight per writer")
    parser.add_argument("--lookups", type=int, default=3, help="lookups of each model's peers")
    parser.add_argument("--ping-timeout", type=float, default=1.0)
    parser.add_argument("--layout1-identities", type=int, default=500,
                        help="identities announced the old way for comparison (0: skip)")
    args = parser.parse_args()
    log = print
    rng = random.Random(0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # ~100 processes' pipes and sockets

    identities = [Identity(Ed25519PrivateKey.generate(), path="") for _ in range(args.identities)]
    peers = make_records(identities, args.models, args.blocks, rng)
    sizes = [len(msgpack.packb(records.encode(r))) for r in peers]
    log(f"{len(peers)} records, {statistics.median(sizes):.0f} bytes each (median, unsigned; +72 signed)")

    began = time.perf_counter()
    nodes = start_nodes(args.nodes, log)
    up_s = time.perf_counter() - began
    boot = [m for node in nodes[:8] for m in directory.visible_maddrs(node)]
    share = [peers[w::args.writers] for w in range(args.writers)]
    def start_writer(w: int) -> hivemind.DHT:
        return directory.start_node(None, boot, client_mode=True, signers=identities[w::args.writers],
                                    startup_timeout=120)

    writers = [start_writer(w) for w in range(args.writers)]
    reader = None
    results: dict = {"dht_nodes": args.nodes, "identities": args.identities, "models": args.models,
                     "record_bytes_median": statistics.median(sizes), "record_bytes_max": max(sizes),
                     "nodes_start_s": up_s}
    expected = {}
    for r in peers:
        expected.setdefault(r.model_id, set()).add(r.peer_id)
    try:
        async def layout2():
            out = {}
            log(f"announcing {len(peers)} identities (layout 2) from {args.writers} writers ...")
            began = time.perf_counter()
            first, failed, restarted = await announce_all(writers, share, directory.announce, args.concurrency,
                                                          start_writer)
            out["announce_wall_s"] = time.perf_counter() - began
            out["announce"] = {**_ms(first), "failed": failed, "writers_restarted": restarted}
            refresh, failed, restarted = await announce_all(writers, share, directory.announce, args.concurrency,
                                                            start_writer)
            out["announce_refresh"] = {**_ms(refresh), "failed": failed, "writers_restarted": restarted}
            out["writes_per_announce"] = 2  # directory.announce: its shard key and the models index entry
            alone = []  # one at a time: the latency of a single announce, not of the queue
            for writer, mine in zip(writers, share):
                times, _ = await _timed(lambda: directory.announce(writer, mine[0], ttl=3600), 10)
                alone += times
            out["announce_alone"] = _ms(alone)
            nonlocal reader
            # One writer reads too. A node started just to read (idle through the announces, or started
            # after them) died in 3 of 4 runs here, its hivemind command pipe read mid-message (EAGAIN,
            # then EOF); the writers did not. Its own announces are cached (1/8 of the records), but
            # every lookup asks for the latest values, so it still walks the DHT for each key.
            reader = writers[0]
            lookups, missing = [], 0
            for model_id in sorted(expected):
                times, found = await _timed(lambda: directory.fetch_peers(reader, model_id), args.lookups)
                lookups += times
                missing += len(expected[model_id] - {r.peer_id for r in found})
            out["lookup_model"] = {**_ms(lookups), "peers_missing": missing}
            times, models = await _timed(lambda: directory.fetch_models(reader), args.lookups)
            out["lookup_models_index"] = {**_ms(times), "models_found": len(models)}
            times, index = await _timed(lambda: directory.fetch_index(reader), args.lookups)
            out["lookup_index"] = {**_ms(times), "records_found": len(index)}
            # the monitor reads node.dht and node.p2p: the writer's DHT and a replica of its daemon
            monitor = Monitor(types.SimpleNamespace(dht=reader, p2p=await reader.replicate_p2p()),
                              ping_timeout=args.ping_timeout)

            async def directory_part():
                index = await directory.fetch_index(reader)
                await asyncio.gather(*(directory.fetch_verdicts(reader, m) for m in {r.model_id for r in index}))
            times, _ = await _timed(directory_part, args.lookups)
            out["health_directory_read"] = _ms(times)
            times, snap = await _timed(monitor.refresh, 1)
            out["health_refresh_with_pings"] = {**_ms(times), "peers_shown": sum(len(m.peers) for m in snap.models)}
            return out

        results["layout2"] = asyncio.run(layout2())
        results["layout2"]["storage"] = storage_report(nodes)
        log(_summary("layout 2", results["layout2"]))

        if args.layout1_identities:
            # Only the first --layout1-identities: in layout 1 every announce costs O(peers) (below).
            old = [PeerRecord(**{**r.__dict__, "model_id": "old" + r.model_id})
                   for r in peers[:args.layout1_identities]]
            old_share = [old[w::args.writers] for w in range(args.writers)]

            async def layout1():
                out = {}
                log("announcing the same identities the old way (layout 1) ...")
                began = time.perf_counter()
                first, failed, restarted = await announce_all(writers, old_share, announce_layout1,
                                                              args.concurrency, start_writer)
                out["announce_wall_s"] = time.perf_counter() - began
                out["announce"] = {**_ms(first), "failed": failed, "writers_restarted": restarted}
                out["writes_per_announce"] = 2
                out["identities"] = len(old)
                alone = []
                for writer, mine in zip(writers, old_share):
                    times, _ = await _timed(lambda: announce_layout1(writer, mine[0], ttl=3600), 10)
                    alone += times
                out["announce_alone"] = _ms(alone)

                async def read_index():
                    found = await reader.get(records.INDEX_KEY, latest=True, return_future=True)
                    return len(found.value) if found is not None else 0
                try:
                    times, count = await _timed(read_index, args.lookups)
                    out["lookup_index"] = {**_ms(times), "records_found": count}
                except Exception as e:  # a value over hivemind's message limit cannot be read back at all
                    out["lookup_index"] = {"error": f"{type(e).__name__}: {e}"}
                return out

            results["layout1"] = asyncio.run(layout1())
            before = results["layout2"]["storage"]
            after = storage_report(nodes)
            results["layout1"]["storage"] = {
                "stored_bytes_total": after["stored_bytes_total"] - before["stored_bytes_total"],
                "stored_bytes_max": max(a["stored"] - b["stored"] for a, b in zip(after["per_node"], before["per_node"])),
                "largest_value_bytes": after["largest_value_bytes"]}
            log(_summary("layout 1", results["layout1"]))
    finally:
        for node in [*writers, *nodes]:
            node.shutdown()
    print(harness.table(
        ["layout", "identities", "announce alone p50 ms", f"announce p50/p99 ms ({args.writers * args.concurrency} in flight)", "model lookup p50/p99 ms", "index lookup p50 ms", "largest value KiB",
         "bytes/node median / max KiB"],
        [[name, r.get("identities", args.identities), f"{r['announce_alone']['p50_ms']:.0f}",
          f"{r['announce']['p50_ms']:.0f} / {r['announce']['p99_ms']:.0f}",
          f"{r['lookup_model']['p50_ms']:.0f} / {r['lookup_model']['p99_ms']:.0f}" if "lookup_model" in r else "-",
          f"{r['lookup_index']['p50_ms']:.0f}" if "p50_ms" in r["lookup_index"] else r["lookup_index"]["error"][:40],
          f"{r['storage']['largest_value_bytes'] / 1024:.0f}",
          (f"{r['storage']['stored_bytes_median'] / 1024:.0f} / " if "stored_bytes_median" in r["storage"] else "- / ")
          + f"{r['storage']['stored_bytes_max'] / 1024:.0f}"]
         for name, r in (("2 (shards + models index)", results["layout2"]),
                         *((("1 (one key per model + global index)", results["layout1"]),) if "layout1" in results else ()))]))
    print(f"wrote {harness.write_results('directory', results, args)}")


def _summary(name: str, r: dict) -> str:
    return f"{name}: " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "storage")


if __name__ == "__main__":
    main()
