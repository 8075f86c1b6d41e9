"""Every DHT read and write for swarmllm's keys, and the start of a DHT node.

The DHT itself runs in hivemind's background process; the coroutines here await its futures and so
never block an event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable, Sequence, TypeVar

import hivemind
from hivemind.utils import get_dht_time

from dht import records
from dht.identity import Identity
from dht.validator import PeerRecordValidator

logger = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_STARTUP_TIMEOUT = 30.0  # seconds


def start_node(
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
) -> hivemind.DHT:
    """Start a hivemind DHT node (its own process and p2pd) that validates swarmllm records.

    ``identity`` makes the node's peer id the identity's; the same key signs this node's records.
    ``relay_service``: a public node that relays for peers behind NAT (libp2p circuit relay v2 runs
    only on nodes that consider themselves publicly reachable). ``use_auto_relay``: reserve a slot on a
    relay so others can reach this node through it. ``no_listen``: accept no direct connections.
    """
    kwargs = {}
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
    return hivemind.DHT(
        initial_peers=list(initial_peers) or None,
        start=True,
        host_maddrs=[] if no_listen else [f"/ip4/{host}/tcp/{port}"],
        client_mode=client_mode,
        record_validators=[PeerRecordValidator(identity)],
        startup_timeout=startup_timeout,
        # No IPFS bootstrap, no UPnP: a node talks to the peers it is told about.
        use_ipfs=False,
        nat_port_map=False,
        **kwargs,
    )


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """The node's own reachable multiaddrs (empty for a node that does not listen)."""
    try:
        return [str(m) for m in dht.get_visible_maddrs()]
    except ValueError:  # hivemind raises when the daemon reports none
        return []


async def announce(dht: hivemind.DHT, record: records.PeerRecord, *, ttl: float) -> bool:
    """Store (or refresh) a peer's record for ``ttl`` seconds, under its model's key and in the index
    every monitor reads. Returns whether any DHT node accepted it under the model's key."""
    expiration = get_dht_time() + ttl
    value, subkey = records.encode(record), records.subkey_for(record.peer_id)
    stored, _ = await asyncio.gather(
        dht.store(records.model_key(record.model_id), subkey=subkey, value=value, expiration_time=expiration,
                  return_future=True),
        dht.store(records.INDEX_KEY, subkey=subkey, value=value, expiration_time=expiration, return_future=True))
    return bool(stored)


async def _fetch(dht: hivemind.DHT, key: str, decode: Callable[[Any], T], belongs: Callable[[str, T], bool]
                 ) -> list[T]:
    """Decode every subkey's value under ``key``; malformed or misfiled entries are skipped with a log line."""
    found = await dht.get(key, latest=True, return_future=True)
    if found is None or not isinstance(found.value, dict):
        return []
    result = []
    for subkey, item in found.value.items():
        try:
            value = decode(item.value)
        except records.RecordError as e:
            logger.warning("skipping a malformed entry under %r: %s", subkey, e)
            continue
        if belongs(subkey, value):
            result.append(value)
        else:
            logger.warning("skipping an entry filed under the wrong subkey %r", subkey)
    return result


async def fetch_peers(dht: hivemind.DHT, model_id: str) -> list[records.PeerRecord]:
    """Every valid, unexpired record for ``model_id``."""
    return await _fetch(dht, records.model_key(model_id), records.decode,
                        lambda subkey, r: records.peer_id_from_subkey(subkey) == r.peer_id and r.model_id == model_id)


async def fetch_index(dht: hivemind.DHT) -> list[records.PeerRecord]:
    """Every valid, unexpired peer record of every model (what the health monitor shows)."""
    return await _fetch(dht, records.INDEX_KEY, records.decode,
                        lambda subkey, r: records.peer_id_from_subkey(subkey) == r.peer_id)


async def publish_verdict(dht: hivemind.DHT, verdict: records.VerdictRecord, *, ttl: float = 7 * 86400.0) -> bool:
    """Publish an audit verdict (signed by the publishing node's identity, which must be the author)."""
    stored = await dht.store(
        records.verdict_key(verdict.model_id), subkey=records.verdict_subkey(verdict.author, verdict.target),
        value=records.encode_verdict(verdict), expiration_time=get_dht_time() + ttl, return_future=True)
    return bool(stored)


async def fetch_verdicts(dht: hivemind.DHT, model_id: str) -> list[records.VerdictRecord]:
    """Every valid verdict published about peers of ``model_id`` (each signed by its author)."""
    return await _fetch(dht, records.verdict_key(model_id), records.decode_verdict,
                        lambda subkey, v: subkey == records.verdict_subkey(v.author, v.target)
                        and v.model_id == model_id)


__all__ = ["start_node", "visible_maddrs", "announce", "fetch_peers", "fetch_index", "publish_verdict", "fetch_verdicts"]
