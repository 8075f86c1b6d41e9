"""swarmllm peer: the contributor node that serves a contiguous range of a model's blocks.

Files:
- wire.py      the wire contract (RPC names, messages, error codes); with layout.py the only
               modules other packages import
- layout.py    the model's structure (which modules are blocks) and loading a part of it through
               transformers' from_pretrained (peer and client both use it)
- blocks.py    the generic block runner (the model's own base model holding the peer's blocks)
- sessions.py  inference sessions inside a KV-cache budget counted in tokens
- prefixes.py  kept histories of recent sessions (digest-chain keyed), reused by sessions that start alike
- handler.py   RPC handlers: validation, compute on one owner thread, typed errors
- config.py    PeerConfig and its command-line arguments
- server.py    the peer process: load, join the DHT, serve, announce, drain on SIGTERM
"""

from peer import placement  # public: the pure placement policy (the simulator runs it too)

__all__ = ["placement"]
