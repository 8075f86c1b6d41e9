"""What a peer pays to sign every step (issue 24's fraud proofs): ``python -m bench.receipts``.

Per step a peer extends its session's history digest chain over the step's inputs, digests its outputs
and signs the statement (``peer.steps.receipt``). Measured against the work it accompanies, in the same
run: one transformer block (Llama layout, SmolLM2-135M's and a 4096-wide model's sizes) computing the same
step, a decode step (1 token after a 127-token cache) and a 128-token prefill. A peer serves several
blocks, so one block is the worst case.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig
from transformers.cache_utils import DynamicCache
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from bench.harness import table, write_results
from dht import identity
from peer import steps
from peer.sessions import Session

SIZES = {"SmolLM2-135M": (576, 1536, 9, 3), "4096-wide (Llama-2-7B)": (4096, 11008, 32, 32)}


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def measure(name: str, repeats: int) -> list[list]:
    hidden, inter, heads, kv_heads = SIZES[name]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, num_hidden_layers=1)
    cfg._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(cfg, 0).eval()
    rotary = LlamaRotaryEmbedding(cfg)
    signer = identity.load_or_create()
    rows = []
    for label, past, tokens in (("decode step", 127, 1), ("prefill", 0, 128)):
        x = torch.randn(1, tokens, hidden)  # (batch, t, hidden)
        positions = torch.arange(past, past + tokens).unsqueeze(0)
        prefix = torch.randn(1, past, hidden)

        cache = DynamicCache()
        with torch.inference_mode():
            if past:  # the cache of the tokens before, built once; each timed call crops back to it
                layer(prefix, position_embeddings=rotary(prefix, torch.arange(past).unsqueeze(0)),
                      past_key_values=cache, use_cache=True)

        @torch.inference_mode()
        def block():
            layer(x, position_embeddings=rotary(x, positions), past_key_values=cache, use_cache=True)
            cache.crop(-tokens)  # back to the past tokens

        def receipt():
            session = Session("bench", 1, past + tokens, runner=None, cache=None, span=(0, 1))
            session.chain = [b"\0" * 32] * past  # its history so far (only the last digest is read)
            steps.receipt(session, "bench-model", signer.sign, x, positions, None, past, x)

        step_s = _timed(block, repeats)
        sign_s = _timed(receipt, repeats * 10)
        rows.append([name, label, tokens, step_s * 1e3, sign_s * 1e6, sign_s / step_s])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per figure (the median is kept)")
    args = parser.parse_args()
    rows = [row for name in SIZES for row in measure(name, args.repeats)]
    headers = ["block size", "step", "tokens", "one block (ms)", "receipt (us)", "receipt / block"]
    print(table(headers, rows))
    path = write_results("receipts", {"rows": [dict(zip(headers, row)) for row in rows]}, args)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
