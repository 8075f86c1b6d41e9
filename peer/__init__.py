"""swarmllm peer: the contributor node that serves a contiguous range of a model's blocks.

Files:
- wire.py      the wire contract (RPC names, messages, error codes, checkpoint layout); the only
               module other packages import
- loader.py    reads only the peer's block tensors from a safetensors checkpoint (sharded or not)
- blocks.py    the generic block runner (a truncated copy of the model's own base model)
- sessions.py  inference sessions inside a KV-cache budget counted in tokens
- handler.py   RPC handlers: validation, compute on one owner thread, typed errors
- config.py    PeerConfig and its command-line arguments
- server.py    the peer process: load, join the DHT, serve, announce, drain on SIGTERM
"""
