"""`swarmllm generate MODEL_DIR --initial-peers ... --prompt "..." --max-new-tokens N`: stream text."""

from __future__ import annotations

import argparse
import sys
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL",
                        help="local checkpoint folder or hub repo id org/name[@revision] (the client reads "
                             "only the embeddings, final norm and head, and the tokenizer)")
    parser.add_argument("--initial-peers", nargs="+", required=True, metavar="MADDR")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-id", default=None)
    parser.add_argument("--no-push", action="store_true",
                        help="relay every hop through this client instead of peers pushing to each other")
    parser.add_argument("--wire-dtype", choices=["bfloat16", "float16"], default=None,
                        help="send hidden states in 16 bits (half the bytes; default: as computed, exact)")
    parser.add_argument("--verify-mode", choices=["background", "redo", "strict"], default="background",
                        help="background: audits never delay text; redo: wait for this generation's sampled "
                             "audits and generate again without a peer caught lying; strict: text only after "
                             "every span a not-yet-trusted peer served was re-run on another peer and matched "
                             "(slower: see the README's Verification section)")
    parser.add_argument("--formats", nargs="+", default=None, metavar="FORMAT",
                        help="peer formats a route may use and mix: DTYPE, QUANT or DTYPE/QUANT (e.g. nf4, "
                             "bfloat16/int8); default: one format, the most precise that covers every block")


def main(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from client import AutoDistributedModelForCausalLM
    import layout

    tokenizer = AutoTokenizer.from_pretrained(layout.config_source(args.model_dir))
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model_dir, args.initial_peers, model_id=args.model_id,
                                                            push=not args.no_push, wire_dtype=args.wire_dtype,
                                                            formats=args.formats, verify_mode=args.verify_mode)
    try:
        if args.chat and tokenizer.chat_template:
            text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        else:
            text = args.prompt
        inputs = tokenizer(text, return_tensors="pt")
        torch.manual_seed(args.seed)
        began = time.perf_counter()
        out = model.generate(
            **inputs, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
            temperature=args.temperature if args.sample else None, top_p=args.top_p if args.sample else None,
            streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True),
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        new_tokens = out.shape[1] - inputs["input_ids"].shape[1]
        elapsed = time.perf_counter() - began
        print(f"\n[{new_tokens} tokens in {elapsed:.2f} s, {new_tokens / elapsed:.1f} tokens/s]", file=sys.stderr)
    finally:
        model.swarm.shutdown()
