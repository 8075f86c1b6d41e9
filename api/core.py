"""The pure core of the OpenAI-compatible API: errors in OpenAI's shape, request checks that turn a
validated request into ``SamplingParams``, per-choice incremental decoding with stop sequences, and
the JSON of responses and server-sent-event chunks. No I/O, no torch, no swarm.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterable, Sequence

MAX_STOP_SEQUENCES = 4  # as OpenAI
MAX_N = 8  # choices per request; each is one row of one swarm session


class ApiError(Exception):
    """An error the API answers with, in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code,
                          **self.extra}}


def validation_error(errors: Sequence[dict]) -> ApiError:
    """pydantic/FastAPI validation errors (422 in FastAPI) -> OpenAI's 400 invalid_request_error."""
    if not errors:
        return ApiError(400, "the request is invalid")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return ApiError(400, "We could not parse the JSON body of your request: "
                             f"{first.get('ctx', {}).get('error', first.get('msg', 'invalid JSON'))}. Send a JSON "
                             "object with Content-Type: application/json (see https://platform.openai.com/docs/api-reference)")
    if first.get("type") == "missing":
        return ApiError(400, f"you must provide the '{'.'.join(loc)}' parameter", param=".".join(loc) or None)
    got = first.get("input")
    shown = json.dumps(got)[:200] if _jsonable(got) else repr(got)[:200]
    where = ".".join(loc) or "body"
    return ApiError(400, f"invalid value for '{where}': {first.get('msg', 'invalid')} (got {shown})",
                    param=".".join(loc) or None, code="invalid_value")


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def http_error(status: int, detail: Any) -> ApiError:
    """Any other HTTP error (unknown path, wrong method) in OpenAI's shape."""
    return ApiError(status, str(detail), type="server_error" if status >= 500 else "invalid_request_error")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int  # new tokens per choice
    temperature: float  # 0 = greedy
    top_p: float  # nucleus mass, (0, 1]
    stop: tuple[str, ...]  # the reply ends before the first of these
    seed: int | None  # None = fresh randomness
    n: int  # choices

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_sampling(*, max_tokens: int | None, temperature: float | None, top_p: float | None,
                   stop: str | list[str] | None, seed: int | None, n: int | None, prompt_tokens: int,
                   context_length: int, default_max_tokens: int, max_tokens_param: str = "max_tokens") -> SamplingParams:
    """Check the sampling fields of a request against OpenAI's ranges and the model's context length."""
    room = context_length - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens but this model's context length is "
                            f"{context_length} tokens: shorten the prompt", param="messages", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(default_max_tokens, room)
    if max_tokens < 1:
        raise ApiError(400, f"{max_tokens} is less than the minimum of 1 - '{max_tokens_param}'",
                       param=max_tokens_param, code="invalid_value")
    if max_tokens > room:
        raise ApiError(400, f"{max_tokens_param} is too large: {max_tokens}. This model's context length is "
                            f"{context_length} tokens and the prompt uses {prompt_tokens}, so at most {room} "
                            f"completion tokens fit: lower {max_tokens_param}", param=max_tokens_param, code="invalid_value")
    temperature = 1.0 if temperature is None else float(temperature)
    if not 0.0 <= temperature <= 2.0:
        raise ApiError(400, f"{temperature} is not in [0, 2] - 'temperature'", param="temperature", code="invalid_value")
    top_p = 1.0 if top_p is None else float(top_p)
    if not 0.0 < top_p <= 1.0:
        raise ApiError(400, f"{top_p} is not in (0, 1] - 'top_p'", param="top_p", code="invalid_value")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be between 1 and {MAX_N} on this server, got {n}", param="n", code="invalid_value")
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ApiError(400, f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}",
                       param="stop", code="invalid_value")
    if any(s == "" for s in stops):
        raise ApiError(400, "a stop sequence cannot be empty", param="stop", code="invalid_value")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stops, seed=seed, n=n)


def message_text(content: str | list | None) -> str:
    """A chat message's content: a string, or a list of parts of which only text parts are supported."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"content part {i} has type {kind!r}: this model reads text parts only",
                           param="messages", code="invalid_value")
        texts.append(part["text"])
    return "".join(texts)


class ChoiceDecoder:
    """Turns one choice's tokens into text deltas as they come: holds back an incomplete UTF-8 character
    and any tail that could be the start of a stop sequence, ends at a stop sequence (which the reply
    does not include), an end-of-sequence token, or max_tokens. The deltas concatenate to the reply."""

    def __init__(self, decode: Callable[[list[int]], str], eos_ids: Iterable[int], stop: Sequence[str], max_tokens: int):
        self._decode, self._eos, self._stop, self._max = decode, frozenset(eos_ids), tuple(stop), max_tokens
        self.ids: list[int] = []
        self.text = ""  # decoded so far (the reply, until finished)
        self.emitted = 0  # characters of text already handed out
        self.tokens = 0  # tokens generated for this choice, the end-of-sequence token included
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, token: int) -> str:
        """The text this token releases ("" if held back or finished)."""
        if self.done:
            return ""
        self.tokens += 1
        if token in self._eos:
            return self.finish("stop")
        self.ids.append(token)
        self.text = self._decode(self.ids)
        cut = self._first_stop()
        if cut is not None:
            self.text = self.text[:cut]
            return self.finish("stop")
        if self.tokens >= self._max:
            return self.finish("length")
        safe = len(self.text) - self._held_back()
        if safe <= self.emitted:
            return ""
        delta, self.emitted = self.text[self.emitted:safe], safe
        return delta

    def finish(self, reason: str) -> str:
        """End the choice; returns the text still held back."""
        if self.done:
            return ""
        self.finish_reason = reason
        delta, self.emitted = self.text[self.emitted:], len(self.text)
        return delta

    def _first_stop(self) -> int | None:
        found = [i for i in (self.text.find(s) for s in self._stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self) -> int:
        """Characters at the end of the text that may still change: an incomplete character, or a
        proper prefix of a stop sequence."""
        held = 0
        if self.text.endswith("\ufffd"):
            held = len(self.text) - len(self.text.rstrip("\ufffd"))
        body = self.text[:len(self.text) - held]
        for s in self._stop:
            for k in range(min(len(s) - 1, len(body)), 0, -1):
                if body.endswith(s[:k]):
                    held = max(held, len(self.text) - len(body) + k)
                    break
        return held


@dataclasses.dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    def body(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclasses.dataclass(frozen=True)
class ResponseMeta:
    """What every response and chunk of one request shares."""

    id: str
    created: int  # unix seconds
    model: str
    chat: bool


def response_body(meta: ResponseMeta, texts: Sequence[str], finish_reasons: Sequence[str], usage: Usage) -> dict:
    """The whole (non-streamed) response."""
    if meta.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finish_reasons))]
    else:
        choices = [{"index": i, "text": t, "logprobs": None, "finish_reason": f}
                   for i, (t, f) in enumerate(zip(texts, finish_reasons))]
    return {"id": meta.id, "object": "chat.completion" if meta.chat else "text_completion", "created": meta.created,
            "model": meta.model, "choices": choices, "usage": usage.body()}


def chunk_body(meta: ResponseMeta, index: int, text: str | None, finish_reason: str | None, *,
               role: bool = False) -> dict:
    """One streamed chunk of one choice. ``role``: the chat chunk that opens a choice."""
    if meta.chat:
        delta: dict = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": meta.id, "object": obj, "created": meta.created, "model": meta.model, "choices": [choice]}


def usage_chunk(meta: ResponseMeta, usage: Usage) -> dict:
    """The last chunk when the request asked for stream_options.include_usage: no choices, the usage."""
    return {"id": meta.id, "object": "chat.completion.chunk" if meta.chat else "text_completion",
            "created": meta.created, "model": meta.model, "choices": [], "usage": usage.body()}


def sse(data: dict | str) -> bytes:
    """One server-sent event: ``data: <json>`` and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n".encode()


SSE_DONE = sse("[DONE]")
