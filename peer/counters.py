"""The handler's work counters: what it served, reused and refused since the peer started. They feed
``statistics()`` (the info RPC, the health page, the Prometheus metrics) under the keys of ``as_dict``."""

from __future__ import annotations

import collections
import dataclasses


@dataclasses.dataclass
class Counters:
    requests_served: int = 0  # steps answered
    steps_computed: int = 0  # tokens x batch rows through the blocks
    pushes_received: int = 0  # steps the previous peer of a route pushed here, queued
    prefix_pushes: int = 0  # pushes that named their first inputs by a kept prefix, accepted
    outputs_omitted: int = 0  # tokens x rows of reused outputs a reply named instead of carrying
    fetches: int = 0  # kept inputs/outputs a client fetched after a reply named them
    probe_hits: int = 0  # probes that found a kept history (the client then names it instead of uploading)
    backward_tokens: int = 0  # tokens x rows whose input gradient this peer computed
    errors: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)  # wire errors sent, by code

    def as_dict(self) -> dict:
        """The statistics() keys (``tokens_computed`` is ``steps_computed``; ``errors`` a plain dict)."""
        return {"requests_served": self.requests_served, "tokens_computed": self.steps_computed,
                "pushes_received": self.pushes_received, "prefix_pushes": self.prefix_pushes,
                "backward_tokens": self.backward_tokens, "outputs_omitted": self.outputs_omitted,
                "fetches": self.fetches, "probe_hits": self.probe_hits, "errors": dict(self.errors)}
