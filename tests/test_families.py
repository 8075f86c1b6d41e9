"""Every supported model family, through a real swarm of two peers split inside the stack, equals
transformers' local model in fp32: greedy tokens, a left-padded batch, a seeded sampled run, and the
logits of a stateless forward. The families run in one module, one swarm each (two peer processes)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from swarmllm import checkpoints

SPANS = [(0, 3), (3, 6)]  # block 3 is the second peer's block 0: per-layer structure must follow the split


@pytest.fixture(scope="module", params=sorted(checkpoints.FAMILIES))
def family(request, tiny_checkpoint, swarm):
    """(family, local model, distributed model) for two peers of that family, on the module's one DHT node
    (conftest's ``swarm``; each model has its own key on it)."""
    path = tiny_checkpoint(request.param)
    procs = swarm.add_peers(path, SPANS)
    try:
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, max_chunk_tokens=5)
        yield request.param, local, remote
        remote.swarm.shutdown()
    finally:
        swarm.stop(procs)  # one family's peers at a time: the next family starts on a quiet machine


def _prompt(length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (1, length), generator=g)


def test_greedy_equals_local(family):
    """A 9-token prompt (two chunks of at most 5) and 10 new tokens: longer than the 4-token windows."""
    _, local, remote = family
    ids = _prompt(9, seed=1)
    ref = local.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    out = remote.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    assert out.tolist() == ref.tolist()


def test_left_padded_batch_equals_local(family):
    _, local, remote = family
    lengths = [3, 8, 6]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = _prompt(n, seed=10 + row)[0]
        mask[row, width - n:] = 1
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert remote.generate(ids, **kwargs).tolist() == local.generate(ids, **kwargs).tolist()


def test_sampling_with_seed_equals_local(family):
    _, local, remote = family
    ids = _prompt(5, seed=3)
    kwargs = dict(max_new_tokens=8, do_sample=True, top_k=20, temperature=0.9, pad_token_id=0)
    torch.manual_seed(7)
    ref = local.generate(ids, **kwargs)
    torch.manual_seed(7)
    assert remote.generate(ids, **kwargs).tolist() == ref.tolist()


def test_stateless_forward_logits_equal_local(family):
    _, local, remote = family
    ids = _prompt(11, seed=4)
    with torch.inference_mode():
        ref = local(ids).logits
        out = remote(ids, use_cache=False).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=0), float((out - ref).abs().max())
