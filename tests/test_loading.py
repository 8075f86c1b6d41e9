"""Peers read only their blocks' tensors; clients read only embeddings, final norm and LM head."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from client import AutoDistributedModelForCausalLM
from peer import loader, wire
from peer.blocks import BlockRunner


@pytest.fixture(scope="module")
def sharded(tiny_checkpoint):
    return tiny_checkpoint("llama", max_shard_size="60KB")


def test_checkpoint_is_really_sharded(sharded):
    files = set(wire.checkpoint_files(sharded).values())
    assert len(files) > 3


def test_peer_reads_only_its_blocks_and_opens_only_their_shards(sharded, monkeypatch):
    opened: list[str] = []
    read: list[str] = []
    real_open = safe_open

    class Spy:
        def __init__(self, path, framework):
            opened.append(path)
            self._f = real_open(path, framework=framework)

        def __enter__(self):
            self._inner = self._f.__enter__()
            return self

        def __exit__(self, *exc):
            return self._f.__exit__(*exc)

        def get_tensor(self, name):
            read.append(name)
            return self._inner.get_tensor(name)

    monkeypatch.setattr(loader, "safe_open", Spy)
    runner = BlockRunner(sharded, 2, 4)
    files = wire.checkpoint_files(sharded)
    assert read and all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in read)
    expected = [n for n in files if n.startswith(("model.layers.2.", "model.layers.3."))]
    assert sorted(read) == sorted(expected)
    assert set(opened) == {files[n] for n in expected}
    # the module holds exactly those tensors: no embedding table, no norm weight, no head
    params = {n for n, _ in runner.module.named_parameters()}
    assert params == set(runner.loaded_tensor_names)
    assert all(n.startswith(("layers.0.", "layers.1.")) for n in params)
    assert runner.module.embed_tokens is None


def test_out_of_range_blocks_are_a_clear_error(sharded):
    with pytest.raises(ValueError, match=r"outside the model's 6 blocks"):
        BlockRunner(sharded, 4, 9)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(wire.CheckpointError, match="safetensors"):
        wire.checkpoint_files(str(tmp_path))


def test_client_loads_no_block_weights(sharded, make_swarm):
    swarm = make_swarm()  # just a DHT node: loading needs no peer
    model = AutoDistributedModelForCausalLM.from_pretrained(sharded, swarm.initial_peers)
    try:
        names = set(model.state_dict())
        assert not [n for n in names if ".layers." in n or n.startswith("layers.")]
        assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
        total = sum(p.numel() for p in model.parameters())
        config = model.config
        assert total == config.vocab_size * config.hidden_size * 2 + config.hidden_size  # untied head
        assert model.lm_head.weight.dtype == torch.float32
    finally:
        model.swarm.shutdown()


def test_missing_blocks_error_names_the_uncovered_range(tiny_checkpoint, make_swarm):
    from client import MissingBlocksError

    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    swarm.add_peers(path, [(0, 2), (4, 6)])
    model = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, route_timeout=1.0)
    try:
        with pytest.raises(MissingBlocksError, match=r"blocks \[2, 4\) of model llama-6L-") as info:
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, pad_token_id=0)
        assert info.value.missing == [(2, 4)]
        assert "swarmllm peer" in str(info.value)
    finally:
        model.swarm.shutdown()
