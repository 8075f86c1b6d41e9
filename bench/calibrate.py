"""Honest disagreement between two correct peers, to set verify/compare.py's thresholds.

Two honest ways of computing the same span differ only in floating-point order: step-by-step decode
with a KV cache (what the primary did) vs one prefill of the whole prefix (what an audit replays),
with different torch thread counts and batch shapes. For each dtype this prints the per-token
relative update error e_t (median, p99.9, max over all tokens) next to the thresholds in use.

    .venv/bin/python -m bench.calibrate [--smollm2]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from peer.blocks import BlockRunner
from swarmllm import checkpoints
from verify.compare import THRESHOLDS, token_errors


def decode_step_by_step(runner: BlockRunner, x: torch.Tensor, prefill: int) -> torch.Tensor:
    cache = runner.new_cache()
    outs = [runner.forward(x[:, :prefill], torch.arange(prefill).expand(x.shape[0], -1), None, cache)]
    for t in range(prefill, x.shape[1]):
        outs.append(runner.forward(x[:, t:t + 1], torch.full((x.shape[0], 1), t), None, cache))
    return torch.cat(outs, dim=1).float()


def replay_at_once(runner: BlockRunner, x: torch.Tensor, batch_pad: int) -> torch.Tensor:
    """The whole prefix in one forward, inside a larger batch (other rows are unrelated)."""
    extra = torch.randn(batch_pad, *x.shape[1:], dtype=x.dtype)
    xx = torch.cat([x, extra]) if batch_pad else x
    out = runner.forward(xx, torch.arange(x.shape[1]).expand(xx.shape[0], -1), None, runner.new_cache())
    return out[: x.shape[0]].float()


def measure(model_dir: str, start: int, end: int, dtype: str, sessions: int, tokens: int) -> torch.Tensor:
    runner = BlockRunner(model_dir, start, end, dtype=dtype)
    errors = []
    for s in range(sessions):
        g = torch.Generator().manual_seed(s)
        x = (torch.randn(1, tokens, runner.hidden_size, generator=g) * 2).to(runner.dtype)
        torch.set_num_threads(1)
        a = decode_step_by_step(runner, x, prefill=1 + s % 7)
        torch.set_num_threads(2)
        b = replay_at_once(runner, x, batch_pad=s % 3)
        errors.append(token_errors(x.float(), a, b))
    return torch.cat(errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--smollm2", action="store_true", help="also measure 10 real SmolLM2 blocks")
    args = parser.parse_args()
    models = [("tiny llama, 6 blocks", checkpoints.tiny("llama", tempfile.mkdtemp()), 0, 6)]
    if args.smollm2:
        models.append(("SmolLM2-135M, blocks 10-20", checkpoints.smollm2(), 10, 20))
    print(f"{'model':28} {'dtype':9} {'tokens':>7} {'median':>9} {'p99.9':>9} {'max':>9} | {'tau_med':>8} {'tau_max':>8}")
    for name, path, start, end in models:
        for dtype in ("float32", "float16", "bfloat16"):
            e = measure(path, start, end, dtype, args.sessions, args.tokens)
            tau = THRESHOLDS[dtype]
            print(f"{name:28} {dtype:9} {e.numel():7d} {e.median():9.2e} {e.quantile(0.999):9.2e} {e.max():9.2e} | "
                  f"{tau.median:8.0e} {tau.maximum:8.0e}")


if __name__ == "__main__":
    main()
