"""In-process probe of a family, no swarm: does a peer's runner load blocks [0, 3) and [3, 6) of a tiny
random checkpoint, and do the two runners in a chain equal local transformers between the first
block's input and the last block's output, over a 7-token prefill and one decode step?

What it does not check: the client's side (embedding stage, final norm, head) and anything on the
network; ``bench.families`` and ``tests/test_families.py`` do, for the supported families.

    .venv/bin/python -m bench.probe_families phi gptj starcoder2 mamba ...
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import AutoModelForCausalLM, DynamicCache

import layout
from peer.blocks import BlockRunner
from swarmllm import checkpoints

# Tiny presets for families outside checkpoints.FAMILIES that need one (the default does not build).
EXTRA = {"gptj": dict(rotary_dim=8)}


def probe(family: str, workdir: str) -> float:
    """Largest |difference| between the runners' chain and local transformers (0.0 = bit-exact)."""
    path = checkpoints.tiny(family, f"{workdir}/{family}", seed=0, **{
        "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **EXTRA.get(family, {})})
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _, blocks = layout.find_blocks(local)
    seen: dict[str, torch.Tensor] = {}
    blocks[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.__setitem__("in", args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    blocks[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("out", out[0] if isinstance(out, tuple) else out))
    runners = [BlockRunner(path, 0, 3), BlockRunner(path, 3, 6)]
    caches = [r.new_cache() for r in runners]
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(0))
    worst = 0.0
    with torch.no_grad():
        cache = DynamicCache(config=local.config)
        for part, positions in ((slice(0, 7), torch.arange(7)[None]), (slice(7, 8), torch.tensor([[7]]))):
            local(ids[:, part], past_key_values=cache, use_cache=True, position_ids=positions)
            hidden = seen["in"]  # (1, t, hidden) after the family's embedding stage
            for runner, runner_cache in zip(runners, caches):
                hidden = runner.forward(hidden, positions, None, runner_cache)
            worst = max(worst, float((hidden - seen["out"]).abs().max()))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("families", nargs="+", help="transformers model types")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="swarmllm-probe-") as workdir:
        for family in args.families:
            try:
                print(f"{family}: max |diff| = {probe(family, workdir)}", flush=True)
            except Exception as e:  # a family that fails is the answer, not the end of the probe
                print(f"{family}: FAILS: {type(e).__name__}: {str(e)[:200]}".replace("\n", " "), flush=True)


if __name__ == "__main__":
    main()
