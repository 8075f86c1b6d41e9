"""The swarm record schema: the one place that knows how a peer's announcement is laid out.

Pure: no I/O. A record is a msgpack-able dict with a version field ``v``; decoding is strict about the
fields it knows (types, ranges) and ignores unknown extra fields, so newer peers can add fields
without breaking older clients.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
from typing import Any, Mapping

RECORD_VERSION = 1
WIRE_VERSION = 1
KEY_PREFIX = "swarmllm:v1"
SUBKEY_PREFIX = "peer:"
VERDICT_PREFIX = "verdict:"
PROOF_PREFIX = "proof:"
VERDICTS = ("pass", "fail", "gross_fail", "inconclusive", "impossible")

_MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,127}$")
_MODEL_TYPE_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")
DTYPES = ("float32", "bfloat16", "float16")
QUANTS = ("none", "int8", "nf4")  # how a peer stores its block weights (bitsandbytes LLM.int8 / NF4)
MAX_NAME_CHARS = 64
MAX_MADDRS = 16
MAX_MADDR_CHARS = 256
MAX_VERSION_CHARS = 64
# Every field above is bounded, so an encoded record is too (about 4.5 KiB at most); a DHT node refuses
# a value larger than this (dht/validator.py), whoever signed it.
MAX_RECORD_BYTES = 8192


class RecordError(ValueError):
    """A record (or a field of it) is malformed."""


class PeerState(str, enum.Enum):
    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"


@dataclasses.dataclass(frozen=True)
class PeerRecord:
    """What one peer announces about itself for one model."""

    peer_id: str  # base58 libp2p peer id; the record's subkey is derived from it
    model_id: str
    start: int  # first block served
    end: int  # one past the last block served
    state: PeerState
    throughput: float  # inference steps per second through the whole span (tokens/s, batch 1)
    dtype: str
    cache_tokens_left: int  # tokens of KV cache still free (per block of the span)
    version: str  # swarmllm software version
    public_name: str = ""
    wire_version: int = WIRE_VERSION
    maddrs: tuple[str, ...] = ()  # multiaddrs the peer is reachable at
    relayed: bool = False  # reachable only through a libp2p circuit relay
    num_sessions: int = 0  # inference sessions open right now
    model_blocks: int = 0  # blocks in the whole model (0 = not said), so a monitor can draw coverage
    model_type: str = ""  # the transformers family ('llama', 'mixtral', 'bloom', …; "" = not said)
    num_parameters: int = 0  # parameters the peer holds for its blocks (0 = not said)
    quant: str = "none"  # weight format of its blocks ("none" also for older peers, which had no other)
    backward: bool = False  # serves the backward RPC (fine-tuning through the swarm); older peers do not

    def __post_init__(self) -> None:
        _check_model_id(self.model_id)
        if not (isinstance(self.start, int) and isinstance(self.end, int) and 0 <= self.start < self.end):
            raise RecordError(f"block range must satisfy 0 <= start < end, got [{self.start}, {self.end})")
        if not isinstance(self.state, PeerState):
            raise RecordError(f"state must be a PeerState, got {self.state!r}")
        if self.dtype not in DTYPES:
            raise RecordError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not (self.throughput >= 0.0 and self.throughput < float("inf")):
            raise RecordError(f"throughput must be a finite number >= 0, got {self.throughput!r}")
        if self.cache_tokens_left < 0:
            raise RecordError(f"cache_tokens_left must be >= 0, got {self.cache_tokens_left}")
        if len(self.public_name) > MAX_NAME_CHARS:
            raise RecordError(f"public_name is longer than {MAX_NAME_CHARS} characters")
        if self.num_sessions < 0:
            raise RecordError(f"num_sessions must be >= 0, got {self.num_sessions}")
        if len(self.maddrs) > MAX_MADDRS:
            raise RecordError(f"at most {MAX_MADDRS} multiaddrs, got {len(self.maddrs)}")
        if any(len(m) > MAX_MADDR_CHARS for m in self.maddrs):
            raise RecordError(f"a multiaddr is longer than {MAX_MADDR_CHARS} characters")
        if len(self.version) > MAX_VERSION_CHARS:
            raise RecordError(f"version is longer than {MAX_VERSION_CHARS} characters")
        if self.model_type and not _MODEL_TYPE_RE.match(self.model_type):
            raise RecordError(f"model_type must be up to 64 letters, digits, '_' or '-', got {self.model_type!r}")
        if self.num_parameters < 0:
            raise RecordError(f"num_parameters must be >= 0, got {self.num_parameters}")
        if self.quant not in QUANTS:
            raise RecordError(f"quant must be one of {QUANTS}, got {self.quant!r}")

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    @property
    def format(self) -> str:
        return format_name(self.dtype, self.quant)


def format_name(dtype: str, quant: str) -> str:
    """A peer's numeric format as people write it: 'bfloat16', 'bfloat16/nf4' (compute dtype / weights)."""
    return dtype if quant == "none" else f"{dtype}/{quant}"


def encode(record: PeerRecord) -> dict[str, Any]:
    """PeerRecord -> plain dict ready for msgpack (the DHT value)."""
    return {
        "v": RECORD_VERSION,
        "peer_id": record.peer_id,
        "model_id": record.model_id,
        "start": record.start,
        "end": record.end,
        "state": record.state.value,
        "throughput": float(record.throughput),
        "dtype": record.dtype,
        "cache_tokens_left": int(record.cache_tokens_left),
        "version": record.version,
        "public_name": record.public_name,
        "wire_version": record.wire_version,
        "maddrs": list(record.maddrs),
        "relayed": record.relayed,
        "num_sessions": record.num_sessions,
        "model_blocks": record.model_blocks,
        "model_type": record.model_type,
        "num_parameters": int(record.num_parameters),
        "quant": record.quant,
        "backward": record.backward,
    }


_MISSING = object()


def _field(obj: Mapping[str, Any], name: str, types: type | tuple[type, ...], default: Any = _MISSING) -> Any:
    if name not in obj:
        if default is not _MISSING:
            return default  # a field added after version 1: older peers do not send it
        raise RecordError(f"record lacks the field {name!r}")
    value = obj[name]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise RecordError(f"field {name!r} must be {types}, got a bool")
    if not isinstance(value, types):
        raise RecordError(f"field {name!r} must be {types}, got {type(value).__name__}")
    return value


def decode(obj: Any) -> PeerRecord:
    """Plain dict (as read from the DHT) -> PeerRecord. Raises RecordError on anything malformed."""
    if not isinstance(obj, Mapping):
        raise RecordError(f"a record must be a mapping, got {type(obj).__name__}")
    version = _field(obj, "v", int)
    if version != RECORD_VERSION:
        raise RecordError(f"record version {version} is not supported (this software reads {RECORD_VERSION})")
    state_text = _field(obj, "state", str)
    try:
        state = PeerState(state_text)
    except ValueError:
        raise RecordError(f"unknown peer state {state_text!r}") from None
    maddrs = _field(obj, "maddrs", (list, tuple))
    if not all(isinstance(m, str) for m in maddrs):
        raise RecordError("field 'maddrs' must be a list of strings")
    return PeerRecord(
        peer_id=_field(obj, "peer_id", str),
        model_id=_field(obj, "model_id", str),
        start=_field(obj, "start", int),
        end=_field(obj, "end", int),
        state=state,
        throughput=float(_field(obj, "throughput", (int, float))),
        dtype=_field(obj, "dtype", str),
        cache_tokens_left=_field(obj, "cache_tokens_left", int),
        version=_field(obj, "version", str),
        public_name=_field(obj, "public_name", str),
        wire_version=_field(obj, "wire_version", int),
        maddrs=tuple(maddrs),
        relayed=_field(obj, "relayed", bool, False),
        num_sessions=_field(obj, "num_sessions", int, 0),
        model_blocks=_field(obj, "model_blocks", int, 0),
        model_type=_field(obj, "model_type", str, ""),
        num_parameters=_field(obj, "num_parameters", int, 0),
        quant=_field(obj, "quant", str, "none"),
        backward=_field(obj, "backward", bool, False),
    )


def _check_model_id(model_id: Any) -> None:
    if not isinstance(model_id, str) or not _MODEL_ID_RE.match(model_id):
        raise RecordError(
            f"model id must be 1-128 characters of letters, digits, '.', '_' or '-', got {model_id!r}"
        )


# ---- the directory layout ----
# Directory layout 2 (this one): a peer's record goes under ONE of its model's ``MODEL_SHARDS`` keys
# (picked by its peer id), and its model's entry (not the peer) goes in the models index: two writes
# per announce whatever the swarm's size, and no DHT value holds more than about a sixteenth of one
# model's peers (hivemind answers a lookup in one message of at most 4 MiB: one key holding 10,000
# records of ~600 bytes would not fit). Layout 1 (older peers) wrote every record under
# ``model_key`` and again under ``INDEX_KEY``: readers still read both, so older peers stay usable.
MODEL_SHARDS = 16
MODELS_KEY = f"{KEY_PREFIX}:models"  # one entry per model that some peer announces (for monitors)
MODEL_SUBKEY_PREFIX = "model:"
INDEX_KEY = f"{KEY_PREFIX}:index"  # layout 1: every peer's record again, all models together (read only)


def model_key(model_id: str) -> str:
    """Layout 1's key for every peer of one model (still read: older peers write there)."""
    _check_model_id(model_id)
    return f"{KEY_PREFIX}:{model_id}:peers"


def shard_of(peer_id: str) -> int:
    """Which of its model's shard keys a peer announces under (stable for its id)."""
    return hashlib.sha256(peer_id.encode()).digest()[0] % MODEL_SHARDS


def shard_key(model_id: str, shard: int) -> str:
    """The DHT key of one shard of a model's peers (one subkey per peer, as under ``model_key``)."""
    if not (isinstance(shard, int) and 0 <= shard < MODEL_SHARDS):
        raise ValueError(f"a shard is 0..{MODEL_SHARDS - 1}, got {shard!r}")
    return f"{model_key(model_id)}:{shard}"


def peer_keys(model_id: str) -> list[str]:
    """Every key a reader of one model's peers looks up: the shards, then layout 1's single key."""
    return [shard_key(model_id, s) for s in range(MODEL_SHARDS)] + [model_key(model_id)]


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """The models index's entry for one model: that it is served, and what a monitor needs to draw it.
    Whichever peer of the model announced last wrote it (and signed it); it is a pointer, not a
    claim anyone relies on: the model's own keys are read for the peers and their records."""

    model_id: str
    writer: str  # peer id of the peer that wrote (and signed) this entry
    model_type: str = ""
    model_blocks: int = 0

    def __post_init__(self) -> None:
        _check_model_id(self.model_id)
        if not isinstance(self.writer, str) or not 0 < len(self.writer) <= 128:
            raise RecordError(f"writer must be a peer id, got {self.writer!r}")
        if self.model_type and not _MODEL_TYPE_RE.match(self.model_type):
            raise RecordError(f"model_type must be up to 64 letters, digits, '_' or '-', got {self.model_type!r}")
        if not (isinstance(self.model_blocks, int) and self.model_blocks >= 0):
            raise RecordError(f"model_blocks must be an integer >= 0, got {self.model_blocks!r}")


def model_entry(record: PeerRecord) -> ModelEntry:
    return ModelEntry(record.model_id, record.peer_id, record.model_type, record.model_blocks)


def encode_model_entry(entry: ModelEntry) -> dict[str, Any]:
    return {"v": RECORD_VERSION, **dataclasses.asdict(entry)}


def decode_model_entry(obj: Any) -> ModelEntry:
    if not isinstance(obj, Mapping):
        raise RecordError(f"a model entry must be a mapping, got {type(obj).__name__}")
    if _field(obj, "v", int) != RECORD_VERSION:
        raise RecordError(f"model entry version {obj.get('v')} is not supported")
    return ModelEntry(model_id=_field(obj, "model_id", str), writer=_field(obj, "writer", str),
                      model_type=_field(obj, "model_type", str, ""), model_blocks=_field(obj, "model_blocks", int, 0))


def model_subkey(model_id: str) -> str:
    _check_model_id(model_id)
    return MODEL_SUBKEY_PREFIX + model_id


def model_from_subkey(subkey: str) -> str | None:
    if isinstance(subkey, str) and subkey.startswith(MODEL_SUBKEY_PREFIX):
        return subkey[len(MODEL_SUBKEY_PREFIX):]
    return None


def subkey_for(peer_id: str) -> str:
    return SUBKEY_PREFIX + peer_id


def peer_id_from_subkey(subkey: str) -> str | None:
    """The peer id a subkey claims, or None when the subkey is not one of ours."""
    if isinstance(subkey, str) and subkey.startswith(SUBKEY_PREFIX):
        return subkey[len(SUBKEY_PREFIX):]
    return None


# Config fields that do not change what the blocks compute; they are left out of the model id.
_VOLATILE_CONFIG_FIELDS = frozenset(
    {"transformers_version", "torch_dtype", "dtype", "_name_or_path", "architectures", "use_cache",
     "attn_implementation", "_attn_implementation", "output_attentions", "output_hidden_states"}
)


def derive_model_id(config: Mapping[str, Any]) -> str:
    """A model id from a checkpoint's config.json contents: '<model_type>-<layers>L-<hash of config>'.

    Peers of different checkpoints (different architecture or sizes) get different ids and never mix.
    Checkpoints that share a config but not weights (fine-tunes) need an explicit --model-id.
    """
    stable = {k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_FIELDS}
    digest = hashlib.sha256(json.dumps(stable, sort_keys=True, default=str).encode()).hexdigest()[:12]
    model_type = re.sub(r"[^A-Za-z0-9_\-]", "-", str(config.get("model_type", "model")))[:32] or "model"
    return f"{model_type}-{config.get('num_hidden_layers', 0)}L-{digest}"


# ---- verdicts: what a client's audits concluded about a peer, published under the client's own id ----

@dataclasses.dataclass(frozen=True)
class VerdictRecord:
    author: str  # peer id of the client that ran the audit (the record is signed by its key)
    target: str  # peer id of the audited peer
    model_id: str
    start: int
    end: int
    verdict: str  # one of VERDICTS
    median_error: float  # per-token relative update error against the agreeing peers (nan if none)
    max_error: float
    time: float  # unix seconds

    def __post_init__(self) -> None:
        _check_model_id(self.model_id)
        if self.verdict not in VERDICTS:
            raise RecordError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
        if not 0 <= self.start < self.end:
            raise RecordError(f"block range must satisfy 0 <= start < end, got [{self.start}, {self.end})")


def encode_verdict(v: VerdictRecord) -> dict[str, Any]:
    return {"v": RECORD_VERSION, **dataclasses.asdict(v)}


def decode_verdict(obj: Any) -> VerdictRecord:
    if not isinstance(obj, Mapping):
        raise RecordError(f"a verdict must be a mapping, got {type(obj).__name__}")
    if _field(obj, "v", int) != RECORD_VERSION:
        raise RecordError(f"verdict version {obj.get('v')} is not supported")
    return VerdictRecord(
        author=_field(obj, "author", str), target=_field(obj, "target", str),
        model_id=_field(obj, "model_id", str), start=_field(obj, "start", int), end=_field(obj, "end", int),
        verdict=_field(obj, "verdict", str), median_error=float(_field(obj, "median_error", (int, float))),
        max_error=float(_field(obj, "max_error", (int, float))), time=float(_field(obj, "time", (int, float))),
    )


def _model_key(model_id: str, kind: str) -> str:
    _check_model_id(model_id)
    return f"{KEY_PREFIX}:{model_id}:{kind}"


def _first_of(prefix: str, subkey: str) -> str | None:
    """The author in a '<prefix><author>:<other>' subkey, None if the subkey is not of that kind."""
    if isinstance(subkey, str) and subkey.startswith(prefix):
        return subkey[len(prefix):].split(":", 1)[0]
    return None


def verdict_key(model_id: str) -> str:
    return _model_key(model_id, "verdicts")


def verdict_subkey(author: str, target: str) -> str:
    """One verdict per (author, target): the latest replaces the previous."""
    return f"{VERDICT_PREFIX}{author}:{target}"


def author_from_subkey(subkey: str) -> str | None:
    return _first_of(VERDICT_PREFIX, subkey)


# ---- fraud proofs: a client that caught a peer lying says where the signed evidence can be fetched ----

@dataclasses.dataclass(frozen=True)
class ProofRecord:
    author: str  # peer id of the client that holds the proof (the record is signed by its key)
    accused: str  # peer id of the peer whose signed outputs the proof shows wrong
    model_id: str
    start: int  # the accused's span
    end: int
    digest: str  # sha256 (hex) of the proof (verify.proofs.FraudProof.digest): a fetched proof must match
    maddrs: tuple[str, ...]  # where the author serves it (wire RPC_PROOF)
    time: float  # unix seconds

    def __post_init__(self) -> None:
        _check_model_id(self.model_id)
        if not 0 <= self.start < self.end:
            raise RecordError(f"block range must satisfy 0 <= start < end, got [{self.start}, {self.end})")
        if not re.fullmatch(r"[0-9a-f]{64}", self.digest):
            raise RecordError(f"a proof digest is 64 hex digits, got {self.digest!r}")
        if len(self.maddrs) > MAX_MADDRS or not all(isinstance(m, str) and len(m) <= MAX_MADDR_CHARS for m in self.maddrs):
            raise RecordError(f"at most {MAX_MADDRS} multiaddrs of at most {MAX_MADDR_CHARS} characters")


def encode_proof(p: ProofRecord) -> dict[str, Any]:
    return {"v": RECORD_VERSION, **dataclasses.asdict(p), "maddrs": list(p.maddrs)}


def decode_proof(obj: Any) -> ProofRecord:
    if not isinstance(obj, Mapping):
        raise RecordError(f"a proof record must be a mapping, got {type(obj).__name__}")
    if _field(obj, "v", int) != RECORD_VERSION:
        raise RecordError(f"proof record version {obj.get('v')} is not supported")
    maddrs = _field(obj, "maddrs", (list, tuple))
    return ProofRecord(
        author=_field(obj, "author", str), accused=_field(obj, "accused", str), model_id=_field(obj, "model_id", str),
        start=_field(obj, "start", int), end=_field(obj, "end", int), digest=_field(obj, "digest", str),
        maddrs=tuple(maddrs), time=float(_field(obj, "time", (int, float))))


def proof_key(model_id: str) -> str:
    return _model_key(model_id, "proofs")


def proof_subkey(author: str, accused: str) -> str:
    """One proof per (author, accused): one is enough to ban, the latest replaces the previous."""
    return f"{PROOF_PREFIX}{author}:{accused}"


def proof_author_from_subkey(subkey: str) -> str | None:
    return _first_of(PROOF_PREFIX, subkey)
