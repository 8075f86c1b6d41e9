"""Pydantic models of the requests the API accepts (shared by the endpoints and /docs).

Unknown fields are ignored, as OpenAI-compatible servers do, so any client version works; fields that
would change the output and that the swarm cannot honour are refused (``core.check_honoured``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    # Other fields are kept (not validated) so that ``core.check_honoured`` can refuse the ones that would
    # change the output and that this server cannot honour; the rest (user, metadata, store...) are ignored.
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, description="new tokens per choice (default: the server's "
                                                      "--default-max-tokens, capped by the context left)")
    temperature: float | None = Field(None, description="0 = greedy; default 1")
    top_p: float | None = None
    n: int | None = Field(None, description="choices, sampled in one swarm session")
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, description="makes sampling reproducible (per request, even under concurrency)")
    logprobs: bool | int | None = Field(None, description="chat: true for each token's log-probability; "
                                                          "completions: the number of alternatives (0-20)")
    top_logprobs: int | None = Field(None, description="chat: alternatives per token (0-20), with logprobs")
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(None, description="token id -> bias added to its logit, [-100, 100]")
    presence_penalty: float | None = Field(None, description="[-2, 2]: subtracted once from every token already generated")
    frequency_penalty: float | None = Field(None, description="[-2, 2]: subtracted per occurrence in what was generated")
    response_format: dict[str, Any] | None = Field(None, description="{'type': 'text' | 'json_object' | 'json_schema', "
                                                                     "'json_schema': {'name', 'schema'}}")

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, description="the newer name of max_tokens")


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
