"""The OpenAI-compatible API: its pure core, then the unmodified `openai` package against a uvicorn server
in front of a real swarm (a DHT node and two peer processes of a tiny Llama carrying SmolLM2's tokenizer
and chat template)."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

from api import ApiConfig, Engine, make_app
from api.core import ApiError, ChoiceDecoder, OutputFormat, Penalties, ResponseMeta, TokenLogprob, Usage, check_honoured, \
    check_logprobs, check_penalties, check_sampling, chunk_body, response_body, sse, validation_error
from api.engine import PenaltyProcessor
from api.grammar import Grammars
from client import AutoDistributedModelForCausalLM
from swarmllm import checkpoints, demo, launch

# ---------------------------------------------------------------- pure core

PIECES = {1: "Hel", 2: "lo", 3: " wor", 4: "ld", 5: "!", 6: "\xe2", 7: "\x82\xac", 9: "<eos>"}


def _decode(ids):
    """A byte-level-like decoder: pieces are Latin-1 bytes, decoded together as UTF-8."""
    return "".join(PIECES[i] for i in ids).encode("latin-1").decode("utf-8", errors="replace")


def _feed(decoder, ids):
    return [decoder.feed(i) for i in ids]


def test_decoder_holds_back_a_possible_stop_and_excludes_it():
    d = ChoiceDecoder(_decode, eos_ids=[9], stop=[" world"], max_tokens=10)
    deltas = _feed(d, [1, 2, 3, 4, 5])
    assert deltas == ["Hel", "lo", "", "", ""]  # " wor" might begin " world": held, then cut
    assert d.finish_reason == "stop" and d.text == "Hello" and d.tokens == 4


def test_decoder_releases_a_false_alarm_and_ends_at_eos_or_length():
    d = ChoiceDecoder(_decode, eos_ids=[9], stop=[" worm"], max_tokens=10)
    assert _feed(d, [1, 3, 4, 9, 1]) == ["Hel", "", " world", "", ""]
    assert (d.finish_reason, d.tokens) == ("stop", 4)
    d = ChoiceDecoder(_decode, eos_ids=[9], stop=["zz"], max_tokens=3)
    assert "".join(_feed(d, [1, 2, 3, 4])) == "Hello wor" and d.finish_reason == "length"


def test_decoder_waits_for_a_whole_utf8_character():
    d = ChoiceDecoder(_decode, eos_ids=[], stop=[], max_tokens=10)
    assert _feed(d, [1, 6, 7]) == ["Hel", "", "€"]
    assert d.finish("length") == "" and d.text == "Hel€"
    d = ChoiceDecoder(_decode, eos_ids=[], stop=[], max_tokens=10)
    _feed(d, [1, 6])
    assert d.finish("length") == "\ufffd"  # what is held back comes out at the end


def test_sampling_checks_name_the_field_and_the_limit():
    ok = dict(max_tokens=10, temperature=None, top_p=None, stop=None, seed=None, n=None, prompt_tokens=20,
              context_length=100, default_max_tokens=256)
    p = check_sampling(**ok)
    assert (p.max_tokens, p.temperature, p.top_p, p.stop, p.n, p.greedy) == (10, 1.0, 1.0, (), 1, False)
    assert check_sampling(**{**ok, "max_tokens": None}).max_tokens == 80  # the default is capped by the room left
    assert check_sampling(**{**ok, "stop": "x", "temperature": 0}).stop == ("x",)
    cases = [({"max_tokens": -1}, "max_tokens", "minimum of 1"), ({"max_tokens": 81}, "max_tokens", "at most 80"),
             ({"temperature": 3}, "temperature", "[0, 2]"), ({"top_p": 0}, "top_p", "(0, 1]"),
             ({"n": 0}, "n", "between 1"), ({"stop": list("abcde")}, "stop", "at most 4"),
             ({"prompt_tokens": 100}, "messages", "context length")]
    for change, param, words in cases:
        with pytest.raises(ApiError) as e:
            check_sampling(**{**ok, **change})
        assert (e.value.status, e.value.param) == (400, param) and words in e.value.message, change


def test_logprobs_fields_are_checked_and_shaped_as_openai():
    assert check_logprobs(chat=True, logprobs=None, top_logprobs=None) == (None, False)
    assert check_logprobs(chat=True, logprobs=True, top_logprobs=None) == (0, False)
    assert check_logprobs(chat=True, logprobs=True, top_logprobs=20) == (20, False)
    assert check_logprobs(chat=False, logprobs=3, top_logprobs=None, echo=True) == (3, True)
    assert check_logprobs(chat=False, logprobs=0, top_logprobs=None) == (0, False)
    assert check_logprobs(chat=False, logprobs=None, top_logprobs=None, echo=True) == (None, False)
    refused = [dict(chat=True, logprobs=False, top_logprobs=2), dict(chat=True, logprobs=True, top_logprobs=21),
               dict(chat=True, logprobs=2, top_logprobs=None), dict(chat=False, logprobs=21, top_logprobs=None),
               dict(chat=False, logprobs=True, top_logprobs=None), dict(chat=False, logprobs=1, top_logprobs=1)]
    for fields in refused:
        with pytest.raises(ApiError) as e:
            check_logprobs(**fields)
        assert e.value.status == 400 and e.value.param in ("logprobs", "top_logprobs"), fields
    ok = dict(max_tokens=0, temperature=None, top_p=None, stop=None, seed=None, n=None, prompt_tokens=5,
              context_length=100, default_max_tokens=256)
    assert check_sampling(**ok, logprobs=1, prompt_logprobs=True).max_tokens == 0  # scoring the prompt only
    with pytest.raises(ApiError, match="minimum of 1"):
        check_sampling(**ok, logprobs=1)  # 0 new tokens is only for scoring an echoed prompt

    entries = [TokenLogprob("Hel", None), TokenLogprob("lo", -0.5, (("lo", -0.5), ("p", -1.5)))]
    body = response_body(ResponseMeta("c", 1, "m", chat=False), ["Hello"], ["length"], Usage(2, 0), [entries])
    assert body["choices"][0]["logprobs"] == {"tokens": ["Hel", "lo"], "token_logprobs": [None, -0.5],
                                              "top_logprobs": [None, {"lo": -0.5, "p": -1.5}], "text_offset": [0, 3]}
    chat = chunk_body(ResponseMeta("c", 1, "m", chat=True), 0, "lo", None, logprobs=entries[1:])
    assert chat["choices"][0]["logprobs"] == {"content": [
        {"token": "lo", "logprob": -0.5, "bytes": [108, 111], "top_logprobs": [
            {"token": "lo", "logprob": -0.5, "bytes": [108, 111]}, {"token": "p", "logprob": -1.5, "bytes": [112]}]}],
        "refusal": None}
    assert chunk_body(ResponseMeta("c", 1, "m", chat=False), 0, "x", None, logprobs=entries[1:],
                      offset=7)["choices"][0]["logprobs"]["text_offset"] == [7]
    d = ChoiceDecoder(_decode, eos_ids=[9], stop=[], max_tokens=10)  # a delta carries its tokens' entries;
    d.feed(1, TokenLogprob("Hel", -1.0))                              # the end-of-sequence token has none
    d.feed(9, TokenLogprob("<eos>", -2.0))
    assert [e.text for e in d.take_logprobs()] == ["Hel"] and d.take_logprobs() == ()


def test_fields_that_would_change_the_output_are_honoured_or_refused():
    check_honoured({"response_format": {"type": "text"}, "tool_choice": "none", "user": "x", "metadata": {}})
    for fields in ({"tools": [{"type": "function"}]},
                   {"top_k": 5}, {"best_of": 3}, {"suffix": "end"}):
        with pytest.raises(ApiError) as e:
            check_honoured(fields)
        assert (e.value.status, e.value.param, e.value.code) == (400, next(iter(fields)), "unsupported_parameter")
    p = check_penalties(logit_bias={"3": 5.0, "0": -100}, presence_penalty=0.5, frequency_penalty=None, vocab_size=10)
    assert p == Penalties(((3, 5.0), (0, -100.0)), 0.5, 0.0) and bool(p) and not Penalties()
    for bad, param in [(dict(logit_bias={"10": 1}), "logit_bias"), (dict(logit_bias={"a": 1}), "logit_bias"),
                       (dict(logit_bias={"1": 101}), "logit_bias"), (dict(presence_penalty=2.5), "presence_penalty"),
                       (dict(frequency_penalty=-3), "frequency_penalty")]:
        with pytest.raises(ApiError) as e:
            check_penalties(**{"logit_bias": None, "presence_penalty": None, "frequency_penalty": None,
                               "vocab_size": 10, **bad})
        assert e.value.param == param, bad
    # OpenAI's formula: bias added; generated tokens (not the prompt's) lowered by presence + frequency x count
    scores = torch.zeros(1, 5)
    out = PenaltyProcessor(Penalties(((4, 2.0),), presence=0.5, frequency=1.0), prompt_tokens=2)(
        torch.tensor([[1, 1, 2, 2, 3]]), scores)
    assert out.tolist() == [[0.0, 0.0, -2.5, -1.5, 2.0]] and scores.tolist() == [[0.0] * 5]


# ten JSON schemas for structured outputs (nested objects, arrays, enums, bounded numbers, a pattern, anyOf)
SCHEMAS = [
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "count": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["colour", "count"], "additionalProperties": False},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120},
     "admin": {"type": "boolean"}}, "required": ["age", "admin"], "additionalProperties": False}}, "required": ["person"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 1}}, "required": ["score"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": "null"}}, "required": ["ok", "note"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8}}, "required": ["name"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[a-z]{3}-[0-9]{2}$"}}, "required": ["code"], "additionalProperties": False},
    {"anyOf": [{"type": "object", "properties": {"kind": {"const": "cat"}, "lives": {"type": "integer", "minimum": 1, "maximum": 9}},
                "required": ["kind", "lives"], "additionalProperties": False},
               {"type": "object", "properties": {"kind": {"const": "dog"}, "good": {"type": "boolean"}}, "required": ["kind", "good"], "additionalProperties": False}]},
    {"type": "object", "properties": {"points": {"type": "array", "maxItems": 3, "items": {"type": "object", "properties": {
        "x": {"type": "integer", "minimum": -9, "maximum": 9}, "y": {"type": "integer", "minimum": -9, "maximum": 9}},
        "required": ["x", "y"], "additionalProperties": False}}}, "required": ["points"], "additionalProperties": False},
    {"type": "object", "properties": {"version": {"const": 2}, "level": {"enum": [1, 2, 3]}, "mode": {"enum": ["fast", "safe"]}},
     "required": ["version", "level", "mode"], "additionalProperties": False},
]


def test_a_response_format_schema_is_enforced_on_sampled_tokens(chat_checkpoint):
    """The grammar processor the API puts in generate(), on local transformers: two samples at temperature 1
    for each schema, every one valid JSON that matches (a random model would write anything otherwise)."""
    tokenizer = AutoTokenizer.from_pretrained(chat_checkpoint)
    local = AutoModelForCausalLM.from_pretrained(chat_checkpoint, dtype=torch.float32).eval()
    grammars = Grammars(tokenizer, (tokenizer.eos_token_id,), local.config.vocab_size)
    ids = tokenizer("Answer in JSON:", return_tensors="pt")["input_ids"].repeat(2, 1)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread only waits at every op's barrier on a busy machine
    try:
        _sample_every_schema(local, tokenizer, grammars, ids)
    finally:
        torch.set_num_threads(threads)
    free = local.generate(ids[:1], attention_mask=torch.ones_like(ids[:1]), do_sample=True, temperature=1.0,
                          top_k=0, max_new_tokens=20, pad_token_id=tokenizer.eos_token_id)
    with pytest.raises(ValueError):  # without the grammar the same model writes no JSON
        json.loads(tokenizer.decode(free[0, ids.shape[1]:], skip_special_tokens=True))
    with pytest.raises(ApiError) as e:
        grammars.grammar(OutputFormat("json_schema", {"type": "object", "properties": {"a": {"type": "nonsense"}}}),
                         check=True)
    assert e.value.param == "response_format"


def _sample_every_schema(local, tokenizer, grammars: Grammars, ids: torch.Tensor) -> None:
    for schema in SCHEMAS:
        out = local.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                             max_new_tokens=80, pad_token_id=tokenizer.eos_token_id,
                             logits_processor=[grammars.processor(OutputFormat("json_schema", schema), 2)])
        for row in out:
            jsonschema.validate(json.loads(tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True)), schema)


def test_validation_errors_become_openai_400s():
    bad_json = validation_error([{"type": "json_invalid", "loc": ("body", 3), "msg": "JSON decode error",
                                  "ctx": {"error": "Expecting value"}}])
    assert bad_json.status == 400 and "could not parse the JSON body" in bad_json.message
    missing = validation_error([{"type": "missing", "loc": ("body", "model"), "msg": "Field required"}])
    assert missing.body() == {"error": {"message": "you must provide the 'model' parameter",
                                        "type": "invalid_request_error", "param": "model", "code": None}}
    wrong = validation_error([{"type": "int_parsing", "loc": ("body", "max_tokens"), "msg": "not an int", "input": "x"}])
    assert wrong.param == "max_tokens" and '"x"' in wrong.message


def test_response_and_chunk_shapes():
    meta = ResponseMeta("id1", 5, "m", chat=True)
    body = response_body(meta, ["hi"], ["stop"], Usage(3, 1))
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    assert chunk_body(meta, 0, None, None, role=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunk_body(meta, 1, None, "length")["choices"][0] == {"index": 1, "delta": {}, "logprobs": None,
                                                                "finish_reason": "length"}
    text = chunk_body(ResponseMeta("id2", 5, "m", chat=False), 0, "a", None)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "a"
    assert sse({"a": "é"}) == 'data: {"a": "é"}\n\n'.encode()


def test_demo_snippets_talk_to_the_api():
    text = demo.api_snippets("http://127.0.0.1:8080/v1", "smollm2", ["/ip4/127.0.0.1/tcp/1/p2p/Qm"], "/models/x")
    assert "swarmllm api /models/x --initial-peers /ip4/127.0.0.1/tcp/1/p2p/Qm --port 8080" in text
    assert "curl http://127.0.0.1:8080/v1/chat/completions" in text
    assert 'OpenAI(base_url="http://127.0.0.1:8080/v1"' in text and '"model": "smollm2"' in text


# ---------------------------------------------------------------- a real swarm behind the API

class Server:
    """uvicorn in a thread of this process; stop() ends it (joined with a timeout)."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.server.install_signal_handlers = lambda: None
        self.thread = threading.Thread(target=self.server.run, name="api-test-server", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start within 30 s"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.server.servers[0].sockets[0].getsockname()[1]}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    return checkpoints.tiny_chat(str(tmp_path_factory.mktemp("ckpt-chat")))


@pytest.fixture(scope="module")
def api(chat_checkpoint, make_swarm):
    swarm = make_swarm()
    peers = swarm.add_peers(chat_checkpoint, [(0, 3), (3, 6)], extra=["--metrics-port", "0"])
    tokenizer = AutoTokenizer.from_pretrained(chat_checkpoint)
    model = AutoDistributedModelForCausalLM.from_pretrained(chat_checkpoint, swarm.initial_peers)
    engine = Engine(model, tokenizer, max_concurrency=4, token_timeout=60)
    server = Server(make_app(engine, ApiConfig(model_name="tiny-chat", context_length=512)))
    try:
        yield dict(swarm=swarm, peers=peers, tokenizer=tokenizer, model=model, engine=engine, url=server.url,
                   client=openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60))
    finally:
        server.stop()
        engine.close()
        model.swarm.shutdown()


def _chat_ids(tokenizer, content):
    text = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def _reference(api, ids, max_new_tokens):
    """What the client's own generate() says, greedy, decoded as the API decodes."""
    out = api["model"].generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids.shape[1]:].tolist()
    return api["tokenizer"].decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False), new


def test_models_chat_and_completion_equal_generate(api):
    client, tokenizer = api["client"], api["tokenizer"]
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    ids = _chat_ids(tokenizer, "What is the capital of France?")
    expected, new = _reference(api, ids, 12)
    assert expected  # the random model says something
    chat = client.chat.completions.create(model="tiny-chat", max_tokens=12, temperature=0,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert chat.choices[0].message.content == expected
    assert chat.choices[0].finish_reason == ("stop" if len(new) < 12 or new[-1] == tokenizer.eos_token_id else "length")
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (ids.shape[1], len(new))

    stream = client.chat.completions.create(model="tiny-chat", max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "What is the capital of France?"}])
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # it streamed
    assert chunks[-1].usage.completion_tokens == len(new)

    prompt = "Once upon a time"
    pids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    expected, _ = _reference(api, pids, 10)
    done = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=10, temperature=0)
    assert done.choices[0].text == expected
    streamed = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_logprobs_equal_local_transformers_and_an_echoed_prompt_is_scored(api, chat_checkpoint):
    client, tokenizer = api["client"], api["tokenizer"]
    local = AutoModelForCausalLM.from_pretrained(chat_checkpoint, dtype=torch.float32).eval()

    def local_logprobs(ids: list[int]) -> torch.Tensor:  # (T, vocab): position i predicts token i + 1
        with torch.no_grad():
            return torch.log_softmax(local(torch.tensor([ids])).logits[0].float(), dim=-1)

    # how lm-evaluation-harness scores a text: echo it, logprobs, no new tokens
    prompt = "The quick brown fox jumps over the lazy dog"
    ids = tokenizer(prompt)["input_ids"]
    scored = client.completions.create(model="tiny-chat", prompt=prompt, echo=True, logprobs=2, max_tokens=0,
                                       temperature=0)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert lp.tokens == [tokenizer.decode([t]) for t in ids] and lp.token_logprobs[0] is None
    rows = local_logprobs(ids)
    expected = [rows[i - 1, ids[i]].item() for i in range(1, len(ids))]
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], expected)) < 1e-4
    assert lp.top_logprobs[0] is None and all(len(top) == 2 for top in lp.top_logprobs[1:])
    best = [tokenizer.decode([int(rows[i - 1].argmax())]) for i in range(1, len(ids))]
    assert [max(top, key=top.get) for top in lp.top_logprobs[1:]] == best  # lm-eval's is_greedy reads this
    assert lp.text_offset[:3] == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]

    # a chat reply, greedy: every token is its position's likeliest, with the model's log-probability
    question = [{"role": "user", "content": "Name three colours."}]
    chat_ids = _chat_ids(tokenizer, question[0]["content"])
    _, new = _reference(api, chat_ids, 8)
    reply = client.chat.completions.create(model="tiny-chat", max_tokens=8, temperature=0, logprobs=True,
                                           top_logprobs=3, messages=question)
    content = reply.choices[0].logprobs.content
    kept = [t for t in new if t != tokenizer.eos_token_id]  # the end-of-sequence token is not in the reply
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in kept]
    rows = local_logprobs(chat_ids[0].tolist() + new)
    start = chat_ids.shape[1] - 1
    for i, (c, token) in enumerate(zip(content, kept)):
        assert abs(c.logprob - rows[start + i, token].item()) < 1e-4
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob
        assert c.bytes == list(c.token.encode())
    streamed = client.chat.completions.create(model="tiny-chat", max_tokens=8, temperature=0, logprobs=True,
                                              top_logprobs=3, messages=question, stream=True)
    chunks = [e for chunk in streamed if chunk.choices and chunk.choices[0].logprobs
              for e in chunk.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in chunks] == [(c.token, round(c.logprob, 5)) for c in content]
    plain = client.chat.completions.create(model="tiny-chat", max_tokens=4, temperature=0, messages=question)
    assert plain.choices[0].logprobs is None  # only when asked


def test_logit_bias_steers_the_swarm_and_unhonoured_fields_are_refused(api):
    client, tokenizer = api["client"], api["tokenizer"]
    token = tokenizer(" blue", add_special_tokens=False)["input_ids"][0]
    biased = client.completions.create(model="tiny-chat", prompt="My favourite colour is", max_tokens=5,
                                       temperature=0, logit_bias={str(token): 100})
    assert biased.choices[0].text == tokenizer.decode([token] * 5)
    plain = client.completions.create(model="tiny-chat", prompt="My favourite colour is", max_tokens=5, temperature=0)
    assert plain.choices[0].text != biased.choices[0].text
    for extra in ({"tools": [{"type": "function", "function": {"name": "f"}}]},
                  {"extra_body": {"top_k": 3}}):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="tiny-chat", max_tokens=4, messages=[{"role": "user", "content": "hi"}],
                                           **extra)
        assert e.value.body["code"] == "unsupported_parameter"
        assert e.value.body["param"] in ("tools", "top_k")


class Pet(pydantic.BaseModel):
    kind: Literal["cat", "dog"]
    age: int = pydantic.Field(ge=0, le=20)
    vaccinated: bool


def test_structured_outputs_through_the_swarm(api):
    client = api["client"]
    question = [{"role": "user", "content": "Describe a pet as JSON."}]
    parsed = client.chat.completions.parse(model="tiny-chat", messages=question, response_format=Pet, max_tokens=60,
                                           temperature=1.0, seed=3)
    assert isinstance(parsed.choices[0].message.parsed, Pet)  # the openai SDK's parse(), with a pydantic model
    schema = SCHEMAS[8]  # an array of objects with bounded integers, streamed as two sampled choices
    stream = client.chat.completions.create(model="tiny-chat", messages=question, max_tokens=80, temperature=1.0,
                                            n=2, seed=5, stream=True, response_format={
                                                "type": "json_schema", "json_schema": {"name": "points", "schema": schema,
                                                                                       "strict": True}})
    texts = ["", ""]
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    for text in texts:
        jsonschema.validate(json.loads(text), schema)
    anything = client.chat.completions.create(model="tiny-chat", messages=question, max_tokens=40, temperature=0,
                                              response_format={"type": "json_object"}).choices[0]
    assert anything.message.content.startswith("{")
    if anything.finish_reason == "stop":
        assert isinstance(json.loads(anything.message.content), dict)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny-chat", messages=question, max_tokens=4, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {
                "a": {"type": "nonsense"}}}}})
    assert e.value.body["param"] == "response_format"


def test_stop_seed_and_n(api):
    client = api["client"]
    full = client.completions.create(model="tiny-chat", prompt="The sky is", max_tokens=16, temperature=0).choices[0]
    stop = full.text[len(full.text) // 2:][:3]
    assert stop.strip(), f"pick another prompt: reply {full.text!r} has no usable middle"
    cut = client.completions.create(model="tiny-chat", prompt="The sky is", max_tokens=16, temperature=0,
                                    stop=[stop]).choices[0]
    assert cut.text == full.text[:full.text.index(stop)] and cut.finish_reason == "stop"
    streamed = client.completions.create(model="tiny-chat", prompt="The sky is", max_tokens=16, temperature=0,
                                         stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.text

    kw = dict(model="tiny-chat", messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=1.0, n=2)
    a = client.chat.completions.create(seed=7, **kw)
    b = client.chat.completions.create(seed=7, **kw)
    assert len(a.choices) == 2 and [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.choices[0].message.content != a.choices[1].message.content  # each choice samples on its own
    assert a.usage.completion_tokens >= 2  # both choices count


def test_four_concurrent_streams(api):
    client, tokenizer = api["client"], api["tokenizer"]
    prompts = [f"Tell me about the number {i}" for i in range(4)]
    expected = [_reference(api, _chat_ids(tokenizer, p), 24)[0] for p in prompts]
    before = api["engine"].statistics()["finished"]

    def ask(prompt):
        stream = client.chat.completions.create(model="tiny-chat", max_tokens=24, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": prompt}])
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, prompts, timeout=120))
    assert got == expected
    stats = api["engine"].statistics()
    assert stats["finished"] - before == 4 and stats["peak_running"] >= 2  # served side by side


def _post(url, body: bytes, headers=None):
    return httpx.post(url, content=body, headers={"Content-Type": "application/json", **(headers or {})}, timeout=30)


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(api):
    client, url = api["client"], api["url"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found" and "tiny-chat" in e.value.message
    for max_tokens, words in [(-1, "minimum of 1"), (10**9, "max_tokens is too large")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny-chat", prompt="hi", max_tokens=max_tokens)
        assert words in e.value.message and e.value.param == "max_tokens"
    for body in [b'{"model": "tiny-chat", "prompt": ', b"\xff\xfe", b"[1, 2]", b'{"prompt": "x"}',
                 b'{"model": "tiny-chat", "messages": "hello"}']:
        r = _post(url + "/chat/completions", body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    r = httpx.get(url + "/nowhere", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    reply = client.completions.create(model="tiny-chat", prompt="still there?", max_tokens=3, temperature=0)
    assert reply.usage.completion_tokens >= 1


def _peer_sessions(peer) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{peer.ready['metrics_port']}/metrics", timeout=10) as r:
        return int(re.search(r"^swarmllm_peer_sessions (\d+)", r.read().decode(), re.M).group(1))


def _wait_until_idle(api, before):
    """Wait (20 s at most) until no generation runs and the peers hold no session; check it was cancelled."""
    deadline = time.monotonic() + 20
    while True:
        stats, sessions = api["engine"].statistics(), [_peer_sessions(p) for p in api["peers"]]
        if stats["running"] == 0 and sessions == [0, 0]:
            break
        assert time.monotonic() < deadline, f"generation still running after the client left: {stats}, {sessions}"
        time.sleep(0.2)
    assert stats["cancelled"] == before["cancelled"] + 1, (before, stats)  # stopped early, not run to the end


LONG = {"model": "tiny-chat", "prompt": "Count forever:", "max_tokens": 480, "temperature": 0}


def test_a_client_that_leaves_mid_stream_frees_its_session(api):
    before = api["engine"].statistics()
    with httpx.stream("POST", api["url"] + "/completions", json={**LONG, "stream": True}, timeout=30) as r:
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: {"))
        assert json.loads(first[6:])["object"] == "text_completion"
        during = [_peer_sessions(p) for p in api["peers"]]
        assert min(during) >= 1, during  # mid-generation (a previous test's session may still be closing)
    _wait_until_idle(api, before)


def test_a_client_that_gives_up_waiting_frees_its_session(api):
    before = api["engine"].statistics()
    with pytest.raises(httpx.ReadTimeout):  # 480 tokens take seconds; the client waits 0.3 s and hangs up
        httpx.post(api["url"] + "/completions", json=LONG, timeout=httpx.Timeout(30, read=0.3))
    _wait_until_idle(api, before)


def test_no_route_is_a_503_naming_the_missing_blocks(api, chat_checkpoint):
    from fastapi.testclient import TestClient

    lonely = AutoDistributedModelForCausalLM.from_pretrained(chat_checkpoint, api["swarm"].initial_peers,
                                                             model_id="nobody-serves-this", route_timeout=0.5)
    engine = Engine(lonely, api["tokenizer"], max_concurrency=1)
    try:
        with TestClient(make_app(engine, ApiConfig(model_name="tiny-chat", context_length=512))) as http:
            for stream in (False, True):
                r = http.post("/v1/completions", json={"model": "tiny-chat", "prompt": "hi", "max_tokens": 2,
                                                       "stream": stream})
                assert r.status_code == 503, r.text
                error = r.json()["error"]
                assert error["code"] == "missing_blocks" and error["missing_blocks"] == [[0, 6]]
                assert "blocks [0, 6)" in error["message"] and "swarmllm peer" in error["message"]
    finally:
        engine.close()
        lonely.swarm.shutdown()


def test_the_api_command_with_a_key(api, chat_checkpoint):
    proc = launch.SwarmProcess("api", launch.swarmllm_command(
        "api", chat_checkpoint, "--initial-peers", *api["swarm"].initial_peers, "--port", "0",
        "--api-key", "s3cret", "--model-name", "tiny"))
    api["swarm"].procs.append(proc)  # stopped by PID with the swarm, whatever happens here
    try:
        url = proc.wait_ready(120)["url"]
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0, timeout=60).models.list()
        assert e.value.code == "invalid_api_key"
        assert httpx.get(url + "/models", timeout=30).status_code == 401  # no key at all
        client = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="tiny", max_tokens=5, temperature=0,
                                               messages=[{"role": "user", "content": "hi"}])
        expected, _ = _reference(api, _chat_ids(api["tokenizer"], "hi"), 5)
        assert reply.choices[0].message.content == expected
    finally:
        proc.stop()


def test_a_generation_that_starts_over_answers_with_its_last_attempt_only(chat_checkpoint):
    """verify_mode redo/strict: generate() may throw its text away after the audits and start again; the
    API holds text back until generate() returns, and starts its decoders over with it."""
    import asyncio
    import types

    import torch

    from api.core import SamplingParams

    tokenizer = AutoTokenizer.from_pretrained(chat_checkpoint)
    lie, checked = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (" a lie told", " the checked text"))

    class StartsOver:
        swarm = types.SimpleNamespace(cfg=types.SimpleNamespace(verify_mode="strict"))
        generation_config = types.SimpleNamespace(eos_token_id=tokenizer.eos_token_id)

        def generate(self, ids, stopping_criteria, **kwargs):
            for attempt in (lie, checked):  # the first attempt was served by a liar
                seq = ids
                for token in attempt:
                    seq = torch.cat([seq, torch.full((ids.shape[0], 1), token)], dim=1)
                    stopping_criteria[0](seq, None)
            return seq

    engine = Engine(StartsOver(), tokenizer, max_concurrency=1)

    async def collect():
        params = SamplingParams(max_tokens=32, temperature=0.0, top_p=1.0, stop=(), seed=None, n=1)
        return [item async for item in engine.generate([1, 2, 3], params)]

    try:
        items = asyncio.run(collect())
    finally:
        engine.close()
    text = "".join(getattr(item, "text", "") or "" for item in items)
    assert text == tokenizer.decode(checked, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert items[-1].completion_tokens == len(checked)
