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
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's chat limit; its legacy completions allowed 5)


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


# Fields that change the output and that this server does not honour: each with the values that change
# nothing (a request that sends one of those still works). Sent with any other value, the request is
# refused with a 400 naming the field, never answered as if the field were not there.
UNHONOURED: dict[str, tuple] = {
    "tools": (None, []), "tool_choice": (None, "none"),
    "functions": (None, []), "function_call": (None, "none"),
    "best_of": (None, 1), "suffix": (None, ""),
    "modalities": (None, ["text"]), "audio": (None,),
    # other servers' sampling extensions
    "top_k": (None, 0, -1), "min_p": (None, 0, 0.0), "repetition_penalty": (None, 1, 1.0), "min_tokens": (None, 0),
    "ignore_eos": (None, False), "guided_json": (None,), "guided_regex": (None,), "guided_choice": (None,),
    "guided_grammar": (None,), "guided_decoding_backend": (None,),
}
MAX_LOGIT_BIAS = 300  # entries, as OpenAI


@dataclasses.dataclass(frozen=True)
class OutputFormat:
    """A ``response_format`` that constrains the reply: any JSON object, or JSON matching ``schema``."""

    kind: str  # "json_object" | "json_schema"
    schema: dict[str, Any]  # the JSON schema enforced ({"type": "object"} for json_object)
    name: str | None = None


def check_response_format(value: Any) -> OutputFormat | None:
    """None for free text; otherwise what to enforce while decoding. OpenAI's shapes:
    {"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name", "schema",
    "strict", "description"}}."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat("json_object", {"type": "object"})
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ApiError(400, "response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                           param="response_format", code="invalid_value")
        name = spec.get("name")
        return OutputFormat("json_schema", spec["schema"], name if isinstance(name, str) else None)
    raise ApiError(400, f"response_format type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                   param="response_format", code="invalid_value")


def check_honoured(fields: dict[str, Any]) -> None:
    """Refuse a request that sets a field this server would otherwise have to ignore (``UNHONOURED``)."""
    for name, harmless in UNHONOURED.items():
        if name in fields and fields[name] not in harmless:
            raise ApiError(400, f"'{name}' is not supported by this server and would change the output: leave it "
                                "unset (the README's API section lists every field)", param=name,
                           code="unsupported_parameter")


@dataclasses.dataclass(frozen=True)
class Penalties:
    """OpenAI's logit adjustments, applied before temperature and top-p (and to greedy choices too)."""

    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    presence: float = 0.0  # subtracted from every token generated at least once
    frequency: float = 0.0  # subtracted per time a token was generated

    def __bool__(self) -> bool:
        return bool(self.logit_bias or self.presence or self.frequency)


def check_penalties(*, logit_bias: dict[str, float] | None, presence_penalty: float | None,
                    frequency_penalty: float | None, vocab_size: int) -> Penalties:
    """``logit_bias`` (token id as text -> bias in [-100, 100], at most 300) and the two penalties in [-2, 2]."""
    bias = []
    if logit_bias:
        if len(logit_bias) > MAX_LOGIT_BIAS:
            raise ApiError(400, f"logit_bias may hold at most {MAX_LOGIT_BIAS} tokens, got {len(logit_bias)}",
                           param="logit_bias", code="invalid_value")
        for key, value in logit_bias.items():
            if not key.isdigit() or not 0 <= int(key) < vocab_size:
                raise ApiError(400, f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}",
                               param="logit_bias", code="invalid_value")
            if not -100.0 <= value <= 100.0:
                raise ApiError(400, f"logit_bias values must be in [-100, 100], got {value} for token {key}",
                               param="logit_bias", code="invalid_value")
            bias.append((int(key), float(value)))
    values = []
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        value = 0.0 if value is None else float(value)
        if not -2.0 <= value <= 2.0:
            raise ApiError(400, f"{value} is not in [-2, 2] - '{name}'", param=name, code="invalid_value")
        values.append(value)
    return Penalties(tuple(bias), *values)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int  # new tokens per choice (0: only a completion's echoed prompt, scored)
    temperature: float  # 0 = greedy
    top_p: float  # nucleus mass, (0, 1]
    stop: tuple[str, ...]  # the reply ends before the first of these
    seed: int | None  # None = fresh randomness
    n: int  # choices
    logprobs: int | None = None  # None: no log-probabilities; k: each token's, with its k likeliest alternatives
    prompt_logprobs: bool = False  # the prompt's tokens' too (a completion's echo)
    penalties: Penalties = Penalties()
    output_format: OutputFormat | None = None  # JSON the reply must be (enforced token by token)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def check_sampling(*, max_tokens: int | None, temperature: float | None, top_p: float | None,
                   stop: str | list[str] | None, seed: int | None, n: int | None, prompt_tokens: int,
                   context_length: int, default_max_tokens: int, max_tokens_param: str = "max_tokens",
                   logprobs: int | None = None, prompt_logprobs: bool = False,
                   penalties: Penalties = Penalties(), output_format: OutputFormat | None = None) -> SamplingParams:
    """Check the sampling fields of a request against OpenAI's ranges and the model's context length.
    ``logprobs``, ``prompt_logprobs``: as ``check_logprobs`` returned them; scoring an echoed prompt is
    the one case where ``max_tokens`` may be 0 (how evaluation harnesses score a text)."""
    room = context_length - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens but this model's context length is "
                            f"{context_length} tokens: shorten the prompt", param="messages", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(default_max_tokens, room)
    if max_tokens < (0 if prompt_logprobs else 1):
        raise ApiError(400, f"{max_tokens} is less than the minimum of 1 - '{max_tokens_param}' (0 only with "
                            "echo and logprobs, to score the prompt)", param=max_tokens_param, code="invalid_value")
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
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stops, seed=seed, n=n,
                          logprobs=logprobs, prompt_logprobs=prompt_logprobs, penalties=penalties,
                          output_format=output_format)


def check_logprobs(*, chat: bool, logprobs: bool | int | None, top_logprobs: int | None,
                   echo: bool = False) -> tuple[int | None, bool]:
    """(alternatives per token, or None for no log-probabilities; whether the prompt is scored too).
    Chat: ``logprobs`` true/false and ``top_logprobs`` 0-20 (which needs logprobs). Completions: an
    integer ``logprobs`` 0-20 (the alternatives), and ``echo`` with it scores the prompt as well."""
    if chat:
        if logprobs is not None and not isinstance(logprobs, bool):
            raise ApiError(400, f"logprobs must be true or false for chat completions, got {logprobs!r} (the "
                                "number of alternatives is top_logprobs)", param="logprobs", code="invalid_value")
        if top_logprobs is not None:
            if isinstance(top_logprobs, bool) or not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
                raise ApiError(400, f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {top_logprobs!r}",
                               param="top_logprobs", code="invalid_value")
            if not logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        return (top_logprobs or 0) if logprobs else None, False
    if top_logprobs is not None:
        raise ApiError(400, "top_logprobs is a chat completions field: on /v1/completions logprobs is the number "
                            "of alternatives", param="top_logprobs", code="invalid_value")
    if logprobs is None or logprobs is False:
        return None, False
    if isinstance(logprobs, bool) or not 0 <= logprobs <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}] (the alternatives per token) "
                            f"on /v1/completions, got {logprobs!r}", param="logprobs", code="invalid_value")
    return logprobs, bool(echo)


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the model (its raw distribution, before temperature or top-p),
    with the likeliest tokens at its position."""

    text: str  # the token decoded on its own
    logprob: float | None  # None: a prompt's first token (nothing comes before it)
    top: tuple[tuple[str, float], ...] = ()  # (text, logprob), likeliest first


def chat_logprobs(entries: Sequence[TokenLogprob]) -> dict:
    """A chat choice's (or chunk's) ``logprobs``: {"content": [...], "refusal": null}, as OpenAI."""
    def one(text: str, logprob: float | None) -> dict:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**one(e.text, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries],
            "refusal": None}


def completion_logprobs(entries: Sequence[TokenLogprob], offset: int = 0) -> dict:
    """A completion choice's (or chunk's) ``logprobs`` in the legacy shape: tokens, token_logprobs,
    top_logprobs (a {text: logprob} map per token; null for the prompt's first) and text_offset (each
    token's first character in the choice's text, counting from ``offset``)."""
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        tokens.append(e.text)
        values.append(e.logprob)
        tops.append(None if e.logprob is None else dict(e.top))
        offsets.append(offset)
        offset += len(e.text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


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
        self.logprobs: list[TokenLogprob] = []  # of the tokens fed and not yet handed out with a delta
        self.ids: list[int] = []
        self.text = ""  # decoded so far (the reply, until finished)
        self.emitted = 0  # characters of text already handed out
        self.tokens = 0  # tokens generated for this choice, the end-of-sequence token included
        self.finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, token: int, logprob: TokenLogprob | None = None) -> str:
        """The text this token releases ("" if held back or finished). Its ``logprob`` waits in
        ``logprobs`` until a delta takes it (an end-of-sequence token has none in the reply)."""
        if self.done:
            return ""
        self.tokens += 1
        if token in self._eos:
            return self.finish("stop")
        if logprob is not None:
            self.logprobs.append(logprob)
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

    def take_logprobs(self) -> tuple[TokenLogprob, ...]:
        """The log-probabilities of the tokens fed since the last call (a delta carries them)."""
        taken, self.logprobs = tuple(self.logprobs), []
        return taken

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


def response_body(meta: ResponseMeta, texts: Sequence[str], finish_reasons: Sequence[str], usage: Usage,
                  logprobs: Sequence[Sequence[TokenLogprob]] | None = None) -> dict:
    """The whole (non-streamed) response; ``logprobs``: each choice's tokens', if the request asked."""
    shaped = [None] * len(texts) if logprobs is None else [
        chat_logprobs(entries) if meta.chat else completion_logprobs(entries) for entries in logprobs]
    if meta.chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "logprobs": lp, "finish_reason": f}
                   for i, (t, f, lp) in enumerate(zip(texts, finish_reasons, shaped))]
    else:
        choices = [{"index": i, "text": t, "logprobs": lp, "finish_reason": f}
                   for i, (t, f, lp) in enumerate(zip(texts, finish_reasons, shaped))]
    return {"id": meta.id, "object": "chat.completion" if meta.chat else "text_completion", "created": meta.created,
            "model": meta.model, "choices": choices, "usage": usage.body()}


def chunk_body(meta: ResponseMeta, index: int, text: str | None, finish_reason: str | None, *,
               role: bool = False, logprobs: Sequence[TokenLogprob] | None = None, offset: int = 0) -> dict:
    """One streamed chunk of one choice. ``role``: the chat chunk that opens a choice. ``logprobs``: of
    the chunk's tokens (``offset``: where the chunk starts in the choice's text, for a completion's)."""
    shaped = None if logprobs is None else chat_logprobs(logprobs) if meta.chat else completion_logprobs(logprobs, offset)
    if meta.chat:
        delta: dict = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": index, "delta": delta, "logprobs": shaped, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": shaped, "finish_reason": finish_reason}
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
