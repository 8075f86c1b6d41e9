"""Every DHT read and write for swarmllm's keys, and the start of a DHT node.

The DHT itself runs in hivemind's background process; the coroutines here await its futures and so
never block an event loop. A call into a DHT whose process has died would wait forever (and, some 75 calls
later, block its caller's thread on the full command pipe): every call checks that the process is alive
before it asks and while it waits, and raises ``DHTDied`` instead (``dht.node.Node`` restarts it).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any, Callable, Sequence, TypeVar

import hivemind
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from dht import records
from dht.identity import Identity
from dht.validator import PeerRecordValidator

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_STARTUP_TIMEOUT = 30.0  # seconds
ALIVE_CHECK_PERIOD = 0.5  # seconds between checks that the DHT process still lives, while a call waits


class DHTDied(RuntimeError):
    """The DHT's process has exited: no call into it will ever be answered."""

    def __init__(self, dht: hivemind.DHT):
        super().__init__(f"the DHT process (pid {dht.pid}) has exited with code {dht.exitcode}: its node must be "
                         "restarted (dht.node.Node.watch does that) before the DHT can be used again")


def check_alive(dht: hivemind.DHT) -> None:
    """Raise DHTDied if ``dht``'s process has exited (cheap: one non-blocking waitpid)."""
    if not dht.is_alive():
        raise DHTDied(dht)


async def _answer(dht: hivemind.DHT, ask: Callable[[], Any]) -> Any:
    """The result of the future that ``ask()`` returns (a hivemind call made with return_future=True), or
    DHTDied as soon as the DHT's process is found dead (checked before asking and every
    ALIVE_CHECK_PERIOD seconds while waiting)."""
    check_alive(dht)
    waiter = asyncio.ensure_future(ask())  # owned here: awaited below, cancelled on the way out
    try:
        while True:
            done, _ = await asyncio.wait({waiter}, timeout=ALIVE_CHECK_PERIOD)
            if done:
                return waiter.result()
            check_alive(dht)
    finally:
        waiter.cancel()


def p2p_options(
    identity: Identity | None,
    initial_peers: Sequence[str] = (),
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    announce_maddrs: Sequence[str] = (),
    client_mode: bool = False,
    relay_service: bool = False,
    use_auto_relay: bool = False,
    no_listen: bool = False,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT,
) -> dict[str, Any]:
    """The keywords of ``hivemind.P2P.create`` for a swarmllm node's p2pd daemon (see ``start_node``)."""
    kwargs: dict[str, Any] = {}
    if client_mode:
        # hivemind would put libp2p's own kad DHT in client mode too; measured here, such a daemon then
        # fails every dial through a relay circuit. Only hivemind's DHT stays client-only.
        kwargs["dht_mode"] = "server"
    if relay_service:
        kwargs.update(force_reachability="public", use_auto_relay=True)
    if use_auto_relay:
        kwargs["use_auto_relay"] = True
    if no_listen:
        kwargs["no_listen"] = True
    if identity is not None:
        kwargs["identity_path"] = identity.path
        # hivemind's "is this identity taken" probe assumes RSA keys (ours are Ed25519) and starts a
        # second daemon; skip it.
        kwargs["check_if_identity_free"] = False
    if announce_maddrs:
        kwargs["announce_maddrs"] = list(announce_maddrs)
    return dict(
        initial_peers=list(initial_peers) or None,
        host_maddrs=[] if no_listen else [f"/ip4/{host}/tcp/{port}"],
        startup_timeout=startup_timeout,
        # No IPFS bootstrap, no UPnP: a node talks to the peers it is told about.
        use_ipfs=False,
        nat_port_map=False,
        **kwargs,
    )


def start_node(
    identity: Identity | None,
    initial_peers: Sequence[str] = (),
    *,
    client_mode: bool = False,
    signers: Sequence[Identity] = (),
    **options: Any,
) -> hivemind.DHT:
    """Start a hivemind DHT node (its own process and p2pd) that validates swarmllm records.

    ``identity`` makes the node's peer id the identity's; the same key signs this node's records.
    ``options`` are ``p2p_options``': ``host``, ``port``, ``announce_maddrs``; ``relay_service``: a public
    node that relays for peers behind NAT (libp2p circuit relay v2 runs only on nodes that consider
    themselves publicly reachable); ``use_auto_relay``: reserve a slot on a relay so others can reach
    this node through it; ``no_listen``: accept no direct connections; ``startup_timeout`` (seconds).
    ``signers``: more identities whose records this node may write (bench.directory plays thousands of
    peers from a few nodes).

    Its p2pd belongs to the DHT's process: if that process dies, nothing restarts it. Long-running
    peers, clients and the health monitor use ``dht.node.Node`` instead, which survives that.
    """
    kwargs = p2p_options(identity, initial_peers, client_mode=client_mode, **options)
    return hivemind.DHT(
        initial_peers=kwargs.pop("initial_peers"),
        start=True,
        client_mode=client_mode,
        record_validators=[PeerRecordValidator(identity, signers)],
        **kwargs,
    )


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """The node's own reachable multiaddrs (empty for a node that does not listen)."""
    try:
        return [str(m) for m in dht.get_visible_maddrs()]
    except ValueError:  # hivemind raises when the daemon reports none
        return []


async def announce(dht: hivemind.DHT, record: records.PeerRecord, *, ttl: float) -> bool:
    """Store (or refresh) a peer's record for ``ttl`` seconds under its shard of its model's keys, and
    its model's entry in the models index (two writes, whatever the swarm's size). Returns whether any
    DHT node accepted the record."""
    expiration = get_dht_time() + ttl
    stored, _ = await asyncio.gather(
        _answer(dht, lambda: dht.store(
            records.shard_key(record.model_id, records.shard_of(record.peer_id)),
            subkey=records.subkey_for(record.peer_id), value=records.encode(record), expiration_time=expiration,
            return_future=True)),
        _answer(dht, lambda: dht.store(
            records.MODELS_KEY, subkey=records.model_subkey(record.model_id),
            value=records.encode_model_entry(records.model_entry(record)), expiration_time=expiration,
            return_future=True)))
    return bool(stored)


async def _get_many(dht: hivemind.DHT, keys: Sequence[str]) -> dict[str, Any]:
    """``{key: value}`` for every key found (latest values), in one lookup of all the keys together."""
    found = await _answer(dht, lambda: dht.run_coroutine(functools.partial(_node_get_many, keys=tuple(keys)),
                                                         return_future=True))
    return {key: value for key, value in found.items() if value is not None}


async def _node_get_many(_dht: hivemind.DHT, node: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """Runs inside the DHT's process (hivemind.DHT.run_coroutine)."""
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))  # the latest values
    return {key: (item.value if item is not None else None) for key, item in found.items()}


async def rejoin(dht: hivemind.DHT, initial_peers: Sequence[str]) -> int:
    """Ping the initial peers from this node's DHT; how many answered. A server node's ping asks the pinged
    node to add it to its routing table, so a bootstrap node that restarted empty (same key and port)
    learns the swarm again: measured before this, a restarted bootstrap never did, and every newcomer that
    joined through it saw no records at all (peers' DHTs kept working among themselves)."""
    ids = tuple(m.rsplit("/p2p/", 1)[1] for m in initial_peers if "/p2p/" in m)
    if not ids:
        return 0
    return await _answer(dht, lambda: dht.run_coroutine(functools.partial(_ping_all, peer_ids=ids), return_future=True))


async def _ping_all(_dht: hivemind.DHT, node: Any, peer_ids: tuple[str, ...]) -> int:
    """Runs inside the DHT's process (hivemind.DHT.run_coroutine)."""
    answers = await asyncio.gather(*(node.protocol.call_ping(PeerID.from_base58(p)) for p in peer_ids))
    return sum(answer is not None for answer in answers)


def _decode_entries(found: Any, key: str, decode: Callable[[Any], T], belongs: Callable[[str, T], bool]) -> list[T]:
    """Decode every subkey's value of one dictionary value; malformed or misfiled entries are skipped
    with a log line."""
    if not isinstance(found, dict):
        return []
    result = []
    for subkey, item in found.items():
        try:
            value = decode(item.value)
        except records.RecordError as e:
            logger.warning("skipping a malformed entry under %r of %r: %s", subkey, key, e)
            continue
        if belongs(subkey, value):
            result.append(value)
        else:
            logger.warning("skipping an entry filed under the wrong subkey %r of %r", subkey, key)
    return result


async def _fetch(dht: hivemind.DHT, key: str, decode: Callable[[Any], T], belongs: Callable[[str, T], bool]
                 ) -> list[T]:
    found = await _answer(dht, lambda: dht.get(key, latest=True, return_future=True))
    return _decode_entries(found.value if found is not None else None, key, decode, belongs)


def _newest(found: list[records.PeerRecord]) -> list[records.PeerRecord]:
    """One record per peer (a peer that updated from layout 1 to 2 can have one under each for a while:
    hivemind keeps no time with the values it returns, so the layout-2 one, read first, wins)."""
    seen: dict[str, records.PeerRecord] = {}
    for r in found:
        seen.setdefault(r.peer_id, r)
    return list(seen.values())


def _model_peers(found: dict[str, Any], model_id: str) -> list[records.PeerRecord]:
    result = []
    for key in records.peer_keys(model_id):
        result += _decode_entries(
            found.get(key), key, records.decode,
            lambda subkey, r: records.peer_id_from_subkey(subkey) == r.peer_id and r.model_id == model_id
            and (key == records.model_key(model_id) or key == records.shard_key(model_id, records.shard_of(r.peer_id))))
    return _newest(result)


async def fetch_peers(dht: hivemind.DHT, model_id: str) -> list[records.PeerRecord]:
    """Every valid, unexpired record for ``model_id`` (its shards and layout 1's key, in one lookup)."""
    return _model_peers(await _get_many(dht, records.peer_keys(model_id)), model_id)


async def fetch_models(dht: hivemind.DHT) -> list[records.ModelEntry]:
    """Every model some peer announces: the models index, plus the models of layout 1's index (older
    peers). Sorted by model id."""
    found = await _get_many(dht, [records.MODELS_KEY, records.INDEX_KEY])
    entries = {e.model_id: e for e in _decode_entries(
        found.get(records.MODELS_KEY), records.MODELS_KEY, records.decode_model_entry,
        lambda subkey, e: subkey == records.model_subkey(e.model_id))}
    for r in _decode_entries(found.get(records.INDEX_KEY), records.INDEX_KEY, records.decode,
                             lambda subkey, r: records.peer_id_from_subkey(subkey) == r.peer_id):
        entries.setdefault(r.model_id, records.model_entry(r))
    return [entries[m] for m in sorted(entries)]


async def fetch_index(dht: hivemind.DHT) -> list[records.PeerRecord]:
    """Every valid, unexpired peer record of every model (what the health monitor shows): the models
    index, then every model's keys in one lookup."""
    models = [m.model_id for m in await fetch_models(dht)]
    found = await _get_many(dht, [key for m in models for key in records.peer_keys(m)])
    return [r for m in models for r in _model_peers(found, m)]


async def publish_verdict(dht: hivemind.DHT, verdict: records.VerdictRecord, *, ttl: float = 7 * 86400.0) -> bool:
    """Publish an audit verdict (signed by the publishing node's identity, which must be the author)."""
    return await _store(dht, records.verdict_key(verdict.model_id), records.verdict_subkey(verdict.author, verdict.target),
                        records.encode_verdict(verdict), ttl)


async def _store(dht: hivemind.DHT, key: str, subkey: str, value: Any, ttl: float) -> bool:
    """Store one subkey's value for ``ttl`` seconds (our validator signs it with the node's identity)."""
    return bool(await _answer(dht, lambda: dht.store(key, subkey=subkey, value=value,
                                                     expiration_time=get_dht_time() + ttl, return_future=True)))


async def fetch_verdicts(dht: hivemind.DHT, model_id: str) -> list[records.VerdictRecord]:
    """Every valid verdict published about peers of ``model_id`` (each signed by its author)."""
    return await _fetch(dht, records.verdict_key(model_id), records.decode_verdict,
                        lambda subkey, v: subkey == records.verdict_subkey(v.author, v.target)
                        and v.model_id == model_id)


async def publish_proof(dht: hivemind.DHT, proof: records.ProofRecord, *, ttl: float = 7 * 86400.0) -> bool:
    """Say where a fraud proof can be fetched (signed by the publishing node's identity: the author)."""
    return await _store(dht, records.proof_key(proof.model_id), records.proof_subkey(proof.author, proof.accused),
                        records.encode_proof(proof), ttl)


async def fetch_proofs(dht: hivemind.DHT, model_id: str) -> list[records.ProofRecord]:
    """Every valid fraud-proof record published about peers of ``model_id`` (each signed by its author)."""
    return await _fetch(dht, records.proof_key(model_id), records.decode_proof,
                        lambda subkey, p: subkey == records.proof_subkey(p.author, p.accused) and p.model_id == model_id)


__all__ = ["DHTDied", "check_alive", "p2p_options", "start_node", "visible_maddrs", "announce", "rejoin", "fetch_peers",
           "fetch_models", "fetch_index", "publish_verdict", "fetch_verdicts", "publish_proof", "fetch_proofs"]
