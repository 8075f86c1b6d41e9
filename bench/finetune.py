"""Fine-tuning benchmark: seconds per training step of a soft prompt through the swarm vs local
transformers, same run (the example's loop: forward with labels, loss.backward() through every peer,
one Adam step on the prompt).

SmolLM2-135M-Instruct in float32 (unless --model-dir), 3 peers on loopback (or behind --delay-ms WAN
proxies), one text of --tokens tokens, --steps steps each; the first step of each is a warm-up.

    .venv/bin/python -m bench.finetune [--steps 6] [--tokens 128] [--delay-ms 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM

from bench import harness
from client import AutoDistributedModelForCausalLM


def _say(msg: str) -> None:
    print(f"[finetune] {msg}", file=sys.stderr, flush=True)


def step_seconds(model, ids: torch.Tensor, steps: int, prompt_tokens: int) -> tuple[list[float], list[float]]:
    """(seconds per step, loss per step) training a soft prompt on ``ids``."""
    for p in model.parameters():
        p.requires_grad_(False)
    embed = model.get_input_embeddings()
    prompt = torch.nn.Parameter(0.02 * torch.randn(1, prompt_tokens, embed.embedding_dim,
                                                   generator=torch.Generator().manual_seed(0)))
    optimizer = torch.optim.Adam([prompt], lr=0.05)
    labels = torch.cat([torch.full((1, prompt_tokens), -100), ids], dim=1)
    seconds, losses = [], []
    for _ in range(steps):
        began = time.perf_counter()
        loss = model(inputs_embeds=torch.cat([prompt, embed(ids)], dim=1), labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - began)
        losses.append(loss.item())
    return seconds, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=128, help="tokens of text per step")
    parser.add_argument("--prompt-tokens", type=int, default=8)
    parser.add_argument("--delay-ms", type=float, default=None, help="one-way WAN delay per peer link")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    work = harness.workload(argparse.Namespace(model_dir=args.model_dir, peers=args.peers, threads=args.threads,
                                               prompt_tokens=args.tokens), _say)
    # One text for every step, locally and through the swarm: that is training. No step hits a peer's kept
    # histories: a training forward is stateless (no session keeps a prefix), and the soft prompt before the
    # text changes at every step.
    ids = work.prompts.next()
    local = AutoModelForCausalLM.from_pretrained(work.model_dir, dtype=torch.float32)
    _say(f"local: {args.steps} steps on {ids.shape[1]} tokens")
    local_s, local_loss = step_seconds(local, ids, args.steps, args.prompt_tokens)
    with harness.BenchSwarm(work.model_dir, work.spans, delay_ms=args.delay_ms,
                            extra=["--num-threads", str(args.threads)]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(work.model_dir, swarm.initial_peers,
                                                                reputation_path=None)
        try:
            _say(f"swarm of {len(work.spans)} peers: {args.steps} steps")
            swarm_s, swarm_loss = step_seconds(model, ids, args.steps, args.prompt_tokens)
        finally:
            model.swarm.shutdown()
    local_med, swarm_med = statistics.median(local_s[1:]), statistics.median(swarm_s[1:])
    drift = max(abs(a - b) for a, b in zip(local_loss, swarm_loss))
    print(harness.table(["where", "seconds per step (median, warm)", "vs local", "loss first -> last"],
                        [["local transformers", local_med, "1.00", f"{local_loss[0]:.4f} -> {local_loss[-1]:.4f}"],
                         [f"swarm, {len(work.spans)} peers" + (f", {args.delay_ms:g} ms links" if args.delay_ms else ""),
                          swarm_med, f"{swarm_med / local_med:.2f}",
                          f"{swarm_loss[0]:.4f} -> {swarm_loss[-1]:.4f}"]]))
    print(f"\nlargest loss difference swarm vs local over {args.steps} steps: {drift:.2e}")
    path = harness.write_results("finetune", {"model_dir": work.model_dir, "spans": work.spans,
                                              "tokens": ids.shape[1], "local_seconds": local_s,
                                              "swarm_seconds": swarm_s, "local_loss": local_loss,
                                              "swarm_loss": swarm_loss}, args)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
