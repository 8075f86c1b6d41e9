"""A TESTING AID: peers that lie, so verification can be tested and demonstrated.

`swarmllm peer ... --adversary MODE[:RATE][@after=N]` makes the peer corrupt a fraction RATE (default 1)
of the steps it serves, after serving its first N steps (default 0) honestly: a long con, which earns
trust before it lies. A step is one forward call through ``AdversarialRunner`` (a session's prefill or
decode step, or a stateless forward such as an audit's re-run); ``PushTamper`` counts the pushes it is
handed (one per step a peer pushes onward). Modes:
- noise          adds Gaussian noise of 30 % of the update's size to the output
- identity       returns its input unchanged (skips all its work, pretends otherwise)
- skip           runs every block of the request but the last
- wrong_weights  computes with different weights (re-drawn with another seed)
- low_precision  computes with weights rounded to a 4-bit grid (a cheaper format than declared)
- equivocate     computes honestly and returns the honest output to the client, but pushes the next
                 peer of the route a noisy copy (the client catches it by the next peer's input digest)
- slow           computes honestly but takes SLOW_SECONDS longer (a peer slower than the throughput it
                 announces: routing must rank it by what it delivers)
The peer still keeps its cache consistent with what it pretends, and announces itself as honest.
The server wraps the runner in ``AdversarialRunner`` and hands the handler's push seam a ``PushTamper``
(``PeerHandler(tamper_push=...)``), only with ``--adversary``.
"""

from __future__ import annotations

import dataclasses
import random
import time

import torch

from peer.blocks import BlockRunner, SpanCache

MODES = ("noise", "identity", "skip", "wrong_weights", "low_precision", "equivocate", "slow")
SLOW_SECONDS = 0.25  # far above an honest step even on a loaded 2-core machine (87 ms measured under load)


@dataclasses.dataclass(frozen=True)
class Adversary:
    mode: str
    rate: float = 1.0  # fraction of steps corrupted
    after: int = 0  # steps served honestly before the first lie

    @classmethod
    def parse(cls, text: str) -> "Adversary":
        """``MODE[:RATE][@after=N]``, e.g. ``wrong_weights``, ``noise:0.3``, ``wrong_weights@after=20``."""
        head, at, tail = text.partition("@")
        after = 0
        if at:
            key, eq, steps = tail.partition("=")
            if key != "after" or not eq:
                raise ValueError(f"--adversary takes MODE[:RATE][@after=N] (N: steps served honestly first), "
                                 f"got {text!r}: write e.g. wrong_weights@after=20")
            try:
                after = int(steps)
            except ValueError:
                raise ValueError(f"--adversary @after=N needs a whole number of steps >= 0, got {steps!r} "
                                 f"in {text!r}") from None
            if after < 0:
                raise ValueError(f"--adversary @after=N needs a whole number of steps >= 0, got {after}")
        mode, _, rate = head.partition(":")
        if mode not in MODES:
            raise ValueError(f"--adversary mode must be one of {MODES}, got {mode!r}")
        try:
            value = float(rate) if rate else 1.0
        except ValueError:
            raise ValueError(f"--adversary rate must be a number in (0, 1], got {rate!r}") from None
        if not 0 < value <= 1:
            raise ValueError(f"--adversary rate must be in (0, 1], got {value}")
        return cls(mode, value, after)


def _corrupt_weights(runner: BlockRunner, mode: str) -> None:
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, param in runner.module.named_parameters():
            if param.ndim < 2:
                continue
            if mode == "wrong_weights":
                fresh = torch.randn(param.shape, generator=generator) * param.float().std()
                param.copy_(fresh.to(param.dtype))
            else:  # low_precision: symmetric 4-bit grid per output row
                w = param.float()
                scale = w.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 7
                param.copy_((torch.round(w / scale).clamp(-8, 7) * scale).to(param.dtype))


class PushTamper:
    """What an adversarial peer pushes to the next peer of a route instead of its output ``out`` (batch, t,
    hidden): in mode ``equivocate``, a noisy copy on a fraction ``rate`` of the pushes after the first
    ``after``; else ``out``. A peer with one pushes every step in full (a named prefix would let the next
    hop use the honest inputs)."""

    def __init__(self, adversary: Adversary, seed: int | None = None):
        self.adversary = adversary
        self._rng = random.Random(seed)
        self.pushes = 0  # pushes handed to this tamper so far (the first ``after`` go out honest)

    def __call__(self, out: torch.Tensor) -> torch.Tensor:
        self.pushes += 1
        if (self.adversary.mode != "equivocate" or self.pushes <= self.adversary.after
                or self._rng.random() >= self.adversary.rate):
            return out
        return (out.float() + 0.1 * out.float().std() * torch.randn_like(out.float())).to(out.dtype)


class AdversarialRunner:
    """Wraps an honest BlockRunner and lies on a fraction of the steps after the first ``after`` (a step:
    one ``forward`` call)."""

    def __init__(self, honest: BlockRunner, adversary: Adversary, model_dir: str, seed: int | None = None):
        self.honest, self.adversary = honest, adversary
        self._rng = random.Random(seed)
        self.steps = 0  # forward calls so far (the first ``after`` are honest)
        self._evil: BlockRunner | None = None
        if adversary.mode in ("wrong_weights", "low_precision"):
            self._evil = BlockRunner(model_dir, honest.start, honest.end, dtype=honest.dtype_name,
                                     device=str(honest.device))
            _corrupt_weights(self._evil, adversary.mode)

    def __getattr__(self, name):  # everything else (start, end, hidden_size, new_cache, ...) is the honest runner's
        return getattr(self.honest, name)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                cache: SpanCache) -> torch.Tensor:
        self.steps += 1
        waiting = self.steps <= self.adversary.after
        if self.adversary.mode in ("equivocate", "slow") or waiting or self._rng.random() >= self.adversary.rate:
            if self.adversary.mode == "slow" and not waiting and self._rng.random() < self.adversary.rate:
                time.sleep(SLOW_SECONDS)  # on the compute thread, as slow hardware would be
            return self.honest.forward(hidden, position_ids, attention_mask, cache)
        mode = self.adversary.mode
        if mode in ("wrong_weights", "low_precision"):
            return self._evil.forward(hidden, position_ids, attention_mask, cache)
        if mode == "skip" and cache.end - cache.start > 1:
            view = self.honest._view(cache.start, cache.end - 1)  # same cache: its last layer is never filled
            return self.honest.run_view(view, hidden, position_ids, attention_mask, cache)
        out = self.honest.forward(hidden, position_ids, attention_mask, cache)  # keeps the cache plausible
        if mode == "identity" or mode == "skip":
            return hidden.to(out.dtype).clone()
        delta = (out.float() - hidden.float())  # noise
        scale = 0.3 * delta.norm(dim=-1, keepdim=True) / delta.shape[-1] ** 0.5
        return (out.float() + scale * torch.randn_like(delta)).to(out.dtype)
