"""Shared fixtures: tiny random checkpoints of real architectures, and real swarms of processes.

Every process a test starts is a SwarmProcess; the fixture's finaliser stops each one by its PID.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Clients made by tests keep their reputation book here, not in the user's cache.
os.environ["SWARMLLM_REPUTATION_PATH"] = os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"swarmllm-test-reputation-{os.getpid()}.json")

from swarmllm import checkpoints, forked, launch  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def forkserver():
    """Swarm processes are forked from one warm interpreter (swarmllm.forked); it is stopped at the end."""
    yield
    forked.stop_server()

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """tiny_checkpoint(arch, **overrides) -> path of a 6-block random checkpoint (built once per session);
    each family's defaults are checkpoints.FAMILIES' (e.g. Mistral's sliding window of 4 tokens)."""
    made: dict[tuple, str] = {}

    def make(arch: str, **overrides) -> str:
        key = (arch, tuple(sorted(overrides.items())))
        if key not in made:
            path = str(tmp_path_factory.mktemp(f"ckpt-{arch}"))
            made[key] = checkpoints.tiny(arch, path, seed=0, **overrides)
        return made[key]

    return make


# Test peers compute on the CPU, as the local transformers models they are compared with do (a peer's
# default, --device auto, would take a GPU where there is one); tests/test_quant.py covers CUDA.
CPU = ["--device", "cpu"]


class Swarm(launch.LocalSwarm):
    """A DHT node plus peers, each a real process; stop() stops every one of them by PID."""

    def add_peers(self, model_dir: str, spans: list[tuple[int, int]], extra: list[str] = ()) -> list[launch.SwarmProcess]:
        """Start one peer per span concurrently and wait for all of them."""
        started = [self._track(launch.start_peer(model_dir, self.initial_peers, a, b, name=f"peer{a}-{b}",
                                                 extra=[*CPU, *extra], wait=False, forked=self.forked))
                   for a, b in spans]
        for p in started:
            p.wait_ready(timeout=180)
        return started

    def add_auto_peers(self, model_dir: str, num_blocks: int, count: int, extra: list[str] = (),
                       wait: bool = True) -> list[launch.SwarmProcess]:
        """Start ``count`` peers with --num-blocks at the same moment."""
        started = [self._track(launch.start_peer(model_dir, self.initial_peers, num_blocks=num_blocks,
                                                 name=f"auto{len(self.procs)}", extra=[*CPU, *extra], wait=False,
                                                 forked=self.forked))
                   for _ in range(count)]
        if wait:
            for p in started:
                p.wait_ready(timeout=180)
        return started


@pytest.fixture(scope="module")
def make_swarm(request):
    swarms: list[Swarm] = []

    def make(dht_args: list[str] = ()) -> Swarm:
        swarm = Swarm(dht_args, forked=True)
        swarms.append(swarm)
        return swarm

    def finalize():
        for s in swarms:
            s.stop()

    request.addfinalizer(finalize)
    return make


@pytest.fixture(scope="module")
def path(tiny_checkpoint):
    """The tiny Llama checkpoint a module's swarm serves (a module may override it)."""
    return tiny_checkpoint("llama")


@pytest.fixture(scope="module")
def swarm(make_swarm):
    """One DHT node for the module's tests and fixtures to add peers to. A module that needs another
    swarm (peers started up front, say) overrides it with a fixture of the same name."""
    return make_swarm()
