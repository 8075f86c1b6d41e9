"""swarmllm peer: the contributor node that serves a contiguous range of a model's blocks.

The wire contract (RPC names, messages, error codes) and the model's layout (which modules are blocks,
loading a part of a checkpoint) live in the top-level packages ``wire/`` and ``layout/``, not here.

Files:
- blocks.py      the generic block runner (the model's own base model holding the peer's blocks)
- compute.py     the compute owner: one thread runs every forward, batching sessions' decode steps
- sessions.py    inference sessions inside a KV-cache budget counted in tokens
- prefixes.py    kept histories of recent sessions (digest-chain keyed), reused by sessions that start alike
- handler.py     RPC handlers: registration, the stream loop, dispatch, typed errors (the only place
                 internal failures become wire errors)
- validation.py  pure checks of open / step / probe / prefix / fetch messages (WireError or parsed values)
- reuse.py       prefix reuse for the handler: copy kept tokens, probes, named prefixes, fetches
- steps.py       a step's session bookkeeping: duplicates, rewrites, beam reorders, the result it answers
- backward.py    the backward RPC's requests: chunks in, input gradients out
- push.py        server-to-server pushes to the downstream hops of a route ("next")
- counters.py    the handler's work counters, as statistics() reports them
- adversary.py   TESTING AID: peers that lie (--adversary), wired in by the server only
- metrics.py     Prometheus exposition of statistics() (--metrics-port)
- placement.py   the pure placement policy: which blocks to serve, when to move
- quant.py       devices, quantized formats and how many blocks fit in memory
- config.py      PeerConfig and its command-line arguments
- server.py      the peer process: load, join the DHT, serve, announce, drain on SIGTERM
"""

from peer import placement  # public: the pure placement policy (the simulator runs it too)

__all__ = ["placement"]
