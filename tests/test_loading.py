"""Peers read only their blocks' tensors; clients read only embeddings, final norm and LM head; both
through transformers' own from_pretrained."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, modeling_utils

from client import AutoDistributedModelForCausalLM
import layout
from peer.blocks import BlockRunner


@pytest.fixture(scope="module")
def sharded(tiny_checkpoint):
    return tiny_checkpoint("llama", max_shard_size="60KB")


def test_checkpoint_is_really_sharded(sharded):
    files = set(layout.checkpoint_files(sharded).values())
    assert len(files) > 3


class _ReadSpy:
    """Stands in for safetensors' safe_open inside transformers: records which tensors are read (a lazy
    slice is read when it is indexed), while opening a file reads only its header."""

    def __init__(self, monkeypatch):
        self.read: list[str] = []
        real_open = modeling_utils.safe_open
        spy = self

        class Slice:
            def __init__(self, name, inner):
                self._name, self._inner = name, inner

            def __getitem__(self, index):
                spy.read.append(self._name)
                return self._inner[index]

            def __getattr__(self, attr):
                return getattr(self._inner, attr)

        class File:
            def __init__(self, *args, **kwargs):
                self._inner = real_open(*args, **kwargs)

            def get_slice(self, name):
                return Slice(name, self._inner.get_slice(name))

            def __getattr__(self, attr):
                return getattr(self._inner, attr)

        monkeypatch.setattr(modeling_utils, "safe_open", File)


def test_peer_reads_only_its_blocks(sharded, monkeypatch):
    spy = _ReadSpy(monkeypatch)
    runner = BlockRunner(sharded, 2, 4)
    files = layout.checkpoint_files(sharded)
    expected = [n for n in files if n.startswith(("model.layers.2.", "model.layers.3."))]
    assert sorted(spy.read) == sorted(expected)
    # the module holds exactly those tensors: no embedding table, no norm weight, no head
    assert set(runner.loaded_tensor_names) == {n.removeprefix("model.") for n in expected}
    assert len(list(runner.module.parameters())) == len(expected)
    assert isinstance(runner.module.embed_tokens, layout.StandIn) and isinstance(runner.module.norm, layout.StandIn)
    assert [b.self_attn.layer_idx for b in runner.blocks] == [2, 3]


def test_moe_peer_gets_fused_experts_from_per_expert_tensors(tiny_checkpoint, monkeypatch):
    """Mixtral checkpoints store one tensor per expert; transformers fuses them while loading, and a
    peer gets them through the same conversion, reading only its blocks' experts."""
    path = tiny_checkpoint("mixtral")
    spy = _ReadSpy(monkeypatch)
    runner = BlockRunner(path, 3, 5)
    assert spy.read and all(n.startswith(("model.layers.3.", "model.layers.4.")) for n in spy.read)
    assert any(".block_sparse_moe.experts.0.w1." in n for n in spy.read)
    assert "layers.3.mlp.experts.gate_up_proj" in runner.loaded_tensor_names
    assert runner.blocks[0].mlp.experts.gate_up_proj.shape[0] == 4  # 4 experts fused into one tensor
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert torch.equal(runner.blocks[1].mlp.experts.down_proj, local.model.layers[4].mlp.experts.down_proj)


def test_out_of_range_blocks_are_a_clear_error(sharded):
    with pytest.raises(ValueError, match=r"outside the model's 6 blocks"):
        BlockRunner(sharded, 4, 9)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(layout.CheckpointError, match="safetensors"):
        layout.checkpoint_files(str(tmp_path))
    with pytest.raises(layout.CheckpointError, match="no config.json"):
        BlockRunner(str(tmp_path), 0, 1)


def test_client_loads_no_block_weights(sharded, make_swarm, monkeypatch):
    swarm = make_swarm()  # just a DHT node: loading needs no peer
    spy = _ReadSpy(monkeypatch)
    model = AutoDistributedModelForCausalLM.from_pretrained(sharded, swarm.initial_peers)
    assert spy.read and not [n for n in spy.read if ".layers." in n]
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
