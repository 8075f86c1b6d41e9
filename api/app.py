"""The FastAPI app: `/v1/models`, `/v1/completions`, `/v1/chat/completions` (JSON or server-sent events),
every error in OpenAI's shape, and an optional API key checked in constant time."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
import uuid
from typing import AsyncIterator, Awaitable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api import core
from api.core import ApiError, ResponseMeta, SamplingParams, Usage
from api.engine import Delta, Engine, Prompt
from api.schema import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    model_name: str  # the name clients pass as "model"
    aliases: tuple[str, ...] = ()  # other accepted names (the swarm's model id)
    api_key: str | None = None  # None = no key needed
    context_length: int = 2048  # tokens, prompt + completion
    default_max_tokens: int = 256  # completion tokens when a request gives no max_tokens
    owned_by: str = "swarmllm"


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _GenerationStream(StreamingResponse):
    """A streamed response that always closes its event iterator, so a client that goes away mid-stream
    cancels its generation (and frees its swarm session) whatever way the server noticed."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def make_app(engine: Engine, cfg: ApiConfig) -> FastAPI:
    # Long on purpose: the routes are closures over one engine and config, read best side by side.
    app = FastAPI(title="swarmllm OpenAI-compatible API", version="1")
    names = {cfg.model_name, *cfg.aliases}

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(core.validation_error(e.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error_response(core.http_error(e.status_code, e.detail))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s", request.url.path)
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))

    async def check_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), cfg.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided: pass it as 'Authorization: Bearer KEY' "
                                "(the key the server was started with, --api-key)", code="invalid_api_key")

    def model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": 0, "owned_by": cfg.owned_by}

    def check_model(name: str) -> None:
        if name not in names:
            raise ApiError(404, f"The model '{name}' does not exist: this server serves '{cfg.model_name}' "
                                "(GET /v1/models lists it)", param="model", code="model_not_found")

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}", dependencies=[Depends(check_key)])
    async def model(name: str) -> dict:
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(req: ChatCompletionRequest, request: Request):
        check_model(req.model)
        logprobs = core.check_logprobs(chat=True, logprobs=req.logprobs, top_logprobs=req.top_logprobs)
        prompt_ids = _chat_prompt(engine.tokenizer, req, cfg.model_name)
        max_tokens, param = (req.max_completion_tokens, "max_completion_tokens") if req.max_completion_tokens \
            is not None else (req.max_tokens, "max_tokens")
        params = await _checked(_params(req, prompt_ids, max_tokens, param, logprobs))
        meta = ResponseMeta(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), req.model, chat=True)
        return await _respond(engine, request, meta, prompt_ids, params, req.stream, req.include_usage, "")

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        logprobs = core.check_logprobs(chat=False, logprobs=req.logprobs, top_logprobs=req.top_logprobs,
                                       echo=bool(req.echo))
        prompt_ids, echo = _completion_prompt(engine, req.prompt)
        params = await _checked(_params(req, prompt_ids, req.max_tokens, "max_tokens", logprobs))
        meta = ResponseMeta(f"cmpl-{uuid.uuid4().hex}", int(time.time()), req.model, chat=False)
        return await _respond(engine, request, meta, prompt_ids, params, req.stream, req.include_usage,
                              echo if req.echo else "")

    async def _checked(params: SamplingParams) -> SamplingParams:
        """A response_format's schema compiled once before the generation starts (a 400 if the grammar
        engine cannot enforce it), off the event loop: the first one also builds the engine's view of
        the tokenizer (about half a second)."""
        if params.output_format is not None:
            await asyncio.to_thread(engine.check_output_format, params.output_format)
        return params

    def _params(req, prompt_ids: list[int], max_tokens: int | None, param: str,
                logprobs: tuple[int | None, bool]) -> SamplingParams:
        core.check_honoured(req.model_dump(exclude_unset=True))
        output_format = core.check_response_format(req.response_format)
        penalties = core.check_penalties(logit_bias=req.logit_bias, presence_penalty=req.presence_penalty,
                                         frequency_penalty=req.frequency_penalty, vocab_size=len(engine.tokenizer))
        return core.check_sampling(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                   stop=req.stop, seed=req.seed, n=req.n, prompt_tokens=len(prompt_ids),
                                   context_length=cfg.context_length, default_max_tokens=cfg.default_max_tokens,
                                   max_tokens_param=param, logprobs=logprobs[0], prompt_logprobs=logprobs[1],
                                   penalties=penalties, output_format=output_format)

    return app


def _chat_prompt(tokenizer, req: ChatCompletionRequest, model_name: str) -> list[int]:
    """The prompt's token ids: the messages through the tokenizer's chat template."""
    if not tokenizer.chat_template:
        raise ApiError(400, f"model '{model_name}' has no chat template: use /v1/completions",
                       param="messages", code="no_chat_template")
    messages = [{"role": m.role, "content": core.message_text(m.content)} for m in req.messages]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _completion_prompt(engine: Engine, prompt) -> tuple[list[int], str]:
    """The prompt's token ids and text: a string, token ids, or a list holding one of those."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, f"send one prompt per request (got {len(prompt)}); use n for several "
                                "completions of one prompt", param="prompt", code="invalid_value")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return engine.tokenizer(prompt)["input_ids"], prompt
    vocab = len(engine.tokenizer)
    bad = [t for t in prompt if not 0 <= t < vocab]
    if not prompt or bad:
        raise ApiError(400, f"prompt token ids must be a non-empty list of integers in [0, {vocab}), "
                            f"got {bad[:5] or 'an empty list'}", param="prompt", code="invalid_value")
    return list(prompt), engine.decode(list(prompt))


async def _respond(engine: Engine, request: Request, meta: ResponseMeta, prompt_ids: list[int],
                   params: SamplingParams, stream: bool | None, include_usage: bool, prefix: str):
    events = engine.generate(prompt_ids, params)
    wanted = params.logprobs is not None
    try:
        # Streamed: wait for the first token here, so that an error opening the session is an HTTP error.
        first = await _unless_client_leaves(request, _whole(meta, params.n, events, prefix, wanted) if not stream
                                            else anext(events))
    except BaseException:
        await events.aclose()
        raise
    if first is _GONE or not stream:
        await events.aclose()
        return _gone() if first is _GONE else first
    return _GenerationStream(_sse(meta, params.n, first, events, include_usage, prefix, wanted),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _whole(meta: ResponseMeta, n: int, events: AsyncIterator, prefix: str, wanted: bool) -> dict:
    """The non-streamed response: every delta gathered (with its tokens' log-probabilities if ``wanted``)."""
    try:
        texts, reasons, usage, logprobs = [prefix] * n, ["length"] * n, None, [[] for _ in range(n)]
        async for event in events:
            if isinstance(event, Prompt):  # the echoed prompt's tokens come first in every choice
                logprobs = [list(event.logprobs) for _ in range(n)]
            elif isinstance(event, Delta):
                texts[event.index] += event.text
                reasons[event.index] = event.finish_reason or reasons[event.index]
                logprobs[event.index] += event.logprobs
            else:
                usage = event
    finally:
        await events.aclose()
    return core.response_body(meta, texts, reasons, usage, logprobs if wanted else None)


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read: the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


_GONE = object()


def _gone() -> JSONResponse:
    """Nobody reads it: the client left (499, as nginx logs such requests)."""
    return JSONResponse(ApiError(499, "the client closed the connection before the reply", type="client_closed").body(),
                        status_code=499)


async def _unless_client_leaves(request: Request, work: Awaitable):
    """The result of ``work``, or _GONE if the client closed its connection first (``work`` is then
    cancelled, which cancels its generation and closes its swarm session)."""
    working = asyncio.ensure_future(work)  # both tasks are owned here: cancelled and awaited below
    watching = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (working, watching):
            if not task.done():
                task.cancel()
        await asyncio.gather(working, watching, return_exceptions=True)
    if working.cancelled():
        logger.info("a client left %s before its reply; its generation was cancelled", request.url.path)
        return _GONE
    return working.result()


async def _sse(meta: ResponseMeta, n: int, first: Delta | Prompt | Usage, events: AsyncIterator,
               include_usage: bool, prefix: str, wanted: bool) -> AsyncIterator[bytes]:
    try:
        echoed = ()
        if isinstance(first, Prompt):  # the echoed prompt's log-probabilities ride on its chunk
            echoed, first = first.logprobs, await anext(events)
        offsets = [0] * n  # characters of each choice's text streamed so far (a completion's text_offset)
        for i in range(n):
            if meta.chat:
                yield core.sse(core.chunk_body(meta, i, None, None, role=True))
            if prefix:
                yield core.sse(core.chunk_body(meta, i, prefix, None, logprobs=echoed if wanted else None))
                offsets[i] = sum(len(e.text) for e in echoed)
        event = first
        while True:
            if isinstance(event, Usage):
                if include_usage:
                    yield core.sse(core.usage_chunk(meta, event))
                break
            if event.text or event.logprobs:
                yield core.sse(core.chunk_body(meta, event.index, event.text, None,
                                               logprobs=event.logprobs if wanted else None,
                                               offset=offsets[event.index]))
                offsets[event.index] += sum(len(e.text) for e in event.logprobs)
            if event.finish_reason:
                yield core.sse(core.chunk_body(meta, event.index, None if meta.chat else "", event.finish_reason))
            event = await anext(events)
        yield core.SSE_DONE
    except ApiError as e:  # the stream has begun: the error goes in the stream, as OpenAI does
        yield core.sse(e.body())
    finally:
        await events.aclose()
