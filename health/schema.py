"""The health snapshot's schema: pydantic models shared by the page, the JSON API and /docs."""

from __future__ import annotations

from pydantic import BaseModel


class PeerView(BaseModel):
    peer_id: str
    short_id: str
    public_name: str
    start: int
    end: int
    state: str
    dtype: str
    quant: str = "none"  # weight format: none, int8, nf4
    format: str = ""  # dtype and quant as one label: 'float32', 'bfloat16/nf4'
    num_parameters: int  # parameters the peer holds for its blocks (0 = not announced)
    throughput: float  # announced steps/s over the span
    rtt_ms: float | None  # measured by the monitor; None = no answer
    reachable: bool  # answered the monitor's info RPC
    cache_tokens_left: int
    num_sessions: int
    relayed: bool
    version: str
    uptime_s: float | None  # from the peer's info RPC
    audits_passed: int | None  # None: no verdict about this peer has been published
    audits_failed: int | None
    last_verdict: str | None


class BlockCell(BaseModel):
    block: int
    online: int  # online peers serving this block
    peers: list[str]  # their names (public name or short id)


class ProofView(BaseModel):
    """A fraud proof published against a peer (verify.proofs): its receipts checked by the monitor."""

    accused: str
    short_id: str
    author: str  # the client that caught the lie and serves the proof
    start: int
    end: int
    time: float  # unix seconds it was published
    status: str  # 'signed': fetched, and the accused's signatures and the digests check out (each client
    # still re-runs it before banning); 'forged': they do not (its author lied); 'unreachable': not fetched


class ModelHealth(BaseModel):
    model_id: str
    model_type: str  # the transformers family its peers announce ("" if none says)
    num_blocks: int
    coverage: list[BlockCell]
    gaps: list[tuple[int, int]]  # [start, end) ranges no online peer serves
    min_coverage: int
    peers: list[PeerView]
    proofs: list[ProofView] = []  # fraud proofs against this model's peers, newest first


class Snapshot(BaseModel):
    generated_at: float  # unix seconds
    models: list[ModelHealth]
    audits_passed: int
    audits_failed: int
