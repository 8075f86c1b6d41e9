"""`swarmllm demo`: a whole local swarm (a DHT node and 3 peers) and one generation through it.

It prints the reply as it streams, then tokens/s through the swarm next to local transformers on the
same checkpoint, how to reach the swarm through the OpenAI API (with ``--api``, it serves that API and
keeps the swarm up until Ctrl-C), and stops every process it started.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
import time

DEFAULT_PROMPT = "What is the capital of France? Answer in one sentence."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", default=None, help="checkpoint to serve (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--peers", type=int, default=3, help="how many peers split the blocks")
    parser.add_argument("--api", action="store_true",
                        help="then serve the OpenAI-compatible API on this swarm until Ctrl-C")
    parser.add_argument("--api-port", type=int, default=8080)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


def _spans(num_blocks: int, parts: int) -> list[tuple[int, int]]:
    bounds = [round(i * num_blocks / parts) for i in range(parts + 1)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def api_snippets(url: str, model: str, maddrs: list[str], model_dir: str) -> str:
    """How to start `swarmllm api` on a swarm and talk to it with curl and the openai package."""
    port = url.rsplit(":", 1)[1].split("/")[0]
    command = shlex.join(["swarmllm", "api", model_dir, "--initial-peers", *maddrs, "--port", port])
    question = '{"role": "user", "content": "What is the capital of France?"}'
    return f"""# serve the OpenAI API on this swarm:
{command}

# then, from a shell:
curl {url}/chat/completions -H "Content-Type: application/json" \\
  -d '{{"model": "{model}", "messages": [{question}], "max_tokens": 30}}'

# or from Python (pip install openai):
from openai import OpenAI
client = OpenAI(base_url="{url}", api_key="unused")
stream = client.chat.completions.create(model="{model}", max_tokens=30, stream=True,
                                        messages=[{question}])
for chunk in stream:
    print(chunk.choices[0].delta.content or "", end="", flush=True)
"""


def _serve_api(model_dir: str, maddrs: list[str], port: int, procs: list) -> None:
    """Start `swarmllm api` on the demo's swarm, print how to use it, and wait for Ctrl-C or SIGTERM."""
    from swarmllm import launch

    api = launch.SwarmProcess("api", launch.swarmllm_command("api", model_dir, "--initial-peers", *maddrs,
                                                             "--port", str(port)))
    procs.append(api)
    url = api.wait_ready(timeout=300)["url"]
    print("\n" + api_snippets(url, api.ready["model"], maddrs, model_dir), flush=True)
    _say(f"serving the OpenAI API at {url}; press Ctrl-C to stop the swarm")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        while not stop.wait(1.0) and api.alive():
            pass
    except KeyboardInterrupt:
        pass


def main(args: argparse.Namespace) -> None:
    # Long on purpose: the demo's story in order (checkpoint, swarm, generate, compare with local, stop).
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
        if args.api:
            _serve_api(model_dir, dht.maddrs, args.api_port, procs)
        else:
            url = f"http://127.0.0.1:{args.api_port}/v1"
            print(f"\nTo talk to a swarm through the OpenAI API, run `swarmllm demo --api` (keeps this swarm up and "
                  f"serves {url}), or on a swarm of your own:\n")
            print(api_snippets(url, os.path.basename(os.path.normpath(model_dir)), dht.maddrs, model_dir))
    finally:
        for p in reversed(procs):
            p.stop()
        _say(f"stopped {len(procs)} processes")
