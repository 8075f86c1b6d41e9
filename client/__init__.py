"""swarmllm client: generate text through a swarm of peers.

Files:
- model.py     AutoDistributedModelForCausalLM (the HF-style model; generate() unchanged)
- swarm.py     swarm view, routes and inference sessions (async core + sync face)
- routing.py   pure route planning over a snapshot of peer records
- transport.py every network call; maps hivemind/p2p failures to client errors
- loop.py      the event-loop thread (the one sync -> async crossing)
- errors.py    the client's exception hierarchy
- cli.py       `swarmllm generate`
"""

from client.errors import MissingBlocksError, PeerBusy, PeerError, SwarmError, UnverifiableError
from client.model import AutoDistributedModelForCausalLM
from client import routing  # public: the pure route planner (the simulator runs it too)
from client.swarm import ClientConfig, RemoteSession, RemoteSwarm

__all__ = [
    "AutoDistributedModelForCausalLM", "ClientConfig", "routing", "RemoteSession", "RemoteSwarm",
    "SwarmError", "MissingBlocksError", "PeerError", "PeerBusy", "UnverifiableError",
]
