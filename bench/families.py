"""Model families benchmark: for every family in ``swarmllm.checkpoints.FAMILIES``, whether a peer loads it,
whether generation through a real swarm equals local transformers, and what a block costs.

Per family: a random checkpoint written by transformers' ``save_pretrained`` (fp32, 6 blocks, hidden
``--hidden``: larger than the tests' so that a block's memory stands out of the noise), a DHT node and
two peers serving [0, 2) and [2, 6) (a split inside the stack), then
- loads: both peers reached READY;
- exact: greedy tokens of a prompt equal local ``generate()`` (push on, as by default);
- batched exact: a left-padded batch of 3 prompts equals local (each prompt of the run new to the
  peers, who keep recent histories: ``plan`` lists them);
- bytes per block: parameter bytes of one block, loaded by ``BlockRunner`` (mean over the 6 blocks;
  MoE families have dense and sparse blocks);
- RSS per block: (VmRSS of the 4-block peer - VmRSS of the 2-block peer) / 2, so the runtime cancels out,
  and that RSS difference over the difference of their blocks' weight bytes (1.0 = weights held once;
  DeepSeek-V3's [0, 2) are dense blocks and its [2, 6) MoE ones, so only the ratio compares).

    .venv/bin/python -m bench.families [--families llama mixtral ...] [--hidden 512]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback

import torch
from transformers import AutoModelForCausalLM

from bench import harness
from bench.memory import rss_bytes
from client import AutoDistributedModelForCausalLM
from peer.blocks import BlockRunner
from swarmllm import checkpoints

SPANS = [(0, 2), (2, 6)]


def _say(msg: str) -> None:
    print(f"[families] {msg}", file=sys.stderr, flush=True)


_SCALED = ("head_dim", "moe_intermediate_size", "kv_lora_rank", "q_lora_rank", "qk_rope_head_dim",
           "qk_nope_head_dim", "v_head_dim")  # sizes a family's tiny preset sets, scaled with the hidden size


def _sizes(family: str, hidden: int) -> dict:
    """Overrides of the family's tiny preset for a ``hidden``-wide model (8 heads, 4 KV heads)."""
    preset = checkpoints.FAMILIES[family]
    scale = hidden / checkpoints.TINY_DEFAULTS["hidden_size"]
    sizes = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=8,
                 num_key_value_heads=8 if preset.get("num_key_value_heads") == preset.get("num_attention_heads", 4)
                 else 4)
    sizes.update({k: int(preset[k] * scale / 2) for k in _SCALED if k in preset})
    if "head_dim" in preset:
        sizes["head_dim"] = hidden // 8
    return sizes


BATCH_LENGTHS = [5, 9, 7]  # prompt tokens of the batched check's rows


def prompt_source() -> harness.FreshPrompts:
    return harness.FreshPrompts(BATCH_LENGTHS[0], vocab=250)


def _batch(prompts: harness.FreshPrompts) -> torch.Tensor:
    """Fresh rows of ``BATCH_LENGTHS`` tokens, left-padded with 0 (no prompt id is 0), (3, 9)."""
    width = max(BATCH_LENGTHS)
    ids = torch.zeros(len(BATCH_LENGTHS), width, dtype=torch.long)
    for row, n in enumerate(BATCH_LENGTHS):
        ids[row, width - n:] = prompts.next(n)[0]
    return prompts.take(ids)


def plan(args, prompts: harness.FreshPrompts) -> dict[str, dict]:
    """Every prompt the run sends to the swarm, per family: ``single`` (1, 5) and ``batch`` (3, 9)."""
    return {family: {"single": prompts.next(), "batch": _batch(prompts)} for family in args.families}


def measure(family: str, hidden: int, workdir: str, prompts: harness.FreshPrompts, todo: dict) -> dict:
    row = {"family": family, "loads": False, "exact": False, "batched_exact": False,
           "bytes_per_block": None, "rss_per_block_bytes": None, "rss_per_weight_byte": None, "error": None}
    sizes = _sizes(family, hidden)
    try:
        path = checkpoints.tiny(family, f"{workdir}/{family}", seed=0, **sizes)
        per_block = []
        for b in range(6):
            runner = BlockRunner(path, b, b + 1)
            per_block.append(sum(p.numel() * p.element_size() for p in runner.module.parameters()))
            del runner
        row["bytes_per_block"] = sum(per_block) / len(per_block)
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with harness.BenchSwarm(path, SPANS) as swarm:
            row["loads"] = True
            small, big = (rss_bytes(p.pid) for p in swarm.peers)
            (a0, b0), (a1, b1) = SPANS
            row["rss_per_block_bytes"] = (big - small) / ((b1 - a1) - (b0 - a0))
            row["rss_per_weight_byte"] = (big - small) / (sum(per_block[a1:b1]) - sum(per_block[a0:b0]))
            model = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, reputation_path=None)
            try:
                ids = todo["single"]
                kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
                row["exact"] = (model.generate(prompts.sent(ids), **kwargs).tolist()
                                == local.generate(ids, **kwargs).tolist())
                ids = prompts.sent(todo["batch"])
                mask = (ids != 0).long()  # (3, 9): left padding
                kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
                row["batched_exact"] = model.generate(ids, **kwargs).tolist() == local.generate(ids, **kwargs).tolist()
            finally:
                model.swarm.shutdown()
    except Exception as e:  # one family's failure is its row's result, not the benchmark's end
        row["error"] = f"{type(e).__name__}: {e}"[:300]
        _say(traceback.format_exc())
    return row


def arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=sorted(checkpoints.FAMILIES),
                        choices=sorted(checkpoints.FAMILIES))
    parser.add_argument("--hidden", type=int, default=512, help="hidden size of the random checkpoints")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in this process")
    return parser


def main() -> None:
    args = arguments().parse_args()
    prompts = prompt_source()
    todo = plan(args, prompts)
    torch.set_num_threads(args.threads)
    rows = []
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="swarmllm-families-") as workdir:
        for family in args.families:
            _say(f"{family}: building a checkpoint and a 2-peer swarm")
            rows.append(measure(family, args.hidden, workdir, prompts, todo[family]))
            _say(f"{family}: {rows[-1]}")
    mib = 2**20
    yes = lambda v: "yes" if v else "NO"
    print(harness.table(
        ["family", "loads", "exact", "batched exact", "MiB per block (fp32)", "peer RSS MiB per block",
         "RSS / weight bytes", "error"],
        [[r["family"], yes(r["loads"]), yes(r["exact"]), yes(r["batched_exact"]),
          "—" if r["bytes_per_block"] is None else r["bytes_per_block"] / mib,
          "—" if r["rss_per_block_bytes"] is None else r["rss_per_block_bytes"] / mib,
          "—" if r["rss_per_weight_byte"] is None else f"{r['rss_per_weight_byte']:.2f}", r["error"] or ""]
         for r in rows]))
    print(f"\n{len(rows)} families in {time.monotonic() - began:.0f} s")
    path = harness.write_results("families", {"spans": SPANS, "families": rows, "prompts": prompts.summary()}, args)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
