"""Peers may compute in bfloat16 or float16; the client keeps talking float32 to them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from client.errors import MissingBlocksError
from peer.blocks import BlockRunner


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_runner_is_close_to_float32(tiny_checkpoint, dtype):
    path = tiny_checkpoint("llama")
    full, half = BlockRunner(path, 0, 6), BlockRunner(path, 0, 6, dtype=dtype)
    assert {p.dtype for p in half.module.parameters()} == {getattr(torch, dtype)}
    hidden = torch.randn(2, 5, full.hidden_size)
    positions = torch.arange(5).expand(2, -1)
    ref = full.forward(hidden, positions, None, full.new_cache())
    out = half.forward(hidden, positions, None, half.new_cache())
    assert out.dtype == getattr(torch, dtype)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_bfloat16_peer_in_a_swarm(tiny_checkpoint, make_swarm):
    path = tiny_checkpoint("llama")
    swarm = make_swarm()
    swarm.add_peers(path, [(0, 3)], extra=["--dtype", "bfloat16"])
    swarm.add_peers(path, [(3, 6)])
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # a route mixes formats only when the client says so; by default it takes float32 (the more precise)
    strict = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, route_timeout=0.5)
    try:
        with pytest.raises(MissingBlocksError,
                           match=r"blocks \[0, 3\) .* in format float32/none .*other formats serve it: bfloat16"):
            strict.generate(torch.ones(1, 3, dtype=torch.long), max_new_tokens=1, pad_token_id=0)
    finally:
        strict.swarm.shutdown()
    remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, formats=["float32", "bfloat16"])
    try:
        ids = torch.randint(3, 250, (1, 12), generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = local(ids).logits
            out = remote(ids, use_cache=False).logits
        assert out.dtype == torch.float32
        assert (out - ref).abs().max() < 0.1 * ref.abs().max()
        generated = remote.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        assert generated.shape == (1, 17)
    finally:
        remote.swarm.shutdown()
