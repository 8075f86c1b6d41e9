"""The auditor: re-runs a span a peer served on another peer serving the same blocks, and judges.

Network access is injected (it never imports ``client``): ``candidates(start, end, dtype, quant, exclude)``
lists peers that could re-run [start, end) in that format (peers of other formats compute other
numbers and are never judged against each other), and ``replay(peer_id, start, end, hidden,
position_ids, mask)`` runs the whole prefix on a peer as one stateless forward (the ordinary
forward RPC, so the re-running peer cannot tell an audit from any other request; the audited peer
never hears of it). A disagreement goes to a third peer (2 of 3); no majority penalises nobody.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Awaitable, Callable, Iterable

import torch

from verify.compare import Comparison, compare
from verify.policy import SamplingPolicy
from verify.reputation import ReputationBook, Status, Verdict

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServedSpan:
    """What one peer computed for one session: its inputs and outputs, step by step."""

    peer_id: str
    start: int
    end: int
    dtype: str
    hidden: list[torch.Tensor]  # per step (batch, t, hidden): what the peer received
    position_ids: list[torch.Tensor]  # per step (batch, t)
    mask: torch.Tensor | None  # (batch, total tokens) as of the last step, or None
    outputs: list[torch.Tensor]  # per step (batch, t, hidden): what the peer answered
    quant: str = "none"  # the peer's weight format (with dtype: whom its work may be compared with)


@dataclasses.dataclass(frozen=True)
class AuditResult:
    peer_id: str
    verdict: Verdict
    checker: str | None = None
    referee: str | None = None
    comparison: Comparison | None = None


Candidates = Callable[[int, int, str, str, frozenset[str]], list[str]]
Replay = Callable[[str, int, int, torch.Tensor, torch.Tensor, "torch.Tensor | None"], Awaitable[torch.Tensor]]
Publish = Callable[[AuditResult, ServedSpan], Awaitable[None]]


class Auditor:
    def __init__(self, book: ReputationBook, policy: SamplingPolicy, candidates: Candidates, replay: Replay,
                 replay_errors: tuple[type[BaseException], ...] = (), publish: Publish | None = None):
        self.book, self.policy, self.candidates, self.replay = book, policy, candidates, replay
        self.publish = publish  # where conclusive verdicts are published (signed), if anywhere
        self.replay_errors = replay_errors  # a re-running peer that fails this way is skipped, not judged
        self.results: list[AuditResult] = []

    def sampled(self, span: ServedSpan) -> bool:
        """Decide, after the peer has answered, whether to audit this span."""
        return bool(span.hidden) and self.policy.should_audit(self.book.status(span.peer_id))

    async def audit(self, span: ServedSpan) -> AuditResult:
        result = await self._judge(span)
        if self.publish is not None and result.verdict != Verdict.IMPOSSIBLE:
            await self.publish(result, span)
        return result

    async def _judge(self, span: ServedSpan) -> AuditResult:
        x = torch.cat(span.hidden, dim=1)  # (batch, T, hidden): the whole prefix
        positions = torch.cat(span.position_ids, dim=1)  # (batch, T)
        y_a = torch.cat(span.outputs, dim=1)
        mask_tail = None if span.mask is None else span.mask[:, -x.shape[1]:]
        checker, y_b = await self._run_elsewhere(span, x, positions, {span.peer_id})
        if checker is None:
            return self._finish(AuditResult(span.peer_id, Verdict.IMPOSSIBLE), span)
        first = compare(x, y_a, y_b, span.dtype, span.dtype, mask_tail)
        if first.agree:
            return self._finish(AuditResult(span.peer_id, Verdict.PASS, checker, comparison=first), span)
        referee, y_c = await self._run_elsewhere(span, x, positions, {span.peer_id, checker})
        if referee is None:
            self.book.record(checker, Verdict.INCONCLUSIVE)
            return self._finish(AuditResult(span.peer_id, Verdict.INCONCLUSIVE, checker, comparison=first), span)
        a_vs_c = compare(x, y_a, y_c, span.dtype, span.dtype, mask_tail)
        b_vs_c = compare(x, y_b, y_c, span.dtype, span.dtype, mask_tail)
        if not a_vs_c.agree and b_vs_c.agree:
            verdict = Verdict.GROSS_FAIL if a_vs_c.gross else Verdict.FAIL
            self.book.record(checker, Verdict.PASS)
            return self._finish(AuditResult(span.peer_id, verdict, checker, referee, a_vs_c), span)
        if a_vs_c.agree and not b_vs_c.agree:  # the checker lied (or is broken): it pays, not the primary
            self.book.record(checker, Verdict.GROSS_FAIL if b_vs_c.gross else Verdict.FAIL)
            self.results.append(AuditResult(checker, Verdict.FAIL, span.peer_id, referee, b_vs_c))
            return self._finish(AuditResult(span.peer_id, Verdict.PASS, checker, referee, a_vs_c), span)
        self.book.record(checker, Verdict.INCONCLUSIVE)
        return self._finish(AuditResult(span.peer_id, Verdict.INCONCLUSIVE, checker, referee, a_vs_c), span)

    def _finish(self, result: AuditResult, span: ServedSpan) -> AuditResult:
        self.book.record(result.peer_id, result.verdict)
        self.results.append(result)
        log = logger.warning if result.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL) else logger.info
        log("audit of %s on blocks [%d, %d): %s (checker %s, referee %s)", result.peer_id, span.start, span.end,
            result.verdict.value, result.checker, result.referee)
        return result

    async def _run_elsewhere(self, span: ServedSpan, x: torch.Tensor, positions: torch.Tensor,
                             exclude: Iterable[str]) -> tuple[str | None, torch.Tensor | None]:
        """Re-run the prefix on a randomly chosen, non-banned peer of the same format (trying others if
        one fails to answer)."""
        excluded = set(exclude)
        while True:
            options = [p for p in self.candidates(span.start, span.end, span.dtype, span.quant, frozenset(excluded))
                       if self.book.status(p) != Status.BANNED]
            if not options:
                return None, None
            peer = self.policy.pick(options)
            try:
                return peer, await self.replay(peer, span.start, span.end, x, positions, span.mask)
            except self.replay_errors as e:
                logger.info("audit replay on %s failed (%s); trying another peer", peer, e)
                excluded.add(peer)
