"""The client's exceptions: one hierarchy, raised by the transport and the session layers."""

from __future__ import annotations

import wire


class SwarmError(RuntimeError):
    """Base class of every error the client raises about the swarm."""


class UnverifiableError(SwarmError):
    """verify_mode="strict" could not have a span checked: no other peer serves those blocks in that format."""


class MissingBlocksError(SwarmError):
    """No usable peer serves some blocks of the model."""

    def __init__(self, model_id: str, missing: list[tuple[int, int]], num_blocks: int, waited: float = 0.0,
                 formats: tuple[str, ...] | None = None, others: tuple[str, ...] = ()):
        self.model_id, self.missing, self.num_blocks, self.waited = model_id, missing, num_blocks, waited
        self.formats, self.others = formats, others
        spans = ", ".join(f"[{a}, {b})" for a, b in missing)
        where = f" in format {' or '.join(formats)}" if formats else ""
        other = (f" (peers of other formats serve it: {', '.join(others)}; allow them with formats=[...] / "
                 "--formats, accepting outputs of mixed precision)") if others else ""
        super().__init__(
            f"no online peer serves blocks {spans} of model {model_id} ({num_blocks} blocks){where}"
            + (f" after waiting {waited:.1f} s" if waited else "") + other
            + ": start a peer for them (swarmllm peer MODEL --blocks A:B) or check the swarm health page"
        )


class PeerError(SwarmError):
    """A peer failed, timed out, or answered with an error. ``recoverable``: another peer may succeed."""

    def __init__(self, peer_id: str, message: str, *, code: str | None = None, recoverable: bool = True,
                 retry_after: float | None = None):
        self.peer_id, self.code, self.recoverable, self.retry_after = peer_id, code, recoverable, retry_after
        super().__init__(f"peer {peer_id}: {message}")


class PeerBusy(PeerError):
    """The peer's cache budget is full right now."""


class Equivocation(PeerError):
    """A peer pushed the next peer different hidden states from the ones it returned to the client."""


# Refusals that say nothing bad about the peer: it is full, has moved to other blocks, is leaving, or no
# longer keeps a prefix a step named (wire error codes).
NOT_A_FAULT = frozenset(c.value for c in (wire.ErrorCode.BUSY, wire.ErrorCode.WRONG_BLOCKS, wire.ErrorCode.DRAINING,
                                          wire.ErrorCode.UNKNOWN_PREFIX))


def is_fault(error: PeerError) -> bool:
    """Whether a peer's failure counts against it (bans, reputation), as opposed to a plain refusal."""
    return error.code not in NOT_A_FAULT
