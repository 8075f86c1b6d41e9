"""`swarmllm generate MODEL_DIR --initial-peers ... --prompt "..." --max-new-tokens N`: stream text."""

from __future__ import annotations

import argparse
import sys
import time

from client import options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", metavar="MODEL",
                        help="local checkpoint folder or hub repo id org/name[@revision] (the client reads "
                             "only the embeddings, final norm and head, and the tokenizer)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-push", action="store_true",
                        help="relay every hop through this client instead of peers pushing to each other")
    parser.add_argument("--wire-dtype", choices=["bfloat16", "float16"], default=None,
                        help="send hidden states in 16 bits (half the bytes; default: as computed, exact)")
    options.add_arguments(parser)


def main(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    import layout
    from client import AutoDistributedModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(layout.config_source(args.model_dir))
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model_dir, args.initial_peers, push=not args.no_push,
                                                            wire_dtype=args.wire_dtype, **options.config_kwargs(args))
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
