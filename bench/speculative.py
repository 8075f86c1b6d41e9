"""Speculative decoding benchmark: tokens/s of plain greedy decoding vs prompt lookup and a draft model,
through a 3-peer swarm behind WAN proxies with jitter, on a repetitive task (rewriting a paragraph).

SmolLM2-135M-Instruct in float32 (unless --model-dir), one peer per span, every peer behind its own
proxy (``--delay-ms`` one way, ``--jitter-ms`` more, uniform). Per mode, in the same run and on the
same swarm: tokens/s, round trips (swarm steps) per generation, tokens checked per trip, and the
acceptance rate of drafted tokens; and time to first token of chats that start with a known
~1,000-token system prompt (kept by the peers from an earlier chat: prefix reuse) vs chats whose
system prompt is new to the swarm, alternated in the same run. Modes: plain greedy (the baseline), ``prompt_lookup_num_tokens``,
and a draft model that always agrees (the target's own weights run locally with no confidence
threshold: an upper bound on what a draft can give). Every mode's tokens are checked against local
greedy on the same prompt: speculative decoding must not change the output.

Peers keep recent histories, so every generation of the speed modes has a prompt of its own: the same
copy task behind a system message that opens with a fresh word (a repeated prompt would time cache
hits). The TTFT part reuses a known system prompt ON PURPOSE (that is what it measures): per wire dtype
one known system prompt, sent first in a priming chat, then in every "known" chat; every "new" chat's
system prompt is fresh. ``plan`` lists every prompt.

    .venv/bin/python -m bench.speculative [--delay-ms 50] [--jitter-ms 25] [--new-tokens 64] [--prefix-tokens 1000]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bench import harness
from client import AutoDistributedModelForCausalLM
from client.session import SessionCore
import wire
from swarmllm import checkpoints

PARAGRAPH = ("The history of the printing press begins in the fifteenth century, when movable type made books "
             "cheaper and faster to produce than ever before. Printers spread across Europe within a few decades, "
             "and with them came pamphlets, newspapers and a new public that could read and argue about ideas.")
TARGET_SPEEDUP = 2.0  # prompt lookup tokens/s over plain greedy
TARGET_CHECKED = 4  # tokens checked per round trip with a draft that always agrees
TARGET_TTFT = 3.0  # time to first token, new system prompt over known one
RULES = ["Answer in plain English and keep every sentence short.", "Cite the paragraph you rely on by its number.",
         "Never invent dates, names or numbers that the documents do not give.",
         "When two documents disagree, say so and quote both.", "Prefer the most recent document when in doubt."]


def _say(msg: str) -> None:
    print(f"[speculative] {msg}", file=sys.stderr, flush=True)


class TripCounter:
    """Counts the swarm steps of inference sessions (one step = one trip through every hop) and their tokens."""

    def __init__(self):
        self.tokens: list[int] = []
        self._original = SessionCore.step

    def __enter__(self) -> "TripCounter":
        counter, original = self, self._original

        async def step(core, hidden, *args, **kwargs):
            if core.rpc == wire.RPC_INFERENCE:
                counter.tokens.append(hidden.shape[1])
            return await original(core, hidden, *args, **kwargs)

        SessionCore.step = step
        return self

    def __exit__(self, *exc) -> None:
        SessionCore.step = self._original


def prompt(tokenizer, word: str) -> torch.Tensor:
    """The copy task, behind a system message that opens with ``word`` (so the prompt is new to the peers)."""
    return chat(tokenizer, f"{word}. You copy text exactly when asked.",
                f"Copy this paragraph exactly, word for word:\n\n{PARAGRAPH}")


def system_prompt(tokenizer, tokens: int, word: str) -> str:
    """A long system prompt of about ``tokens`` tokens, opening with ``word`` (each word: a new prompt)."""
    lines = [f"{word}. You are an assistant of the archive, and these are your standing instructions."]
    n = 0
    while len(tokenizer("\n".join(lines))["input_ids"]) < tokens:
        lines.append(f"{n + 1}. {RULES[n % len(RULES)]} Document {n + 1}: {PARAGRAPH}")
        n += 1
    return "\n".join(lines)


def chat(tokenizer, system: str, question: str) -> torch.Tensor:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt")["input_ids"]


WIRE_DTYPES = ("float32", "bfloat16")  # the TTFT part runs once per wire dtype
NEW, KNOWN = "new system prompt", "known system prompt"


def modes(args, draft) -> dict[str, dict]:
    """Speed mode name -> generate() options."""
    return {"greedy": {}, f"prompt lookup ({args.lookup_tokens})": {"prompt_lookup_num_tokens": args.lookup_tokens},
            f"draft that always agrees ({args.draft_tokens})": {"assistant_model": draft}}


def prompt_source(tokenizer) -> harness.FreshPrompts:
    """Chats share their template's opening and nothing more (``take`` checks each one)."""
    return harness.FreshPrompts(0, tokenizer=tokenizer, shared_prefix=harness.chat_opening(tokenizer))


def plan(args, tokenizer, prompts: harness.FreshPrompts) -> dict:
    """Every prompt the run sends: ``warmup`` and one copy task per speed mode (``modes``), all fresh; per
    wire dtype of the TTFT part, ``prime`` (the first chat with that dtype's known system prompt: fresh) and
    ``trials``, per chat pair: (NEW, fresh ids) then (KNOWN, ids that repeat the known system prompt on
    purpose, then a question that opens with a fresh word). Only the KNOWN chats share more than the chat
    template's opening with an earlier prompt, and only their dtype's known system prompt."""
    def task() -> torch.Tensor:
        return prompts.take(prompt(tokenizer, prompts.word()))

    ttft = {}
    for wire_dtype in WIRE_DTYPES:
        known = system_prompt(tokenizer, args.prefix_tokens, prompts.word())
        ttft[wire_dtype] = {"prime": prompts.take(chat(tokenizer, known, "What is this archive about?")), "trials": []}
        for k in range(args.ttft_trials):
            question = f"{prompts.word()}: who printed the first newspaper mentioned in document {k + 1}?"
            new = prompts.take(chat(tokenizer, system_prompt(tokenizer, args.prefix_tokens, prompts.word()), question))
            ttft[wire_dtype]["trials"].append([(NEW, new), (KNOWN, chat(tokenizer, known, question))])
    return {"warmup": task(), "modes": {name: task() for name in modes(args, None)}, "ttft": ttft}


def time_to_first_token(model, prompts: harness.FreshPrompts, todo: dict, pad: int) -> dict:
    """Median seconds to the first token: chats with a system prompt the peers have seen (kept from a first
    chat) vs chats with a new one, alternated (``todo``: one wire dtype's part of ``plan``)."""
    model.generate(prompts.sent(todo["prime"]), max_new_tokens=1, pad_token_id=pad)
    seconds: dict[str, list[float]] = {NEW: [], KNOWN: []}
    lengths = []
    for pair in todo["trials"]:
        for name, ids in pair:
            if name == NEW:
                prompts.sent(ids)
            else:
                prompts.reused(ids)  # on purpose: the known system prompt is what this part measures
            lengths.append(ids.shape[1])
            began = time.perf_counter()
            model.generate(ids, max_new_tokens=1, pad_token_id=pad)
            seconds[name].append(time.perf_counter() - began)
    medians = {name: sorted(v)[len(v) // 2] for name, v in seconds.items()}
    return {"prompt_tokens": [min(lengths), max(lengths)], "seconds": seconds, "median_seconds": medians,
            "ratio": medians[NEW] / medians[KNOWN]}


def run_mode(model, ids, new_tokens: int, pad: int, **mode) -> dict:
    with TripCounter() as trips:
        began = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=pad, **mode)
        seconds = time.perf_counter() - began
    decode = trips.tokens[1:]  # the first trip is the prompt (plus the first draft)
    generated = out.shape[1] - ids.shape[1]
    drafted = trips.tokens[0] - ids.shape[1] + sum(t - 1 for t in decode)
    accepted = generated - len(trips.tokens)  # every trip yields one token beyond the drafts it accepts
    return {"tokens_per_s": generated / seconds, "seconds": seconds, "trips": len(trips.tokens),
            "tokens_checked_per_trip": sum(decode) / max(len(decode), 1),
            "tokens_per_trip": generated / max(len(trips.tokens), 1),
            "acceptance": accepted / drafted if drafted else None, "tokens": out[0, ids.shape[1]:].tolist()}


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=None, help="checkpoint (default: SmolLM2-135M-Instruct, fp32)")
    parser.add_argument("--peers", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=50.0, help="one-way delay per link")
    parser.add_argument("--jitter-ms", type=float, default=25.0, help="extra delay per chunk, uniform in [0, J]")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--lookup-tokens", type=int, default=10, help="prompt_lookup_num_tokens")
    parser.add_argument("--draft-tokens", type=int, default=8, help="tokens the always-agreeing draft proposes")
    parser.add_argument("--prefix-tokens", type=int, default=1000, help="system prompt length for the TTFT test")
    parser.add_argument("--ttft-trials", type=int, default=5, help="chats per kind in the TTFT test")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main() -> None:
    # Long on purpose: a benchmark script, its phases in the order the README reports them.
    args = arguments().parse_args()
    torch.set_num_threads(args.threads)

    model_dir = args.model_dir or checkpoints.smollm2(log=_say)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.eos_token_id
    prompts = prompt_source(tokenizer)
    todo = plan(args, tokenizer, prompts)
    spans = harness.split_blocks(AutoModelForCausalLM.from_pretrained(model_dir).config.num_hidden_layers, args.peers)
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
    reference = {name: local.generate(ids, **gen)[0, ids.shape[1]:].tolist() for name, ids in todo["modes"].items()}
    draft = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    draft.generation_config.update(assistant_confidence_threshold=0.0, num_assistant_tokens=args.draft_tokens,
                                   num_assistant_tokens_schedule="constant")
    lengths = sorted({ids.shape[1] for ids in todo["modes"].values()})
    _say(f"{len(spans)} peers behind {args.delay_ms} ms (+ up to {args.jitter_ms} ms jitter) proxies; "
         f"prompts {lengths} tokens, {args.new_tokens} new")
    results = {}
    with harness.BenchSwarm(model_dir, spans, delay_ms=args.delay_ms, jitter_ms=args.jitter_ms,
                            extra=["--num-threads", str(args.threads)]) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, swarm.initial_peers, reputation_path=None)
        try:
            model.generate(prompts.sent(todo["warmup"]), max_new_tokens=4, pad_token_id=pad)  # RTTs measured, routes
            for name, mode in modes(args, draft).items():
                _say(name)
                results[name] = run_mode(model, prompts.sent(todo["modes"][name]), args.new_tokens, pad, **mode)
                results[name]["equals_local"] = results[name].pop("tokens") == reference[name]
            ttft = {}
            for wire_dtype in WIRE_DTYPES:
                _say(f"time to first token, {args.ttft_trials} chats with a known and a new system prompt each, "
                     f"{wire_dtype} on the wire")
                client = model if wire_dtype == "float32" else AutoDistributedModelForCausalLM.from_pretrained(
                    model_dir, swarm.initial_peers, reputation_path=None, wire_dtype=wire_dtype)
                try:
                    ttft[wire_dtype] = time_to_first_token(client, prompts, todo["ttft"][wire_dtype], pad)
                finally:
                    if client is not model:
                        client.swarm.shutdown()
        finally:
            model.swarm.shutdown()
    base = results["greedy"]["tokens_per_s"]
    print(harness.table(
        ["mode", "tokens/s", "vs greedy", "round trips", "tokens per trip", "checked per trip", "acceptance",
         "equals local"],
        [[name, r["tokens_per_s"], f"{r['tokens_per_s'] / base:.2f}", r["trips"], f"{r['tokens_per_trip']:.2f}",
          f"{r['tokens_checked_per_trip']:.2f}", "—" if r["acceptance"] is None else f"{r['acceptance']:.2f}",
          r["equals_local"]] for name, r in results.items()]))
    print()
    print(harness.table(["chat", "wire", "prompt tokens", "median TTFT (s)", "vs known"],
                        [[name, wire_dtype, f"{t['prompt_tokens'][0]}-{t['prompt_tokens'][1]}", seconds,
                          f"{seconds / t['median_seconds']['known system prompt']:.2f}"]
                         for wire_dtype, t in ttft.items() for name, seconds in t["median_seconds"].items()]))
    print(f"\ntargets: prompt lookup >= {TARGET_SPEEDUP}x greedy tokens/s; >= {TARGET_CHECKED} tokens checked per "
          f"round trip with a draft that always agrees; "
          f"time to first token with a known system prompt >= {TARGET_TTFT}x lower")
    path = harness.write_results("speculative", {
        "model_dir": model_dir, "spans": spans, "prompt_tokens": lengths, "modes": results, "ttft": ttft,
        "prompts": {**prompts.summary(), "deliberate_repeats": "the TTFT part's known-system-prompt chats"}}, args)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
