"""ClientConfig: every option of a client, built once (from ``from_pretrained``'s keywords or argv)."""

from __future__ import annotations

import dataclasses
import os

import wire
from client import routing
from verify.policy import AuditRates

DEFAULT_REPUTATION_PATH = os.environ.get(
    "SWARMLLM_REPUTATION_PATH", os.path.join(os.path.expanduser("~"), ".cache", "swarmllm", "reputation.json"))
VERIFY_MODES = ("background", "redo", "strict")


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    initial_peers: tuple[str, ...]
    model_id: str
    num_blocks: int
    hidden_size: int
    step_timeout: float = 30.0  # seconds one step may take on one peer, plus the per-token allowance
    step_timeout_per_token: float = 0.05  # seconds per token in the step
    route_timeout: float = 30.0  # seconds to wait for peers to cover missing blocks
    checker_wait: float = 90.0  # strict mode: seconds to wait for a peer that can check a span (restarting,
    # frozen) before refusing the text; longer than route_timeout: a kill, restart or freeze of every other
    # peer of a span lasts 30-45 s on a busy machine (bench.soak), and the alternative is an error
    max_retries: int = 16  # failed hops one session step may recover from before giving up
    max_chunk_tokens: int | None = None  # tokens per message; None = derived from message size
    refresh_period: float = 5.0  # seconds between background refreshes of records and pings
    ping_timeout: float = 3.0  # seconds
    record_grace: float = 60.0  # seconds a record the DHT stopped returning is kept while its peer answers pings
    stale_refresh_timeout: float = 0.5  # seconds a re-plan waits for the DHT before using its last snapshot
    ban_base: float = 2.0  # seconds a peer is avoided after its first failure (doubles each time)
    probe_after: float = 0.25  # seconds without a reply before the peer is pinged (and every this often after)
    probe_timeout: float = 1.0  # seconds a probed peer has to answer before it counts as dead or hung
    audit_rates: AuditRates = AuditRates()  # how often spans are re-run elsewhere, by the peer's standing
    reputation_path: str | None = DEFAULT_REPUTATION_PATH  # the client's book across runs; None = memory only
    identity_path: str | None = None  # the client's key (signs its verdicts); None = a fresh one per run
    verify_mode: str = "background"  # "background": audits never delay generate(); "redo": generate() waits
    # for the audits of its sessions and generates again (avoiding the cheater) if one confirms a lie;
    # "strict": every span any peer served (trusted ones too) is re-run on another peer and must match
    # before generate() returns (UnverifiableError when no other peer can check it)
    publish_proofs: bool = True  # prove a caught lie to every client (client/proofs.py); the proof carries the
    # liar's inputs (hidden states of this client's prompt), served to whoever asks: False keeps them here
    push: bool = True  # peers forward each step to the next peer (k + 1 messages per token); False = the
    # client relays every hop itself (2k messages), which is also the fallback for a link that fails
    wire_dtype: str | None = None  # hidden states on the wire: None = as computed (float32 stays bit-exact);
    # "bfloat16" / "float16" = half the bytes, negotiated with each peer when the session opens

    prefix_cache: bool = True  # peers may reuse their kept caches of earlier sessions that began with the same
    # inputs (and keep this session's for later ones); False = this client's sessions neither reuse nor leave any
    probe_min_bytes: int = 256 * 2**10  # a session's first step at least this large (on the wire) first asks the
    # first peer how much of it it keeps (one small round trip), and names that part instead of uploading it
    formats: tuple[str, ...] | None = None  # formats a route may use, mixed ("nf4", "bfloat16", "float16/int8");
    # None = one format per session, the most precise that covers every block (see client.routing)
    hop_seconds: float = 0.0  # charged per hop when planning; routing.HOP_SECONDS (0.05) is what sim/ found
    # best at 1,000 peers (fewer, longer hops: each one reserves a whole session's cache on one more peer)
    route_jitter: bool = False  # spread near-equal routes at random (routing.JITTER), so that clients planning
    # from one snapshot do not all fill the same peers; both off by default: plans stay the cheapest, as tests expect

    def __post_init__(self):
        if self.formats is not None:
            formats = (self.formats,) if isinstance(self.formats, str) else tuple(self.formats)
            if not formats:
                raise ValueError("formats must name at least one format, or be None")
            object.__setattr__(self, "formats", tuple(routing.check_format(f) for f in formats))
        if self.verify_mode not in VERIFY_MODES:
            raise ValueError(f"verify_mode must be one of {VERIFY_MODES}, got {self.verify_mode!r}")
        if self.wire_dtype is not None and self.wire_dtype not in wire.HIDDEN_DTYPE_NAMES:
            raise ValueError(f"wire_dtype must be None or one of {sorted(wire.HIDDEN_DTYPE_NAMES)}, got {self.wire_dtype!r}")
