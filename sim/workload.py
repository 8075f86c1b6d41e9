"""The workload every policy is run on (common random numbers): drawn once from the seed, never from a
policy's own random stream, so two policies differ only by their decisions.

Peers. A GPU class is drawn per peer; it fixes the memory, hence the number of blocks of a 70B-class
model of 80 blocks (bfloat16: 1.77 GB per block with 1 % slack, plus 64 MiB of KV cache per block for
16,384 tokens, after 1 GB of working memory), and the median seconds per block per decoded token (a
bandwidth-bound decode step), times a log-normal factor (sigma 0.4) for everything else that differs
between machines. Lifetimes (online sessions) are log-normal: median 40 min, sigma 1.5, so the mean is
about 2 h, 10 % stay over 7 h and about 1 % over a day. Peers arrive as a Poisson process at rate
``peers / mean lifetime``, which keeps ``peers`` online on average; the peers online at t = 0 join over
the first ``initial_spread`` seconds and have the residual lifetimes of a swarm in steady state
(a length-biased lifetime times U(0, 1)).

Clients. Each client sits in a region; its round trips are those of one of ``cells_per_region`` fixed
places in that region (its "cell"), so that clients of a cell planning from the same snapshot plan the
same route (what lets the simulator reuse a plan). A client loops: think (exponential), then one
session: a prompt and a number of decoded tokens (both log-normal), declaring the KV cache it needs as
the next power of two of their sum (``max_length``).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from sim import geo

NUM_BLOCKS = 80
BLOCK_GB = 1.77  # a 70B model's block in bfloat16 (0.87 B parameters), 1 % slack
CACHE_TOKENS = 16384  # KV cache tokens per block each peer reserves
CACHE_GB_PER_BLOCK = CACHE_TOKENS * 4096 / 2**30  # 4 KiB per token per block (GQA, 8 KV heads)
RESERVED_GB = 1.0  # working memory
# GPU memory (GB), share of peers, median seconds per block per decoded token
GPU_CLASSES = ((8, 0.20, 0.008), (16, 0.30, 0.006), (24, 0.30, 0.003), (40, 0.10, 0.002), (80, 0.10, 0.0012))
SPEED_SIGMA = 0.4
LIFETIME_MEDIAN = 40 * 60.0  # seconds
LIFETIME_SIGMA = 1.5


def blocks_for(gpu_gb: float) -> int:
    return min(NUM_BLOCKS, int((gpu_gb - RESERVED_GB) / (BLOCK_GB + CACHE_GB_PER_BLOCK)))


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    peers: int = 1000  # peers online on average
    clients: int = 10000
    duration: float = 3600.0  # seconds simulated
    seed: int = 0
    initial_spread: float = 120.0  # seconds over which the peers online at t = 0 join
    think_mean: float = 3600.0  # seconds a client waits between sessions (exponential)
    tokens_median: float = 256.0  # decoded tokens per session (log-normal, sigma 0.7, 16..2048)
    prompt_median: float = 200.0  # prompt tokens per session (log-normal, sigma 1.0, 16..6000)
    cells_per_region: int = 2


@dataclasses.dataclass(frozen=True)
class Workload:
    cfg: WorkloadConfig
    # peers, indexed by arrival order
    arrive: np.ndarray  # seconds
    lifetime: np.ndarray  # seconds online (the peer leaves at arrive + lifetime)
    region: np.ndarray
    lat: np.ndarray
    lon: np.ndarray
    mile: np.ndarray  # last-mile seconds
    gpu_gb: np.ndarray
    num_blocks: np.ndarray
    block_seconds: np.ndarray  # seconds per block per decoded token, alone on the peer
    seed_of: np.ndarray  # per-peer seed for the peer's own random choices (tie breaks, check periods)
    # clients
    client_cell: np.ndarray  # index into cell_* arrays
    cell_region: np.ndarray
    cell_lat: np.ndarray
    cell_lon: np.ndarray
    first_start: np.ndarray  # seconds: the client's first session begins then
    think: np.ndarray  # (clients, K) seconds of thinking after each session
    tokens: np.ndarray  # (clients, K) decoded tokens of each session
    prompt: np.ndarray  # (clients, K) prompt tokens of each session
    max_length: np.ndarray  # (clients, K) KV cache tokens each session declares

    @property
    def num_peers(self) -> int:
        return len(self.arrive)


def make_workload(cfg: WorkloadConfig) -> Workload:
    rng = np.random.default_rng(cfg.seed)
    mean_life = LIFETIME_MEDIAN * math.exp(LIFETIME_SIGMA ** 2 / 2)
    # the peers online at t = 0, then Poisson arrivals that keep cfg.peers online on average
    initial = cfg.peers
    biased = rng.lognormal(math.log(LIFETIME_MEDIAN) + LIFETIME_SIGMA ** 2, LIFETIME_SIGMA, initial)
    initial_life = biased * rng.uniform(0, 1, initial)
    initial_arrive = np.sort(rng.uniform(0, cfg.initial_spread, initial))
    rate = cfg.peers / mean_life  # per second
    later = int(rng.poisson(rate * cfg.duration))
    later_arrive = np.sort(rng.uniform(0, cfg.duration, later))
    later_life = rng.lognormal(math.log(LIFETIME_MEDIAN), LIFETIME_SIGMA, later)
    arrive = np.concatenate([initial_arrive, later_arrive])
    lifetime = np.concatenate([initial_life, later_life])
    n = len(arrive)
    region, lat, lon, mile = geo.place(rng, n)
    cls = rng.choice(len(GPU_CLASSES), size=n, p=[p for _, p, _ in GPU_CLASSES])
    gpu_gb = np.array([GPU_CLASSES[c][0] for c in cls], dtype=float)
    num_blocks = np.array([blocks_for(g) for g in gpu_gb], dtype=int)
    block_seconds = np.array([GPU_CLASSES[c][2] for c in cls]) * rng.lognormal(0.0, SPEED_SIGMA, n)
    seed_of = rng.integers(0, 2**62, n)

    cells = len(geo.REGIONS) * cfg.cells_per_region
    cell_region = np.repeat(np.arange(len(geo.REGIONS)), cfg.cells_per_region)
    centres = np.array([(la, lo) for la, lo, _ in geo.REGIONS.values()])
    cell_lat = centres[cell_region, 0] + rng.normal(0, geo.JITTER_DEG, cells)
    cell_lon = centres[cell_region, 1] + rng.normal(0, geo.JITTER_DEG, cells)
    weights = np.array(geo.REGION_WEIGHTS) / sum(geo.REGION_WEIGHTS)
    client_region = rng.choice(len(geo.REGIONS), size=cfg.clients, p=weights)
    client_cell = client_region * cfg.cells_per_region + rng.integers(0, cfg.cells_per_region, cfg.clients)
    k = int(math.ceil(3 * cfg.duration / cfg.think_mean)) + 8
    first_start = cfg.initial_spread + rng.exponential(cfg.think_mean, cfg.clients)
    think = rng.exponential(cfg.think_mean, (cfg.clients, k))
    tokens = np.clip(rng.lognormal(math.log(cfg.tokens_median), 0.7, (cfg.clients, k)), 16, 2048).astype(int)
    prompt = np.clip(rng.lognormal(math.log(cfg.prompt_median), 1.0, (cfg.clients, k)), 16, 6000).astype(int)
    max_length = (2 ** np.ceil(np.log2(prompt + tokens))).astype(int)
    return Workload(cfg, arrive, lifetime, region, lat, lon, mile, gpu_gb, num_blocks, block_seconds, seed_of,
                    client_cell, cell_region, cell_lat, cell_lon, first_start, think, tokens, prompt, max_length)
