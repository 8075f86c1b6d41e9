"""The real SmolLM2-135M-Instruct, split over 3 peers, generates exactly what transformers generates."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

from client import AutoDistributedModelForCausalLM
from swarmllm import checkpoints, launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_swarm(make_swarm):
    path = checkpoints.smollm2()
    swarm = make_swarm()
    swarm.add_peers(path, [(0, 10), (10, 20), (20, 30)])
    return path, swarm


@pytest.fixture(scope="module")
def chat_inputs(smollm2_swarm):
    path, _ = smollm2_swarm
    tokenizer = AutoTokenizer.from_pretrained(path)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer, tokenizer(text, return_tensors="pt")


def test_greedy_equals_local_and_streams(smollm2_swarm, chat_inputs, capsys):
    path, swarm = smollm2_swarm
    tokenizer, inputs = chat_inputs
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = local.generate(**inputs, max_new_tokens=12, do_sample=False)
    remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers)
    try:
        capsys.readouterr()
        out = remote.generate(**inputs, max_new_tokens=12, do_sample=False,
                              streamer=TextStreamer(tokenizer, skip_prompt=True))
        streamed = capsys.readouterr().out
    finally:
        remote.swarm.shutdown()
    assert out.tolist() == ref.tolist()
    reply = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in reply
    assert reply.strip() in streamed


def test_generate_command_streams_the_same_text(smollm2_swarm, chat_inputs):
    path, swarm = smollm2_swarm
    tokenizer, inputs = chat_inputs
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ref = local.generate(**inputs, max_new_tokens=10, do_sample=False)
    expected = tokenizer.decode(ref[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    result = subprocess.run(
        launch.swarmllm_command("generate", path, "--initial-peers", *swarm.initial_peers, "--chat",
                                "--prompt", "What is the capital of France?", "--max-new-tokens", "10"),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == expected.strip()
    assert "tokens/s" in result.stderr


def test_demo_command(tmp_path):
    """The README's main job, end to end (it starts and stops its own swarm)."""
    result = subprocess.run(launch.swarmllm_command("demo", "--max-new-tokens", "8"),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokens identical to local: True" in result.stdout
    assert "swarm/local speed ratio" in result.stdout
    assert "stopped 4 processes" in result.stderr
    assert "swarmllm api " in result.stdout and "/v1/chat/completions" in result.stdout  # how to reach its API
