"""Continuous batching on the peer's compute owner (in-process, no network): decode steps of sessions
with different cache lengths share one forward pass and give what each would get alone."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from peer.blocks import BlockRunner
from peer.compute import ComputeOwner, Job, batched_decode


def _sessions(runner: BlockRunner, lengths, seed=0):
    """Caches prefilled with ``lengths`` random tokens each, plus each one's next input."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        cache = runner.new_cache()
        runner.forward(torch.randn(1, n, runner.hidden_size, generator=g), torch.arange(n)[None], None, cache)
        out.append((cache, torch.randn(1, 1, runner.hidden_size, generator=g), torch.tensor([[n]])))
    return out


def _clone(cache, runner):
    copy = runner.new_cache()
    for i, layer in enumerate(cache.layers):
        copy.update(layer.keys.clone(), layer.values.clone(), cache.start + i)  # update takes global block indices
    return copy


# Every family whose caches are batchable (no sliding window): dense, MoE (each row must reach the experts
# it would alone: a different expert would move the output far beyond 1e-5), ALiBi from the padded mask.
@pytest.mark.parametrize("arch", ["llama", "qwen2", "phi3", "qwen3_moe", "mixtral", "deepseek_v3", "bloom",
                                  "falcon", "gpt_neox", "olmo", "gpt2"])
def test_batched_decode_matches_each_session_alone(tiny_checkpoint, arch):
    runner = BlockRunner(tiny_checkpoint(arch), 1, 4)
    sessions = _sessions(runner, [3, 9, 5])
    alone = []
    for cache, hidden, pos in sessions:
        c = _clone(cache, runner)
        alone.append((runner.forward(hidden, pos, None, c), c))
    jobs = [Job(runner, hidden, pos, None, cache, None) for cache, hidden, pos in sessions]
    outs = batched_decode(jobs)
    for (ref, ref_cache), out, (cache, _, _) in zip(alone, outs, sessions):
        assert out.shape == ref.shape == (1, 1, runner.hidden_size)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        assert cache.get_seq_length() == ref_cache.get_seq_length()
        for a, b in zip(cache.layers, ref_cache.layers):
            torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-4)
    # the next step of each session, alone, continues from the cache the batch left
    for (cache, _, pos), (_, ref_cache) in zip(sessions, alone):
        x = torch.ones(1, 1, runner.hidden_size)
        torch.testing.assert_close(runner.forward(x, pos + 1, None, cache), runner.forward(x, pos + 1, None, ref_cache),
                                   atol=1e-5, rtol=1e-4)


async def _wait_idle(owner: ComputeOwner, timeout: float = 30.0) -> None:
    """Until the owner has finished its pass: a step's result can reach its waiter before the owner
    hears that the pass is over (both come from the compute thread), and the next steps would queue."""
    deadline = asyncio.get_running_loop().time() + timeout
    while owner._busy:
        assert asyncio.get_running_loop().time() < deadline, "the compute owner stayed busy"
        await asyncio.sleep(0.005)


async def _until(condition, timeout: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_compute_owner_batches_steps_that_wait_and_runs_a_lone_step_unbatched(tiny_checkpoint):
    runner = BlockRunner(tiny_checkpoint("llama"), 0, 6)
    sessions = _sessions(runner, [4, 7, 2, 6], seed=1)
    refs = [runner.forward(h, p, None, _clone(c, runner)) for c, h, p in sessions]
    clock = FakeClock()

    async def main():
        owner = ComputeOwner(clock=clock, max_wait=5.0)
        try:
            lone = _sessions(runner, [5], seed=2)[0]
            ref = runner.forward(lone[1], lone[2], None, _clone(lone[0], runner))
            out = await owner.run(runner, lone[1], lone[2], None, lone[0])
            assert torch.equal(out, ref)  # alone: the very same computation, bit for bit
            assert owner.batches == 0
            await _wait_idle(owner)
            clock.now += 1.0  # that session has gone quiet: nobody is waited for
            # four sessions submit while the thread is busy with the first: the other three share a pass.
            # The compute thread is held until all four are in: what queues does not depend on how the
            # event loop and the compute thread happen to interleave.
            gate = threading.Event()
            held = asyncio.ensure_future(owner.call(gate.wait))
            try:
                steps = [asyncio.ensure_future(owner.run(runner, h, p, None, c)) for c, h, p in sessions]
                await _until(lambda: owner._busy and len(owner._pending) == 3)  # the first started, alone
                assert owner.batches == 0 and not any(step.done() for step in steps)
            finally:
                gate.set()
            await held
            outs = await asyncio.gather(*steps)
            assert (owner.batches, owner.batched_steps) == (1, 3)
            await _wait_idle(owner)
            # now all four are active: three steps wait for the fourth, then all four run as one pass
            nexts = [(c, torch.randn(1, 1, runner.hidden_size), p + 1) for c, _, p in sessions]

            async def late(c, h, p):
                await asyncio.sleep(0)  # arrives after the other three are queued, within the wait
                return await owner.run(runner, h, p, None, c)
            await asyncio.gather(*(owner.run(runner, h, p, None, c) for c, h, p in nexts[:3]), late(*nexts[3]))
            assert (owner.batches, owner.batched_steps) == (2, 7)
            return outs
        finally:
            owner.shutdown()

    outs = asyncio.run(main())
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_sliding_window_caches_are_not_batched(tiny_checkpoint):
    runner = BlockRunner(tiny_checkpoint("mistral"), 0, 2)
    sessions = _sessions(runner, [6, 3], seed=3)
    refs = [runner.forward(h, p, None, _clone(c, runner)) for c, h, p in sessions]

    async def main():
        owner = ComputeOwner()
        try:
            outs = await asyncio.gather(*(owner.run(runner, h, p, None, c) for c, h, p in sessions))
            return outs, owner.batches
        finally:
            owner.shutdown()

    outs, batches = asyncio.run(main())
    assert batches == 0
    for out, ref in zip(outs, refs):
        assert torch.equal(out, ref)


def test_a_lone_short_decode_step_runs_on_the_loop_and_a_second_session_brings_the_thread_back(tiny_checkpoint):
    runner = BlockRunner(tiny_checkpoint("llama"), 0, 6)
    (cache, hidden, pos), (other, other_hidden, other_pos) = _sessions(runner, [4, 6], seed=4)
    ref_cache = _clone(cache, runner)
    clock = FakeClock()

    async def main(owner: ComputeOwner) -> list[torch.Tensor]:
        outs = []
        for step in range(4):  # the first pass runs on the thread and teaches the owner how long one takes
            loop_thread = threading.get_ident()
            seen = []
            real = runner.forward
            runner.forward = lambda *a: (seen.append(threading.get_ident()), real(*a))[1]
            try:
                outs.append(await owner.run(runner, hidden + step, pos + step, None, cache))
            finally:
                runner.forward = real
            assert (seen[0] == loop_thread) == (step > 0), f"step {step} ran on the wrong thread"
            await _wait_idle(owner)
        assert owner.inline_steps == 3
        await owner.run(runner, other_hidden, other_pos, None, other)  # a second session decodes here now
        await _wait_idle(owner)
        assert owner.inline_steps == 3  # ... so neither runs on the loop: their steps may share a pass
        await owner.run(runner, hidden + 4, pos + 4, None, cache)
        assert owner.inline_steps == 3
        clock.now += 1.0  # the other session went quiet
        await _wait_idle(owner)
        await owner.run(runner, hidden + 5, pos + 5, None, cache)
        assert owner.inline_steps == 4
        return outs

    owner = ComputeOwner(clock=clock)
    try:
        outs = asyncio.run(main(owner))
    finally:
        owner.shutdown()
    for step, out in enumerate(outs):  # the same computation wherever it ran
        assert torch.equal(out, runner.forward(hidden + step, pos + step, None, ref_cache))

    slow = ComputeOwner(clock=clock, inline_below=0.0)  # no pass is short enough: always the thread
    try:
        asyncio.run(_steps(slow, runner, *_sessions(runner, [3], seed=5)[0]))
        assert slow.inline_steps == 0
    finally:
        slow.shutdown()


async def _steps(owner: ComputeOwner, runner: BlockRunner, cache, hidden, pos, n: int = 3) -> None:
    for step in range(n):
        await owner.run(runner, hidden, pos + step, None, cache)
        await _wait_idle(owner)
