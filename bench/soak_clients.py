"""One client process of the soak benchmark (``bench/soak.py`` starts one per kind): it generates without
pause, each time from a fresh random prompt, and appends one JSON line per generation to ``--events``.

    python -m bench.soak_clients KIND MODEL_DIR --initial-peers MADDR... --events FILE [--seed S]
    KIND: greedy | sampled | speculative | strict | api (the last with --api-url URL --api-model NAME)

- greedy       generate(do_sample=False), default (background) verification
- sampled      generate(do_sample=True) after torch.manual_seed(seed of this generation)
- speculative  greedy with prompt lookup (prompt_lookup_num_tokens=4) on a prompt that repeats a phrase
- strict       greedy with verify_mode="strict"
- api          greedy (temperature 0) through ``swarmllm api``'s /v1/completions, streamed (server-sent events)

Every generation is repeated by local transformers on the same checkpoint (the same seed for sampled)
and compared: a wrong generation is one whose tokens (the API: text) differ. An error from generate()
or the API is written down as a lost generation, never raised: the loop goes on. SIGTERM ends the loop
after the generation in flight. The line a generation writes: see ``bench.soakstats``; besides, ``t0``,
``error`` ("Type: message"), the first differing position of a wrong one, and ``banned`` (the peer ids
this client's reputation book bans) whenever that set changed.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import threading
import time

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from dht.ready import ready_line

KINDS = ("greedy", "sampled", "speculative", "strict", "api")
LOOKUP_TOKENS = 4  # prompt_lookup_num_tokens of the speculative client
PHRASE_TOKENS = 6  # the speculative client's prompt repeats a random phrase this long


class ChunkClock(BaseStreamer):
    """Per-token latencies from generate()'s streamer: a chunk of n new tokens after a gap of g seconds
    gives n entries of g / n; the first chunk's gap runs from the clock's creation (the request)."""

    def __init__(self):
        self.last = time.perf_counter()
        self.prompt_seen = False
        self.lat: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands the prompt first
            self.prompt_seen = True
            return
        self.tick(value.numel())

    def tick(self, tokens: int) -> None:
        now = time.perf_counter()
        if tokens:
            self.lat += [(now - self.last) / tokens] * tokens
        self.last = now

    def end(self) -> None:
        pass


def _prompt(rng: random.Random, kind: str, tokens: int, vocab: int) -> list[int]:
    """A fresh prompt (peers keep recent histories: a repeated prompt would be a cache hit)."""
    if kind == "speculative":  # prompt lookup drafts from repeats within the prompt
        phrase = [rng.randrange(3, vocab) for _ in range(PHRASE_TOKENS)]
        return (phrase * (tokens // PHRASE_TOKENS + 1))[:tokens]
    return [rng.randrange(3, vocab) for _ in range(tokens)]


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class Worker:
    def __init__(self, args: argparse.Namespace):
        self.args, self.kind = args, args.kind
        self.local = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
        config = self.local.config
        eos = self.local.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.pad = config.pad_token_id if config.pad_token_id is not None else min(self.eos, default=0)
        self.vocab = config.vocab_size
        self.remote, self.tokenizer, self.banned = None, None, frozenset()
        if self.kind == "api":
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
        else:
            from client import AutoDistributedModelForCausalLM

            self.remote = AutoDistributedModelForCausalLM.from_pretrained(
                args.model_dir, args.initial_peers, reputation_path=None,
                verify_mode="strict" if self.kind == "strict" else "background")

    def _generate(self, model, ids: torch.Tensor, seed: int, streamer=None) -> list[int]:
        """New tokens of one generation by ``model`` (the swarm's or local transformers')."""
        kwargs = dict(max_new_tokens=self.args.new_tokens, pad_token_id=self.pad, attention_mask=torch.ones_like(ids),
                      streamer=streamer)
        if self.kind == "sampled":
            torch.manual_seed(seed)
            kwargs["do_sample"] = True
        else:
            kwargs["do_sample"] = False
        if self.kind == "speculative" and model is not self.local:
            kwargs["prompt_lookup_num_tokens"] = LOOKUP_TOKENS
        return model.generate(ids, **kwargs)[0, ids.shape[1]:].tolist()

    def _api(self, ids: list[int], clock: ChunkClock) -> str:
        """The text of one streamed /v1/completions request (temperature 0)."""
        import httpx

        body = {"model": self.args.api_model, "prompt": ids, "max_tokens": self.args.new_tokens, "temperature": 0,
                "stream": True}
        text = []
        with httpx.stream("POST", f"{self.args.api_url}/completions", json=body,
                          timeout=httpx.Timeout(self.args.request_timeout)) as reply:
            if reply.status_code != 200:
                raise RuntimeError(f"HTTP {reply.status_code}: {reply.read().decode(errors='replace')[:300]}")
            for line in reply.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    return "".join(text)
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    raise RuntimeError(f"error in the stream: {chunk['error']}")
                delta = (chunk.get("choices") or [{}])[0].get("text") or ""
                if delta:
                    clock.tick(1)  # one chunk per token, as the API streams them
                    text.append(delta)
        raise RuntimeError("the stream ended without [DONE]")

    def one(self, n: int) -> dict:
        seed = self.args.seed * 1_000_003 + n
        ids = _prompt(random.Random(seed), self.kind, self.args.prompt_tokens, self.vocab)
        prompt = torch.tensor([ids])  # (1, prompt)
        clock = ChunkClock()
        event = {"client": self.kind, "n": n, "t0": time.time(), "ok": True, "error": None, "checked": True,
                 "wrong": False}
        try:
            if self.kind == "api":
                text = self._api(ids, clock)
            else:
                out = self._generate(self.remote, prompt, seed, clock)
        except Exception as e:  # lost: counted, the loop goes on (the bench measures how often this happens)
            event.update(ok=False, checked=False, error=f"{type(e).__name__}: {e}"[:500])
        event["t1"] = time.time()
        event["lat"], event["tokens"] = clock.lat, len(clock.lat)
        if event["ok"]:
            ref = self._generate(self.local, prompt, seed)
            if self.kind == "api":
                cut = next((i for i, t in enumerate(ref) if t in self.eos), len(ref))
                expected = self.tokenizer.decode(ref[:cut], skip_special_tokens=True, clean_up_tokenization_spaces=False)
                if text != expected:
                    event.update(wrong=True, got=text[:200], expected=expected[:200])
            elif out != ref:
                event.update(wrong=True, at=_first_difference(out, ref), got=out, expected=ref)
        if self.remote is not None:
            banned = self.remote.swarm.core.book.banned()
            if banned != self.banned:
                self.banned = banned
                event["banned"] = sorted(banned)
        return event

    def close(self) -> None:
        if self.remote is not None:
            self.remote.swarm.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("model_dir")
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--events", required=True, help="JSON lines file, appended to")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--api-url", default=None, help="the API's base URL, e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--api-model", default=None)
    parser.add_argument("--request-timeout", type=float, default=180.0, help="seconds an API request may take")
    args = parser.parse_args()
    if args.kind == "api" and not (args.api_url and args.api_model):
        parser.error("the api client needs --api-url and --api-model")
    torch.set_num_threads(1)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    worker = Worker(args)
    try:
        print(ready_line("soak-client", maddrs=[], kind=args.kind), flush=True)
        with open(args.events, "a") as out:
            n = 0
            while not stop.is_set():
                out.write(json.dumps(worker.one(n)) + "\n")
                out.flush()
                n += 1
    finally:
        worker.close()


if __name__ == "__main__":
    main()
