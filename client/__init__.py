"""swarmllm client: generate text through a swarm of peers (holding only the embeddings, final norm and head).

Files, from the top:
- model.py     AutoDistributedModelForCausalLM (the HF-style model; transformers' generate() unchanged)
- front.py     RemoteSwarm and RemoteSession: the synchronous faces (one crossing into the loop thread)
- cli.py       `swarmllm generate`; options.py: the options `generate` and `api` share
- config.py    ClientConfig: every client option
- swarm.py     SwarmCore: the view with its audits and training, and the stateless forward on one peer
- session.py   the session engine: open, step (chunks, named prefix, reorders, roll-backs), close
- step.py      one chunk through the hops: receive -> check -> advance (StepClock times decode steps)
- failover.py  replacing a failed or equivocating hop and replaying its inputs
- holes.py     outputs peers named instead of sending, fetched when something needs them
- hop.py       StepInput (what a hop was sent) and HopSession (one peer's stream in a session)
- liveness.py  probes of a late peer (dead or frozen?), and of the peer it pushes to
- view.py      SwarmView: records, pings, RTTs, timed speeds, bans, reputation book, planning
- audits.py    who can check a span, replaying it there, publishing verdicts, audit tasks
- proofs.py    proving a caught lie to everyone (serving the proof, its DHT record) and judging others' proofs
- training.py  the backward pass back along a training forward's route, with its own failover
- routing.py   pure route planning over a snapshot of peer records (public: the simulator runs it)
- bans.py      back-off bans of peers that failed (pure)
- transport.py every network call; maps hivemind/p2p failures to client errors
- loop.py      the event-loop thread
- errors.py    the client's exception hierarchy (and which refusals are not a peer's fault)
"""

from client.errors import MissingBlocksError, PeerBusy, PeerError, SwarmError, UnverifiableError
from client.model import AutoDistributedModelForCausalLM
from client import options, routing  # public: the shared CLI options; the pure route planner (sim runs it)
from client.config import ClientConfig
from client.front import RemoteSession, RemoteSwarm

__all__ = [
    "AutoDistributedModelForCausalLM", "ClientConfig", "options", "routing", "RemoteSession", "RemoteSwarm",
    "SwarmError", "MissingBlocksError", "PeerError", "PeerBusy", "UnverifiableError",
]
