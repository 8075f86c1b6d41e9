"""A discrete-event simulator of a swarm serving one model, comparing placement and routing policies.

Files:
  geo.py         regions, great-circle distances and the WAN round-trip model (seconds)
  workload.py    the seeded workload shared by every policy: peers (GPU, speed, lifetime), clients
  petals.py      the baseline: Petals' block choice, rebalancing rule and inference routing (re-written
                 from the notes on Petals, not copied)
  policies.py    placement and routing policies: ours (calls peer.placement and client.routing) and Petals'
  engine.py      the event loop: peers join, load, serve, rebalance and leave; client sessions decode
  metrics.py     what a run measures (tokens, token-weighted latency histogram, uncovered time, counts)
  report.py      the markdown table and the plots
  __main__.py    ``python -m sim``: runs every policy on one workload, prints the table, writes plots

The simulator imports and runs the project's real pure code (``peer.placement``, ``client.routing``,
``dht.records.PeerRecord``); it never copies it.
"""

from sim.engine import Result, SimConfig, run
from sim.policies import POLICIES
from sim.workload import Workload, make_workload

__all__ = ["POLICIES", "Result", "SimConfig", "Workload", "make_workload", "run"]
