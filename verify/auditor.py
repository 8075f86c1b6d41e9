"""The auditor: re-runs a span a peer served on another peer serving the same blocks, and judges.

Network access is injected (it never imports ``client``): ``candidates(start, end, dtype, quant, exclude)``
lists checkers that could re-run [start, end) in that format (peers of other formats compute other
numbers and are never judged against each other): a checker is one peer serving the whole span or,
when no other peer does, a route of peers that split it differently (``((peer, a, b), (peer, b, c))``),
so a peer alone on its range is still checkable. ``replay(checker, hidden, position_ids, mask)`` runs
the whole prefix through the checker as stateless forwards (the ordinary forward RPC, so the re-running
peers cannot tell an audit from any other request; the audited peer never hears of it). A
disagreement goes to a referee (2 of 3); no majority penalises nobody. Checkers and referees are
never related to the audited peer (``related``: a shared address or name).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from typing import Awaitable, Callable, Iterable

import torch

from verify.compare import Comparison
from verify.compare import compare as compare_outputs
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
    session_id: str = ""  # the peer's session (what its receipts name)
    receipts: tuple = ()  # per step: the wire.receipts.Receipt the peer signed, or None (none, or no longer valid)


@dataclasses.dataclass(frozen=True)
class AuditResult:
    peer_id: str
    verdict: Verdict
    checker: str | None = None
    referee: str | None = None
    comparison: Comparison | None = None
    start: int = -1  # the audited span's blocks
    end: int = -1
    reason: str = ""  # why an audit could not judge (IMPOSSIBLE): NO_CHECKER or LOST_OUTPUTS


NO_CHECKER = "no other peer of this format serves these blocks"
LOST_OUTPUTS = "outputs the peer named could not be fetched"


Checker = tuple[tuple[str, int, int], ...]  # (peer, start, end) hops that together re-run a span
Candidates = Callable[[int, int, str, str, frozenset[str]], list[Checker]]
Replay = Callable[[Checker, torch.Tensor, torch.Tensor, "torch.Tensor | None"], Awaitable[torch.Tensor]]


def _peers(checker: Checker) -> tuple[str, ...]:
    return tuple(peer for peer, _, _ in checker)


def _name(checker: Checker) -> str:
    return "+".join(_peers(checker))
Publish = Callable[[AuditResult, ServedSpan], Awaitable[None]]


class Auditor:
    def __init__(self, book: ReputationBook, policy: SamplingPolicy, candidates: Candidates, replay: Replay,
                 replay_errors: tuple[type[BaseException], ...] = (), publish: Publish | None = None,
                 related: Callable[[str, str], bool] = lambda a, b: False,
                 load: Callable[[Checker], float] | None = None):
        self.book, self.policy, self.candidates, self.replay = book, policy, candidates, replay
        self.load = load  # how busy a checker is (re-runs in flight): the least loaded is picked, if given
        self.related = related  # peers that may be one operator (same address, /24 or name): never judge each other
        self.publish = publish  # where conclusive verdicts are published (signed), if anywhere
        self.replay_errors = replay_errors  # a re-running peer that fails this way is skipped, not judged
        self.results: list[AuditResult] = []

    def sampled(self, span: ServedSpan, every: bool = False) -> bool:
        """Decide, after the peer has answered, whether to audit this span (``every``: whatever the draw,
        as strict mode does); the book counts the sessions a peer served since its last audit."""
        if not span.hidden:
            return False
        entry = self.book.entries.get(span.peer_id)
        audit = every or self.policy.should_audit(self.book.status(span.peer_id), entry.passes if entry else 0,
                                                  entry.unchecked if entry else 0)
        self.book.drawn(span.peer_id, audit)
        return audit

    async def audit(self, span: ServedSpan) -> AuditResult:
        result = await self._judge(span)
        if self.publish is not None and result.verdict != Verdict.IMPOSSIBLE:
            await self.publish(result, span)
        return result

    async def judge(self, span: ServedSpan, compared: torch.Tensor | None = None) -> AuditResult:
        """Re-run ``span`` elsewhere and judge it as an audit would, but leave the book, the results and
        the DHT as they were (the caller decides what the verdict means: a fraud proof's ruling);
        ``compared`` (tokens,) bool: only those tokens are compared (the ones the accused signed)."""
        shadow = Auditor(copy.deepcopy(self.book), self.policy, self.candidates, self.replay, self.replay_errors,
                         related=self.related, load=self.load)
        return await shadow._judge(span, compared)

    async def _judge(self, span: ServedSpan, compared: torch.Tensor | None = None) -> AuditResult:
        x = torch.cat(span.hidden, dim=1)  # (batch, T, hidden): the whole prefix
        positions = torch.cat(span.position_ids, dim=1)  # (batch, T)
        y_a = torch.cat(span.outputs, dim=1)
        mask_tail = None if span.mask is None else span.mask[:, -x.shape[1]:]

        def compare(y_1: torch.Tensor, y_2: torch.Tensor) -> Comparison:
            if compared is None:
                return compare_outputs(x, y_1, y_2, span.dtype, span.dtype, mask_tail)
            return compare_outputs(x[:, compared], y_1[:, compared], y_2[:, compared], span.dtype, span.dtype,
                                   None if mask_tail is None else mask_tail[:, compared])

        checker, y_b = await self._run_elsewhere(span, x, positions, {span.peer_id})
        if checker is None:
            return self._finish(AuditResult(span.peer_id, Verdict.IMPOSSIBLE, reason=NO_CHECKER), span)
        first = compare(y_a, y_b)
        if first.agree:
            return self._finish(AuditResult(span.peer_id, Verdict.PASS, _name(checker), comparison=first), span)
        referee, y_c = await self._run_elsewhere(span, x, positions, {span.peer_id, *_peers(checker)})
        if referee is None:
            self._record(checker, Verdict.INCONCLUSIVE)
            return self._finish(AuditResult(span.peer_id, Verdict.INCONCLUSIVE, _name(checker), comparison=first),
                                span)
        a_vs_c = compare(y_a, y_c)
        b_vs_c = compare(y_b, y_c)
        if not a_vs_c.agree and b_vs_c.agree:
            verdict = Verdict.GROSS_FAIL if a_vs_c.gross else Verdict.FAIL
            self._record(checker, Verdict.PASS)
            return self._finish(AuditResult(span.peer_id, verdict, _name(checker), _name(referee), a_vs_c), span)
        if a_vs_c.agree and not b_vs_c.agree:  # the checker lied (or is broken): it pays, not the primary
            if len(checker) == 1:
                self.book.record(checker[0][0], Verdict.GROSS_FAIL if b_vs_c.gross else Verdict.FAIL)
                self.results.append(AuditResult(checker[0][0], Verdict.FAIL, span.peer_id, _name(referee), b_vs_c))
            else:  # one of a route's peers lied and we cannot tell which: all of them become suspects
                self._record(checker, Verdict.INCONCLUSIVE)
            return self._finish(AuditResult(span.peer_id, Verdict.PASS, _name(checker), _name(referee), a_vs_c), span)
        self._record(checker, Verdict.INCONCLUSIVE)
        return self._finish(AuditResult(span.peer_id, Verdict.INCONCLUSIVE, _name(checker), _name(referee), a_vs_c),
                            span)

    def _record(self, checker: Checker, verdict: Verdict) -> None:
        for peer in _peers(checker):
            self.book.record(peer, verdict)

    def _finish(self, result: AuditResult, span: ServedSpan) -> AuditResult:
        result = dataclasses.replace(result, start=span.start, end=span.end)
        self.book.record(result.peer_id, result.verdict)
        self.results.append(result)
        log = logger.warning if result.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL) else logger.info
        log("audit of %s on blocks [%d, %d): %s (checker %s, referee %s)", result.peer_id, span.start, span.end,
            result.verdict.value, result.checker, result.referee)
        return result

    async def _run_elsewhere(self, span: ServedSpan, x: torch.Tensor, positions: torch.Tensor,
                             exclude: Iterable[str]) -> tuple[Checker | None, torch.Tensor | None]:
        """Re-run the prefix on a randomly chosen checker of the same format, none of whose peers is
        banned or related to an excluded one (trying others if one fails to answer)."""
        exclude = set(exclude)
        excluded = set(exclude)
        while True:
            options = [c for c in self.candidates(span.start, span.end, span.dtype, span.quant, frozenset(excluded))
                       if all(self.book.status(p) != Status.BANNED and p not in excluded
                              and not any(self.related(p, q) for q in exclude) for p in _peers(c))]
            if not options:
                return None, None
            checker = self.policy.pick(options, self.load)
            try:
                return checker, await self.replay(checker, x, positions, span.mask)
            except self.replay_errors as e:
                failed = getattr(e, "peer_id", None)
                logger.info("audit replay on %s failed (%s); trying another checker", _name(checker), e)
                excluded.update([failed] if failed in _peers(checker) else _peers(checker))
