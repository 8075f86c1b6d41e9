"""Generation through a real swarm equals transformers' local generate(), token for token, in fp32."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from client.routing import HOP_SECONDS

SPANS = [(0, 1), (1, 4), (4, 6)]  # uneven, 3 peers over 6 blocks


@pytest.fixture(scope="module", params=["llama", "mistral"])  # every family: test_families.py
def swarm_model(request, tiny_checkpoint, make_swarm):
    """(arch, checkpoint, local model, distributed model) for a 3-peer swarm of that architecture."""
    path = tiny_checkpoint(request.param)
    swarm = make_swarm()
    swarm.add_peers(path, SPANS)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, max_chunk_tokens=8)
    yield request.param, path, local, remote
    remote.swarm.shutdown()


def _prompt(length: int, seed: int = 1, batch: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=g)


def test_greedy_equals_local(swarm_model):
    _, _, local, remote = swarm_model
    ids = _prompt(7)
    ref = local.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    out = remote.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert out.tolist() == ref.tolist()


def test_prompt_longer_than_one_chunk(swarm_model):
    """max_chunk_tokens=8: a 21-token prompt is prefilled in 3 messages per hop."""
    _, _, local, remote = swarm_model
    ids = _prompt(21, seed=2)
    ref = local.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    out = remote.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.tolist() == ref.tolist()


def test_route_uses_every_peer(swarm_model):
    _, _, _, remote = swarm_model
    route = remote.swarm.route()
    assert [(h.start, h.end) for h in route] == SPANS


def test_sampling_with_seed_equals_local(swarm_model):
    arch, _, local, remote = swarm_model
    if arch != "llama":
        pytest.skip("sampling path is architecture-independent; checked once")
    ids = _prompt(5, seed=3)
    kwargs = dict(max_new_tokens=10, do_sample=True, top_k=20, top_p=0.9, temperature=0.8,
                  repetition_penalty=1.3, pad_token_id=0)
    torch.manual_seed(123)
    ref = local.generate(ids, **kwargs)
    torch.manual_seed(123)
    out = remote.generate(ids, **kwargs)
    assert out.tolist() == ref.tolist()


def test_batch_with_left_padding_equals_local(swarm_model):
    _, _, local, remote = swarm_model
    lengths = [4, 9, 6]
    width = max(lengths)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = _prompt(n, seed=10 + row)[0]
        mask[row, width - n:] = 1
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    ref = local.generate(ids, **kwargs)
    out = remote.generate(ids, **kwargs)
    assert out.tolist() == ref.tolist()


def test_eos_stops_generation(swarm_model):
    _, _, local, remote = swarm_model
    ids = _prompt(6, seed=4)
    free_run = local.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    eos = int(free_run[0, ids.shape[1] + 2])  # the third generated token becomes "eos"
    ref = local.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    out = remote.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert out.tolist() == ref.tolist()
    assert out.shape[1] <= ids.shape[1] + 3


def test_inference_session_reused_across_generate_calls(swarm_model):
    arch, _, local, remote = swarm_model
    if arch != "llama":
        pytest.skip("session reuse is architecture-independent; checked once")
    ids = _prompt(5, seed=5)
    ref = local.generate(ids, max_new_tokens=10, do_sample=False, pad_token_id=0)
    with remote.inference_session(max_length=32) as session:
        first = remote.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        assert session.position == ids.shape[1] + 3  # the last sampled token is not fed yet
        # Petals style: pass only what is new (nothing here), the session remembers the rest
        second = remote.generate(first[:, session.position:], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert second.tolist() == ref.tolist()


def test_stateless_forward_equals_local_logits(swarm_model):
    _, _, local, remote = swarm_model
    ids = _prompt(19, seed=6)
    with torch.inference_mode():
        ref = local(ids).logits
        out = remote(ids, use_cache=False).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)


def test_two_concurrent_clients_equal_local(swarm_model):
    _, path, local, remote = swarm_model
    # the second client plans as sim/ found best at scale (a cost per hop, jittered routes)
    other = AutoDistributedModelForCausalLM.from_pretrained(path, remote.swarm.cfg.initial_peers,
                                                            hop_seconds=HOP_SECONDS, route_jitter=True)
    assert other.swarm.core.route_rng is not None
    try:
        prompts = [_prompt(6, seed=7), _prompt(8, seed=8)]
        refs = [local.generate(p, max_new_tokens=10, do_sample=False, pad_token_id=0) for p in prompts]
        results: dict[int, torch.Tensor] = {}
        errors: list[BaseException] = []

        def run(i, model):
            try:
                results[i] = model.generate(prompts[i], max_new_tokens=10, do_sample=False, pad_token_id=0)
            except BaseException as e:  # surfaced by the assert below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate([remote, other])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not errors, errors
        assert [results[i].tolist() for i in range(2)] == [r.tolist() for r in refs]
    finally:
        other.swarm.shutdown()
