"""Fine-tuning through the swarm: gradients flow back through the peers (each recomputes its blocks and
returns the input gradient; their weights stay frozen), equal to local transformers.

One swarm of a tiny Llama split over 3 peers [0, 2) [2, 4) [4, 6), a spare [2, 4), and a whole-model
peer started with --no-backward (it must never be asked for gradients)."""

from __future__ import annotations

import signal

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM, PeerError, SwarmError
from client.training import Backward
from tests.test_push import _fetch


def _backward_tokens(model) -> dict[str, int]:
    """Tokens x rows each peer computed input gradients for, by peer id."""
    core = model.swarm.core
    return {r.peer_id: model.swarm.loop.run(core.transport.info(r.peer_id))[0]["backward_tokens"]
            for r in model.swarm.loop.run(_fetch(core))}


@pytest.fixture(scope="module")
def swarm(make_swarm, path):
    swarm = make_swarm()
    swarm.trainers = swarm.add_peers(path, [(0, 2), (2, 4), (4, 6), (2, 4)])
    swarm.refuser, = swarm.add_peers(path, [(0, 6)], extra=["--no-backward", "--throughput", "100000"])
    return swarm


@pytest.fixture(scope="module")
def models(swarm, path):
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, reputation_path=None)
    yield local, remote
    remote.swarm.shutdown()


def _batch():
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding on row 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_gradients_on_inputs_embeds_and_the_head_equal_local(models, swarm):
    local, remote = models
    ids, mask, labels = _batch()
    before = _backward_tokens(remote)
    grads = {}
    for name, model in (("local", local), ("remote", remote)):
        model.zero_grad()
        x = local.get_input_embeddings()(ids).detach().requires_grad_(True)
        loss = model(inputs_embeds=x, attention_mask=mask, labels=labels).loss
        loss.backward()
        grads[name] = (loss.item(), x.grad, model.get_output_embeddings().weight.grad.clone())
    (loss_l, x_l, head_l), (loss_r, x_r, head_r) = grads["local"], grads["remote"]
    assert x_r is not None, "the gradient must reach inputs_embeds (or the call must raise)"
    assert abs(loss_r - loss_l) < 1e-5 * abs(loss_l)
    assert _relative(x_r, x_l) < 1e-5 and _relative(head_r, head_l) < 1e-5
    after = _backward_tokens(remote)
    assert sum(after.values()) - sum(before.values()) == 3 * 2 * 10  # 3 hops, 2 rows x 10 tokens each
    # inference is unchanged and asks for no backward
    with torch.no_grad():
        remote(input_ids=ids, attention_mask=mask)
    assert _backward_tokens(remote) == after
    assert after[swarm.refuser.ready["peer_id"]] == 0


def test_five_adam_steps_on_a_soft_prompt_give_locals_losses(models):
    local, remote = models
    ids, mask, labels = _batch()
    hidden = local.config.hidden_size
    losses = {}
    for name, model in (("local", local), ("remote", remote)):
        for p in model.parameters():
            p.requires_grad_(False)
        prompt = torch.nn.Parameter(0.1 * torch.randn(1, 4, hidden, generator=torch.Generator().manual_seed(1)))
        opt = torch.optim.Adam([prompt], lr=0.05)
        embed = model.get_input_embeddings()
        full_mask = torch.cat([torch.ones(2, 4, dtype=mask.dtype), mask], dim=1)
        full_labels = torch.cat([torch.full((2, 4), -100), labels], dim=1)
        losses[name] = []
        for _ in range(5):
            x = torch.cat([prompt.expand(2, -1, -1), embed(ids)], dim=1)
            loss = model(inputs_embeds=x, attention_mask=full_mask, labels=full_labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
        for p in model.parameters():
            p.requires_grad_(True)
    assert losses["remote"][-1] < losses["remote"][0]  # it learns
    assert max(abs(a - b) for a, b in zip(losses["remote"], losses["local"])) < 1e-4, losses


def test_a_peer_killed_during_backward_is_replaced(models, swarm, monkeypatch, path):
    local, remote = models
    ids, mask, labels = _batch()
    x = local.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = remote(inputs_embeds=x, attention_mask=mask, labels=labels).loss
    killed = []
    original = Backward.call

    async def kill_then_call(core, hop, *args):
        if hop.start == 2 and not killed:
            victim = next(p for p in swarm.trainers if p.ready["peer_id"] == hop.peer_id)
            victim.signal(signal.SIGKILL)
            killed.append(hop.peer_id)
        return await original(core, hop, *args)

    monkeypatch.setattr(Backward, "call", kill_then_call)
    loss.backward()
    monkeypatch.undo()
    x_l = local.get_input_embeddings()(ids).detach().requires_grad_(True)
    local(inputs_embeds=x_l, attention_mask=mask, labels=labels).loss.backward()
    assert killed and _relative(x.grad, x_l.grad) < 1e-5


def test_bad_gradients_and_a_peer_without_backward_get_clear_errors(models, swarm):
    local, remote = models
    ids, mask, _ = _batch()
    x = local.get_input_embeddings()(ids).detach()
    positions = torch.arange(10).expand(2, -1)
    _, spans = remote.swarm.forward_for_training(x, positions, mask)
    refuser_id = swarm.refuser.ready["peer_id"]
    assert refuser_id not in [hop.peer_id for hop, _ in spans]  # training routes avoid it, fast as it claims to be
    good = torch.zeros(2, 10, x.shape[2])
    with pytest.raises(PeerError, match="NaN or infinity"):
        remote.swarm.backward(spans, torch.full_like(good, float("nan")), positions, mask)
    with pytest.raises(PeerError, match="must be"):
        remote.swarm.backward(spans, good[:, :7], positions, mask)
    core = remote.swarm.core
    refuser = next(r for r in core.records if r.peer_id == refuser_id)
    assert refuser.backward is False
    hop = next(h for h, _ in spans if h.start == 0)
    with pytest.raises(PeerError, match="serves no backward"):
        remote.swarm.loop.run(core.training.call(
            type(hop)(refuser_id, 0, 2, refuser.maddrs, refuser.dtype, refuser.quant), spans[0][1], good,
            positions, mask))
    others = frozenset(r.peer_id for r in core.records if r.backward)
    with pytest.raises(SwarmError, match="no peer that serves backward passes covers blocks"):
        remote.swarm.loop.run(core.plan(0, 6, exclude=others, needs_backward=True, wait=False))
    # and the peer keeps serving
    assert remote.swarm.backward(spans, good, positions, mask).shape == x.shape


def test_the_prompt_tuning_example_runs_and_learns(swarm, path):
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, os.path.join(root, "examples", "prompt_tuning.py"), "--model-dir", path,
                           "--initial-peers", *swarm.initial_peers, "--steps", "4", "--lr", "0.1"],
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    losses = [float(x) for x in re.findall(r"step +\d+  loss ([0-9.]+)", done.stdout)]
    assert len(losses) == 4 and losses[-1] < losses[0], done.stdout


def test_sixteen_bit_wire_carries_gradients_too(models, swarm, path):
    local, _ = models
    ids, mask, labels = _batch()
    half = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, reputation_path=None,
                                                           wire_dtype="bfloat16")
    try:
        x = local.get_input_embeddings()(ids).detach().requires_grad_(True)
        half(inputs_embeds=x, attention_mask=mask, labels=labels).loss.backward()
        x_l = local.get_input_embeddings()(ids).detach().requires_grad_(True)
        local(inputs_embeds=x_l, attention_mask=mask, labels=labels).loss.backward()
        assert x.grad.dtype == torch.float32 and _relative(x.grad, x_l.grad) < 3e-2  # bfloat16 rounding, twice
    finally:
        half.swarm.shutdown()
