"""Prompt tuning through the swarm: train a soft prompt (a few trainable input embeddings) so the model
predicts a small text better, while every transformer block runs on the swarm's peers, frozen. Only the
soft prompt is trained; the client holds the embeddings and the LM head, the peers recompute their
blocks for the backward pass and return input gradients.

    python examples/prompt_tuning.py                       # a local 3-peer swarm of SmolLM2-135M
    python examples/prompt_tuning.py --model-dir DIR --initial-peers /ip4/.../p2p/...   # an existing swarm

Prints the loss after every step; it falls as the prompt learns the text.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from client import AutoDistributedModelForCausalLM  # noqa: E402
from swarmllm import checkpoints, launch  # noqa: E402
from swarmllm.demo import _spans  # noqa: E402

TEXT = ("The printing press made books cheaper and faster to produce, and within a few decades printers "
        "had spread across Europe.")


def token_ids(model_dir: str, text: str, vocab_size: int) -> torch.Tensor:
    """The text's tokens; a checkpoint without a tokenizer (a tiny test model) gets its bytes as ids."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_dir)(text, return_tensors="pt")["input_ids"]
    except (OSError, ValueError, TypeError):
        return torch.tensor([[3 + b % (vocab_size - 3) for b in text.encode()]])


def train(model, ids: torch.Tensor, steps: int, prompt_tokens: int, lr: float, seed: int = 0) -> list[float]:
    for p in model.parameters():  # the client's own weights stay frozen too: only the soft prompt learns
        p.requires_grad_(False)
    embed = model.get_input_embeddings()
    prompt = torch.nn.Parameter(0.02 * torch.randn(1, prompt_tokens, embed.embedding_dim,
                                                   generator=torch.Generator().manual_seed(seed)))
    optimizer = torch.optim.Adam([prompt], lr=lr)
    labels = torch.cat([torch.full((1, prompt_tokens), -100), ids], dim=1)  # no loss on the prompt itself
    losses = []
    for step in range(1, steps + 1):
        began = time.perf_counter()
        x = torch.cat([prompt, embed(ids)], dim=1)
        loss = model(inputs_embeds=x, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()  # the gradient goes back through every peer of the route
        optimizer.step()
        losses.append(loss.item())
        print(f"step {step:3d}  loss {loss.item():.4f}  ({time.perf_counter() - began:.2f} s)", flush=True)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--initial-peers", nargs="*", default=None,
                        help="an existing swarm's DHT (default: start a local swarm of 3 peers)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--text", default=TEXT)
    args = parser.parse_args()
    torch.manual_seed(0)
    model_dir = args.model_dir or checkpoints.smollm2()
    local_swarm = None
    try:
        peers = args.initial_peers
        if not peers:
            from transformers import AutoConfig

            local_swarm = launch.LocalSwarm()
            blocks = AutoConfig.from_pretrained(model_dir).num_hidden_layers
            started = [launch.start_peer(model_dir, local_swarm.initial_peers, a, b, name=f"peer{a}-{b}", wait=False)
                       for a, b in _spans(blocks, 3)]
            local_swarm.procs.extend(started)
            for p in started:
                p.wait_ready(300)
            peers = local_swarm.initial_peers
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, peers, reputation_path=None)
        try:
            ids = token_ids(model_dir, args.text, model.config.vocab_size)
            print(f"training a {args.prompt_tokens}-token soft prompt on {ids.shape[1]} tokens of text, "
                  f"{args.steps} steps, every block on the swarm", flush=True)
            losses = train(model, ids, args.steps, args.prompt_tokens, args.lr)
            print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
        finally:
            model.swarm.shutdown()
    finally:
        if local_swarm is not None:
            local_swarm.stop()


if __name__ == "__main__":
    main()
