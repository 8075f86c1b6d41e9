"""Runs generations through the swarm for the API: each request's generate() runs on a worker thread
(at most ``max_concurrency`` at once; their swarm sessions run in parallel), and its text comes back to
the event loop choice by choice, token by token. Closing a generation early (a client that went away)
stops it at the next token, which closes its swarm session.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import threading
from typing import AsyncIterator, Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from api.core import ApiError, ChoiceDecoder, OutputFormat, Penalties, SamplingParams, TokenLogprob, Usage
from api.grammar import Grammars
from client import MissingBlocksError, PeerBusy, SwarmError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Delta:
    """New text of one choice; ``finish_reason`` is set on its last delta."""

    index: int
    text: str
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # of the tokens this delta's text came from (if asked)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """The prompt's tokens' log-probabilities (a completion's echo with logprobs): the first event."""

    logprobs: tuple[TokenLogprob, ...]


@dataclasses.dataclass(frozen=True)
class _Done:
    usage: Usage


@dataclasses.dataclass(frozen=True)
class _Failed:
    error: BaseException


class _SeededSampler(LogitsProcessor):
    """Draws the next token from the (temperature-, top-p-shaped) distribution with the request's own
    torch.Generator and leaves only it possible, so greedy selection picks it. Unlike the global RNG,
    this stays reproducible when several requests sample at the same time."""

    def __init__(self, seed: int | None):
        self.generator = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float(), dim=-1)  # (batch, vocab)
        chosen = torch.multinomial(probs, num_samples=1, generator=self.generator)  # (batch, 1)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen, 0.0)


class _Logprobs(LogitsProcessor):
    """First of the request's processors: keeps the log-softmax of the model's scores of the step
    (batch, vocab), before temperature or top-p shape them, for ``_Watch`` to read the chosen tokens'."""

    def __init__(self):
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores


class PenaltyProcessor(LogitsProcessor):
    """OpenAI's ``logit_bias``, ``presence_penalty`` and ``frequency_penalty``: the bias added to its
    tokens' logits, and each token generated so far (after the first ``prompt_tokens``) lowered by
    presence + frequency x its count."""

    def __init__(self, penalties: Penalties, prompt_tokens: int):
        self.penalties, self.prompt_tokens = penalties, prompt_tokens
        self.bias_ids = torch.tensor([t for t, _ in penalties.logit_bias], dtype=torch.long)
        self.bias_values = torch.tensor([b for _, b in penalties.logit_bias], dtype=torch.float32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        if len(self.bias_ids):
            scores[:, self.bias_ids] += self.bias_values.to(scores.dtype)
        generated = input_ids[:, self.prompt_tokens:]  # (batch, new so far)
        p = self.penalties
        if generated.shape[1] and (p.presence or p.frequency):
            counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
            scores -= p.frequency * counts + p.presence * (counts > 0).to(scores.dtype)
        return scores


class _Watch(StoppingCriteria):
    """Called by generate() after every token: feeds each row's token to its choice, hands the text to
    the loop, and ends rows that met a stop sequence — or every row once the request is cancelled."""

    def __init__(self, choices: list[ChoiceDecoder], emit: Callable[[object], None], cancel: threading.Event,
                 restart: Callable[[], None] | None = None, logprobs: tuple["_Logprobs", Callable] | None = None):
        self.choices, self.emit, self.cancel, self.restart = choices, emit, cancel, restart
        self.logprobs = logprobs  # (the recorder, (row log-probs, token) -> TokenLogprob), if asked
        self.length = 0  # tokens of the sequence at the last call

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if self.restart is not None and input_ids.shape[1] <= self.length:
            self.restart()  # verify_mode redo/strict: generate() started again from the prompt
        self.length = input_ids.shape[1]
        last = input_ids[:, -1].tolist()  # (batch,)
        for i, (choice, token) in enumerate(zip(self.choices, last)):
            if not choice.done:
                entry = None
                if self.logprobs is not None and self.logprobs[0].last is not None:
                    entry = self.logprobs[1](self.logprobs[0].last[i], token)
                text = choice.feed(token, entry)
                if text or choice.done:
                    self.emit(Delta(i, text, choice.finish_reason, choice.take_logprobs()))
        if self.cancel.is_set():
            return torch.ones(len(self.choices), dtype=torch.bool)
        return torch.tensor([c.done for c in self.choices], dtype=torch.bool)


def swarm_error(e: BaseException) -> ApiError:
    """The client's errors as the API's: no route -> 503 naming the blocks; full peers -> 503 with a retry hint."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, MissingBlocksError):
        return ApiError(503, str(e), type="service_unavailable_error", code="missing_blocks",
                        extra={"missing_blocks": [list(span) for span in e.missing]})
    if isinstance(e, PeerBusy):
        retry = max(1, round(e.retry_after or 1))
        return ApiError(503, f"the swarm is busy: {e}. Retry in {retry} s", type="service_unavailable_error",
                        code="swarm_busy", headers={"Retry-After": str(retry)})
    if isinstance(e, SwarmError):
        return ApiError(503, f"the swarm could not finish this generation: {e}", type="service_unavailable_error",
                        code="swarm_error")
    return ApiError(500, f"internal error while generating: {type(e).__name__}: {e}", type="server_error")


class Engine:
    """Owns the worker threads; ``generate()`` is the only way requests reach the model."""

    def __init__(self, model, tokenizer, *, max_concurrency: int = 8, token_timeout: float = 120.0):
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {max_concurrency}")
        self.model, self.tokenizer, self.token_timeout = model, tokenizer, token_timeout
        self.max_concurrency = max_concurrency
        self._pool = concurrent.futures.ThreadPoolExecutor(max_concurrency, thread_name_prefix="swarmllm-api")
        self._lock = threading.Lock()
        self._cancels: set[threading.Event] = set()
        self._running = 0
        self._stats = {"started": 0, "finished": 0, "cancelled": 0, "failed": 0, "peak_running": 0}
        eos = model.generation_config.eos_token_id
        self.eos_ids = tuple(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in self.eos_ids:
            self.eos_ids += (tokenizer.eos_token_id,)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.eos_ids or (0,))[0]
        vocab = getattr(getattr(model, "config", None), "vocab_size", None) or len(tokenizer)
        self.grammars = Grammars(tokenizer, self.eos_ids, max(vocab, len(tokenizer)))

    def check_output_format(self, fmt: OutputFormat) -> None:
        """ApiError (400) if ``fmt``'s schema cannot be enforced (compiled once here, on the request)."""
        self.grammars.grammar(fmt, check=True)

    def statistics(self) -> dict:
        """Counts of generations (started, finished, cancelled, failed), running now, and the peak."""
        with self._lock:
            return {**self._stats, "running": self._running}

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_text(self, token: int) -> str:
        """One token on its own, special tokens included (what log-probabilities name)."""
        return self.tokenizer.decode([token], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def entry(self, row: torch.Tensor, token: int, top: int) -> TokenLogprob:
        """``token``'s log-probability in ``row`` (vocab,) and the ``top`` likeliest tokens'."""
        alternatives = ()
        if top:
            values, ids = torch.topk(row, min(top, row.shape[0]))
            alternatives = tuple((self.token_text(t), float(v)) for t, v in zip(ids.tolist(), values.tolist()))
        return TokenLogprob(self.token_text(token), float(row[token]), alternatives)

    def score(self, prompt_ids: list[int], top: int) -> tuple[TokenLogprob, ...]:
        """The prompt's tokens' log-probabilities, each given the ones before it (the first has none):
        one forward pass over the prompt through the swarm, the head over every position."""
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]  # (T, vocab)
        rows = torch.log_softmax(logits.float(), dim=-1)
        return (TokenLogprob(self.token_text(prompt_ids[0]), None),
                *(self.entry(rows[i - 1], prompt_ids[i], top) for i in range(1, len(prompt_ids))))

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta | Usage]:
        """Deltas of every choice as they come, then the usage. Raises ApiError. Closing the iterator
        early cancels the generation (its swarm session closes after the token in flight)."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: object) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the loop is gone (server shutting down): nobody is listening
                cancel.set()

        with self._lock:
            self._cancels.add(cancel)
        try:
            self._pool.submit(self._work, prompt_ids, params, emit, cancel)
        except RuntimeError as e:
            with self._lock:
                self._cancels.discard(cancel)
            raise ApiError(503, f"the server is shutting down ({e}): retry on another server",
                           type="service_unavailable_error") from None
        try:
            while True:
                try:
                    item = await asyncio.wait_for(events.get(), self.token_timeout)
                except TimeoutError:
                    raise ApiError(504, f"no token came from the swarm within {self.token_timeout:.0f} s: "
                                        "the swarm may be overloaded; retry later", type="server_error",
                                   code="timeout") from None
                if isinstance(item, _Failed):
                    raise swarm_error(item.error)
                if isinstance(item, _Done):
                    yield item.usage
                    return
                yield item
        finally:
            cancel.set()  # no-op when the generation already finished

    def _work(self, prompt_ids: list[int], params: SamplingParams, emit, cancel: threading.Event) -> None:
        """One request on a worker thread. Never raises: the outcome goes to ``emit``."""
        with self._lock:
            self._running += 1
            self._stats["started"] += 1
            self._stats["peak_running"] = max(self._stats["peak_running"], self._running)
        outcome, result = "failed", None
        # verify_mode redo/strict: generate() may start again after its audits, so the text is held back
        # until it returns (checked), and an attempt that starts again starts with fresh decoders
        verified = getattr(getattr(getattr(self.model, "swarm", None), "cfg", None), "verify_mode", "background") \
            != "background"
        held: list[object] = []
        out = held.append if verified else emit
        try:
            def fresh() -> list[ChoiceDecoder]:
                return [ChoiceDecoder(self.decode, self.eos_ids, params.stop, params.max_tokens) for _ in range(params.n)]

            def restart() -> None:
                choices[:] = fresh()
                held.clear()

            choices = fresh()
            if params.prompt_logprobs and not cancel.is_set():
                emit(Prompt(self.score(prompt_ids, params.logprobs or 0)))
            if params.max_tokens and not cancel.is_set():
                self._generate(prompt_ids, params, choices, out, cancel, restart if verified else None)
            for i, choice in enumerate(choices):
                if not choice.done:
                    out(Delta(i, choice.finish("length"), choice.finish_reason, choice.take_logprobs()))
            for item in held:
                emit(item)
            outcome = "cancelled" if cancel.is_set() else "finished"
            result = _Done(Usage(len(prompt_ids), sum(c.tokens for c in choices)))
        except BaseException as e:  # handed to the request, which maps it to an HTTP error
            if not isinstance(e, SwarmError):
                logger.exception("generation failed")
            result = _Failed(e)
        finally:
            with self._lock:  # counted before the request hears the end, so statistics() never lags a reply
                self._running -= 1
                self._stats[outcome] += 1
                self._cancels.discard(cancel)
        emit(result)

    def _generate(self, prompt_ids, params: SamplingParams, choices, emit, cancel, restart=None) -> None:
        ids = torch.tensor([prompt_ids] * params.n, dtype=torch.long)  # (n, prompt) one row per choice
        processors = LogitsProcessorList()
        logprobs = None
        if params.logprobs is not None:
            recorder = _Logprobs()
            processors.append(recorder)
            logprobs = (recorder, lambda row, token: self.entry(row, token, params.logprobs))
        if params.penalties:
            processors.append(PenaltyProcessor(params.penalties, len(prompt_ids)))
        if params.output_format is not None:  # after the adjustments, before temperature and sampling
            processors.append(self.grammars.processor(params.output_format, params.n))
        if not params.greedy:
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            processors.append(_SeededSampler(params.seed))
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=params.max_tokens,
                            do_sample=False, logits_processor=processors, pad_token_id=self.pad_id,
                            stopping_criteria=StoppingCriteriaList([_Watch(choices, emit, cancel, restart, logprobs)]))

    def close(self, timeout: float = 30.0) -> None:
        """Cancel every generation and wait (``timeout`` seconds) for the workers to close their sessions."""
        with self._lock:
            for cancel in self._cancels:
                cancel.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        done = threading.Event()
        threading.Thread(target=lambda: (self._pool.shutdown(wait=True), done.set()), daemon=True,
                         name="swarmllm-api-drain").start()
        if not done.wait(timeout):
            logger.warning("API workers still running after %.0f s; their sessions will expire on the peers", timeout)
