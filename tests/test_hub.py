"""A model named by a hub repo id: huggingface_hub, unchanged, fetches from a local stand-in for the hub
(tests/hubserver.py, via HF_ENDPOINT) only the shards a part needs; bad ids, missing shards and a full
disk are clear errors that leave nothing half-written; a real peer process serves blocks of a hub id."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from client import AutoDistributedModelForCausalLM
import layout
from layout import hub
from peer.blocks import BlockRunner
from swarmllm import launch
from tests.conftest import CPU
from tests.hubserver import HubServer

REPO = "swarm-test/tiny-llama"


@pytest.fixture(scope="module")
def sharded(tiny_checkpoint):
    """A 6-block Llama in ~100 KB shards: a block's tensors lie in one or two of 11 shards."""
    return tiny_checkpoint("llama", max_shard_size="100KB")


@pytest.fixture(scope="module")
def server(sharded):
    with HubServer() as server:
        server.add_repo(REPO, sharded)
        server.add_repo(REPO, sharded, revision="v2")
        yield server


@pytest.fixture
def cache(server, tmp_path, monkeypatch):
    """An empty hub cache and swarmllm cache, with this process's huggingface_hub pointed at the server."""
    server.patch(monkeypatch, tmp_path / "hub")
    monkeypatch.setenv("SWARMLLM_CACHE", str(tmp_path / "swarmllm"))
    before = set(server.fetched(REPO))
    server.new = lambda: server.fetched(REPO) - before  # files fetched since this test began
    return tmp_path


def shards_of(model_dir: str, wanted) -> set[str]:
    with open(os.path.join(model_dir, hub.INDEX_FILE)) as f:
        weight_map = json.load(f)["weight_map"]
    return {fname for name, fname in weight_map.items() if wanted(hub.block_index_rule("layers")(name))}


def test_peer_fetches_only_the_shards_of_its_blocks(server, sharded, cache):
    source = layout.part_source(REPO, range(2, 4), keep_outside=False)
    needed = shards_of(sharded, lambda block: block in (2, 3))
    all_shards = shards_of(sharded, lambda block: True)
    fetched = server.new()
    assert {f for f in fetched if f.endswith(".safetensors")} == needed
    assert len(needed) < len(all_shards) - 4
    assert {"config.json", hub.INDEX_FILE} <= fetched
    assert os.path.realpath(source).startswith(str(cache / "swarmllm"))
    # the blocks loaded from the fetched shards compute what the same blocks of the local folder compute
    remote, local = BlockRunner(source, 2, 4), BlockRunner(sharded, 2, 4)
    hidden, positions = torch.randn(1, 5, local.hidden_size), torch.arange(5)[None]
    assert torch.equal(remote.forward(hidden, positions, None, remote.new_cache()),
                       local.forward(hidden, positions, None, local.new_cache()))
    # a second peer of the same blocks fetches nothing again
    again = server.new()
    assert layout.part_source(REPO, range(2, 4), keep_outside=False) == source
    assert server.new() == again


def test_client_fetches_only_the_shards_outside_the_blocks(server, sharded, cache):
    source = layout.part_source(REPO + "@v2", range(0), keep_outside=True)
    assert {f for f in server.new() if f.endswith(".safetensors")} == shards_of(sharded, lambda block: block is None)
    model = layout.load_part(source, LlamaForCausalLM, range(0), keep_outside=True, dtype=torch.float32)
    local = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)
    assert torch.equal(model.lm_head.weight, local.lm_head.weight)
    assert os.path.isdir(cache / "hub" / f"models--{REPO.replace('/', '--')}" / "snapshots")


def _no_partial_files(root) -> bool:
    return not [f for _, _, files in os.walk(root) for f in files if f.endswith(".incomplete")]


def test_unknown_repo_and_revision_are_clear_errors(cache):
    with pytest.raises(hub.HubError, match="no model 'swarm-test/nope' on the hub"):
        layout.load_config("swarm-test/nope")
    with pytest.raises(hub.HubError, match="has no revision 'v9'"):
        layout.load_config(REPO + "@v9")


def test_missing_shard_leaves_nothing_half_written(server, sharded, cache, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded, broken)
    lost = sorted(shards_of(sharded, lambda block: block == 4))[0]
    os.remove(broken / lost)
    server.add_repo("swarm-test/broken", str(broken))
    with pytest.raises(hub.HubError, match=f"has no file '{lost}' although its index names it"):
        layout.part_source("swarm-test/broken", range(3, 6), keep_outside=False)
    assert _no_partial_files(cache)
    assert not os.path.isdir(cache / "swarmllm" / "parts") or not os.listdir(cache / "swarmllm" / "parts")


def test_full_disk_is_refused_before_downloading(server, cache, monkeypatch):
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    with pytest.raises(hub.HubError, match="free space or point HF_HUB_CACHE at a larger disk"):
        layout.part_source(REPO, range(0, 2), keep_outside=False)
    assert not {f for f in server.new() if f.endswith(".safetensors")}
    assert _no_partial_files(cache)


def test_peer_process_serves_blocks_of_a_hub_id(server, sharded, make_swarm, tmp_path, monkeypatch):
    """`swarmllm peer ORG/NAME --blocks 0:3` (a plain process with HF_ENDPOINT set) next to a peer of the
    local folder: a client of the hub id generates what the local model generates."""
    swarm = make_swarm()
    env = {**server.env(tmp_path / "hub"), "SWARMLLM_CACHE": str(tmp_path / "swarmllm")}
    peer = swarm._track(launch.start_peer(REPO, swarm.initial_peers, 0, 3, name="hubpeer", env=env, forked=False,
                                          wait=False, extra=CPU))
    swarm.add_peers(sharded, [(3, 6)])
    peer.wait_ready(timeout=180)
    fetched = {f for f in server.fetched(REPO) if f.endswith(".safetensors")}
    assert shards_of(sharded, lambda block: block in (0, 1, 2)) <= fetched
    server.patch(monkeypatch, tmp_path / "client-hub")
    monkeypatch.setenv("SWARMLLM_CACHE", str(tmp_path / "client"))
    remote = AutoDistributedModelForCausalLM.from_pretrained(REPO, swarm.initial_peers)
    try:
        local = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()
        ids = torch.randint(3, 250, (1, 6), generator=torch.Generator().manual_seed(5))
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert remote.generate(ids, **kwargs).tolist() == local.generate(ids, **kwargs).tolist()
    finally:
        remote.swarm.shutdown()
