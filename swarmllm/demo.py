"""`swarmllm demo`: a whole local swarm (a DHT node and 3 peers) and one generation through it.

It prints the reply as it streams, then tokens/s through the swarm next to local transformers on the
same checkpoint, and stops every process it started.
"""

from __future__ import annotations

import argparse
import sys
import time

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", default=None, help="checkpoint to serve (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--peers", type=int, default=3, help="how many peers split the blocks")


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _spans(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def main(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from client import AutoDistributedModelForCausalLM
    from swarmllm import checkpoints, launch

    model_dir = args.model_dir or checkpoints.smollm2(log=_say)
    num_blocks = AutoConfig.from_pretrained(model_dir).num_hidden_layers
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    procs: list[launch.SwarmProcess] = []
    try:
        _say("starting a DHT bootstrap node on 127.0.0.1")
        dht = launch.start_dht()
        procs.append(dht)
        spans = _spans(num_blocks, args.peers)
        for i, (a, b) in enumerate(spans):
            _say(f"starting peer {i + 1}/{len(spans)} for blocks [{a}, {b})")
            procs.append(launch.start_peer(model_dir, dht.maddrs, a, b, name=f"peer{i + 1}", wait=False))
        for i, p in enumerate(procs[1:]):
            p.wait_ready(timeout=300)
            _say(f"peer {i + 1} ready: {p.ready['peer_id']} serves {p.ready['blocks']}")

        _say("loading the client (embeddings, final norm, LM head only)")
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, dht.maddrs)
        try:
            route = model.swarm.route()
            _say("route: " + " -> ".join(f"[{h.start},{h.end}) {h.peer_id[-6:]}" for h in route))
            messages = [{"role": "user", "content": args.prompt}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) \
                if tokenizer.chat_template else args.prompt
            inputs = tokenizer(text, return_tensors="pt")
            gen = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            print(f"\nprompt: {args.prompt}\nswarm:  ", end="", flush=True)
            began = time.perf_counter()
            out = model.generate(**inputs, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **gen)
            swarm_s = time.perf_counter() - began
            swarm_tokens = out.shape[1] - inputs["input_ids"].shape[1]
        finally:
            model.swarm.shutdown()

        _say("running the same generation locally with transformers for comparison")
        local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        began = time.perf_counter()
        ref = local.generate(**inputs, **gen)
        local_s = time.perf_counter() - began
        local_tokens = ref.shape[1] - inputs["input_ids"].shape[1]
        same = torch.equal(out, ref)
        print(f"\nswarm: {swarm_tokens / swarm_s:.1f} tokens/s ({swarm_tokens} tokens in {swarm_s:.2f} s, "
              f"{len(spans)} peers)")
        print(f"local: {local_tokens / local_s:.1f} tokens/s ({local_tokens} tokens in {local_s:.2f} s)")
        print(f"swarm/local speed ratio: {(swarm_tokens / swarm_s) / (local_tokens / local_s):.2f}; "
              f"tokens identical to local: {same}")
    finally:
        for p in reversed(procs):
            p.stop()
        _say(f"stopped {len(procs)} processes")
