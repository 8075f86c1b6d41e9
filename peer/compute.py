"""The compute owner: one thread runs every forward pass of the peer, and decode steps of different
sessions that are waiting at the same time go through the blocks together (continuous batching).

A step that finds the thread idle starts at once, alone, exactly as it would unbatched, unless other
sessions decoded here within the last ``active_for`` seconds and have no step queued yet: then it
waits for them, at most ``max_wait`` (bounded by about one pass's compute time). A lone session never
waits and is neither slower nor numerically different. Steps that arrive while the thread is busy
queue up and run as one batch when it frees, if they can: one new token per row, the same span of
blocks, the same dtype, and caches made only of plain ``DynamicLayer``s (no sliding window). Each
session keeps its own cache: the batch pads the caches on the left to the longest one, masks the
padding, runs once, and appends each row's new keys/values to its own session's cache.

A lone one-token step that finds the owner idle, with no other session decoding here lately and a pass
known to take under ``inline_below`` seconds, runs on the event loop itself rather than on the thread: the
two thread handoffs it saves (about 0.3 ms on a busy CPU) are a quarter of a hop's software time, and the
loop is held no longer than one short pass. Anything else (prompts, batches, slow passes) uses the thread.

A batched step is correct but not bit-identical to the same step run alone (different kernel shapes
and masked padding change the last bits in fp32); it is still well inside the verifier's tolerances.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

from peer.quant import trim_heap
from wire.phases import Timeline

logger = logging.getLogger(__name__)

MAX_BATCH_ROWS = 64  # rows (sequences) in one batched forward pass


@dataclasses.dataclass
class Job:
    runner: Any  # BlockRunner (or a wrapper with the same forward/new_cache)
    hidden: torch.Tensor  # (batch, t, hidden)
    position_ids: torch.Tensor  # (batch, t)
    mask: torch.Tensor | None  # (batch, past + t)
    cache: Any  # SpanCache
    future: asyncio.Future
    started: float = 0.0  # time.perf_counter() when its pass began (set on the compute thread)
    ended: float = 0.0  # ... and ended


def _batchable(job: Job) -> bool:
    cache = job.cache
    return (job.hidden.shape[1] == 1 and getattr(job.runner, "supports_batching", False)
            and cache.get_seq_length() > 0 and all(type(layer) is DynamicLayer for layer in cache.layers))


def _group_key(job: Job) -> tuple:
    return id(job.runner), job.cache.start, job.cache.end, job.hidden.dtype


class ComputeOwner:
    """Owns the compute thread. ``run`` is awaited on the peer's event loop."""

    def __init__(self, *, max_batch_rows: int = MAX_BATCH_ROWS, max_wait: float = 0.05, active_for: float = 0.5,
                 inline_below: float = 0.05, clock=time.monotonic):
        self.max_batch_rows = max_batch_rows
        self.max_wait = max_wait  # seconds a step may wait for other active sessions' steps
        self.active_for = active_for  # seconds since its last decode step that a session counts as active
        self.inline_below = inline_below  # seconds: a lone decode pass shorter than this runs on the loop
        self._clock = clock
        self._calls = 0  # ``call``s on the compute thread not finished yet
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")
        self._pending: list[Job] = []
        self._busy = False
        self._timer: asyncio.TimerHandle | None = None
        self._last_decode: dict[int, float] = {}  # id(cache) -> when that session last sent a decode step
        self._pass_seconds: float | None = None  # moving average of one compute pass
        self._decode_seconds: float | None = None  # ... of one pass of one-token steps only
        self.batches = 0  # forward passes that carried more than one session
        self.batched_steps = 0  # session steps that went through such passes
        self.inline_steps = 0  # steps run on the event loop (see the module's docstring)

    async def run(self, runner, hidden, position_ids, mask, cache, timeline: Timeline | None = None) -> torch.Tensor:
        """Run ``runner.forward`` for one session step; may be batched with other sessions' steps. With a
        ``timeline``: marks ``compute_wait``, ``compute`` and ``handback`` (see wire/phases.py)."""
        loop = asyncio.get_running_loop()
        job = Job(runner, hidden, position_ids, mask, cache, loop.create_future())
        batchable = _batchable(job)
        if batchable and self._inline_ok(cache):
            self._last_decode[id(cache)] = self._clock()
            return self._run_inline(job, timeline)
        self._pending.append(job)
        if batchable:
            self._last_decode[id(cache)] = self._clock()
        if not self._busy:
            if self._worth_waiting():
                if self._timer is None:
                    wait = min(self.max_wait, self._pass_seconds or self.max_wait)
                    self._timer = loop.call_later(wait, self._on_timer, loop)
            else:
                self._start(loop)
        out = await job.future
        if timeline is not None and job.ended:
            timeline.split(("compute_wait", job.started), ("compute", job.ended), "handback")
        return out

    async def call(self, fn, *args):
        """Run ``fn(*args)`` on the compute thread (after what it is running; e.g. a backward pass)."""
        self._calls += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._calls -= 1

    def _inline_ok(self, cache) -> bool:
        """True if a one-token step of ``cache``'s session may run on the loop: nothing else is computing
        or queued, no other session decoded here within ``active_for`` (nothing to batch it with), and
        a pass is known to be short."""
        if self._busy or self._pending or self._calls or self._decode_seconds is None:
            return False
        if self._decode_seconds >= self.inline_below:
            return False
        now = self._clock()
        return all(key == id(cache) or now - seen > self.active_for for key, seen in self._last_decode.items())

    def _run_inline(self, job: Job, timeline: Timeline | None) -> torch.Tensor:
        job.started = time.perf_counter()
        out = job.runner.forward(job.hidden, job.position_ids, job.mask, job.cache)  # raises to the step
        job.ended = time.perf_counter()
        self._decode_seconds = 0.8 * self._decode_seconds + 0.2 * (job.ended - job.started)
        self.inline_steps += 1
        if timeline is not None:
            timeline.split(("compute_wait", job.started), ("compute", job.ended), "handback")
        return out

    def forget(self, cache) -> None:
        """The session of ``cache`` has ended: no step of it is to be waited for."""
        self._last_decode.pop(id(cache), None)

    def _worth_waiting(self) -> bool:
        """True if every queued step is a decode step and some other recently active session has none
        queued yet (its step is probably on its way)."""
        if not all(_batchable(job) for job in self._pending):
            return False
        now = self._clock()
        for key, seen in list(self._last_decode.items()):
            if now - seen > self.active_for:
                del self._last_decode[key]
        queued = {id(job.cache) for job in self._pending}
        return bool(self._last_decode.keys() - queued)

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if not self._busy and self._pending:
            self._start(loop)

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        jobs, self._pending = self._pending, []
        self._busy = True
        began = time.perf_counter()
        done = loop.run_in_executor(self._executor, self._compute, jobs)
        done.add_done_callback(lambda f: self._finish(loop, jobs, f, time.perf_counter() - began))

    def _finish(self, loop, jobs: list[Job], done: asyncio.Future, seconds: float) -> None:
        self._busy = False
        self._pass_seconds = seconds if self._pass_seconds is None else 0.8 * self._pass_seconds + 0.2 * seconds
        if all(job.hidden.shape[1] == 1 for job in jobs):
            last = self._decode_seconds
            self._decode_seconds = seconds if last is None else 0.8 * last + 0.2 * seconds
        error = done.exception() if not done.cancelled() else asyncio.CancelledError()
        for job in jobs:
            if job.future.done():
                continue  # its waiter was cancelled (the stream closed)
            if error is not None:
                job.future.set_exception(error)  # _compute itself failed: nothing to attribute
        if self._pending:
            self._start(loop)

    def _compute(self, jobs: list[Job]) -> None:
        """On the compute thread: every job gets its result or its own exception."""
        groups: dict[tuple, list[Job]] = {}
        alone: list[Job] = []
        for job in jobs:
            (groups.setdefault(_group_key(job), []) if _batchable(job) else alone).append(job)
        for group in groups.values():
            while group:
                batch, rows = [], 0
                while group and (not batch or rows + group[0].hidden.shape[0] <= self.max_batch_rows):
                    rows += group[0].hidden.shape[0]
                    batch.append(group.pop(0))
                if len(batch) == 1:
                    alone.append(batch[0])
                else:
                    self._run_batch(batch)
        for job in alone:
            self._run_one(job)
        if any(job.hidden.shape[1] > 1 for job in jobs):
            # A multi-token step (a prompt's chunk) frees big temporaries in this thread's arena: bitsandbytes
            # dequantizes each whole weight for it, activations scale with the chunk. Kept, they made a 5-block
            # NF4 peer's RSS vary by 30 MiB from run to run; returning them costs well under a millisecond
            # once the pages are back (about 20 ms the first time), against a chunk's hundreds.
            trim_heap(collect=False)

    @staticmethod
    def _resolve(job: Job, result=None, error: BaseException | None = None) -> None:
        def settle():
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        job.future.get_loop().call_soon_threadsafe(settle)

    def _run_one(self, job: Job) -> None:
        job.started = time.perf_counter()
        try:
            out = job.runner.forward(job.hidden, job.position_ids, job.mask, job.cache)
        except Exception as e:  # handed to the session's waiter, which turns it into a wire error
            self._resolve(job, error=e)
            return
        job.ended = time.perf_counter()
        self._resolve(job, out)

    def _run_batch(self, jobs: list[Job]) -> None:
        started = time.perf_counter()
        try:
            outs = batched_decode(jobs)
        except Exception:  # a batch must not fail its sessions for one another: run them one by one
            logger.exception("batched step of %d sessions failed; running them one at a time", len(jobs))
            for job in jobs:
                self._run_one(job)
            return
        self.batches += 1
        self.batched_steps += len(jobs)
        ended = time.perf_counter()
        for job, out in zip(jobs, outs):
            job.started, job.ended = started, ended
            self._resolve(job, out)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


@torch.inference_mode()
def batched_decode(jobs: list[Job]) -> list[torch.Tensor]:
    """One forward pass for the one-token steps of several sessions over the same blocks; appends each
    row's new keys/values to its own session's cache. Returns each job's (batch, 1, hidden) output."""
    runner = jobs[0].runner
    first = jobs[0].cache
    lengths = [job.cache.get_seq_length() for job in jobs]
    longest = max(lengths)
    batched = runner.new_cache(first.start, first.end)
    shift = first.start  # SpanCache.update takes global block indices

    def padded(t: torch.Tensor, length: int) -> torch.Tensor:  # (b, kv_heads, length, head_dim), left pad
        return torch.nn.functional.pad(t, (0, 0, longest - length, 0))

    for layer_idx in range(len(first.layers)):
        keys = torch.cat([padded(j.cache.layers[layer_idx].keys, n) for j, n in zip(jobs, lengths)])
        values = torch.cat([padded(j.cache.layers[layer_idx].values, n) for j, n in zip(jobs, lengths)])
        batched.update(keys, values, layer_idx + shift)
    masks = []
    for job, n in zip(jobs, lengths):
        rows = job.hidden.shape[0]
        own = job.mask if job.mask is not None else torch.ones(rows, n + 1, dtype=torch.long)
        masks.append(torch.cat([torch.zeros(rows, longest - n, dtype=torch.long), own.long()], dim=1))
    hidden = torch.cat([job.hidden for job in jobs])  # (rows, 1, hidden)
    position_ids = torch.cat([job.position_ids for job in jobs])  # (rows, 1)
    out = runner.forward(hidden, position_ids, torch.cat(masks), batched)  # (rows, 1, hidden)
    outs, row = [], 0
    for job in jobs:
        rows = job.hidden.shape[0]
        for layer_idx, layer in enumerate(batched.layers):
            job.cache.update(layer.keys[row:row + rows, :, -1:], layer.values[row:row + rows, :, -1:],
                             layer_idx + shift)
        outs.append(out[row:row + rows])
        row += rows
    return outs
