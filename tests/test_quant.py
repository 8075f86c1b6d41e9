"""Quantized peers (bitsandbytes NF4 and LLM.int8 through transformers' quantizer integration), the
formats rule (a route never mixes formats unless the client allows it; audits compare like with like),
and peers that size themselves to --max-memory.

One swarm for the module: a float32, an int8 and an NF4 pair of peers over the same tiny Llama."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from client import AutoDistributedModelForCausalLM
from client.errors import MissingBlocksError
import layout
from peer import quant
from peer.blocks import BlockRunner
from peer.config import PeerConfig
from peer.server import Peer
from swarmllm import launch

SPANS = [(0, 3), (3, 6)]
QUANTS = ["nf4", "int8"]


@pytest.fixture(scope="module")
def swarm(make_swarm, path):
    swarm = make_swarm()
    swarm.by_quant = {q: swarm.add_peers(path, SPANS, extra=["--quant", q]) for q in QUANTS}
    swarm.add_peers(path, SPANS)
    return swarm


def local_model(path: str, q: str):
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=quant.quantization_config(q, torch.float32)).eval()


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 250, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("q", QUANTS)
def test_quantized_swarm_equals_local_quantized_model(swarm, path, q):
    """Greedy, a left-padded batch and a seeded sampled run through NF4 (int8) peers equal transformers'
    local model loaded with the same BitsAndBytesConfig, token for token."""
    local = local_model(path, q)
    remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, formats=[q],
                                                             max_chunk_tokens=5)
    try:
        assert {h.quant for h in remote.swarm.route()} == {q}
        ids = _prompt(9, seed=1)
        kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert remote.generate(ids, **kwargs).tolist() == local.generate(ids, **kwargs).tolist()

        lengths = [3, 8, 6]
        batch = torch.zeros(len(lengths), 8, dtype=torch.long)
        mask = torch.zeros_like(batch)
        for row, n in enumerate(lengths):
            batch[row, 8 - n:] = _prompt(n, seed=10 + row)[0]
            mask[row, 8 - n:] = 1
        kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert remote.generate(batch, **kwargs).tolist() == local.generate(batch, **kwargs).tolist()

        kwargs = dict(max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
        torch.manual_seed(7)
        ref = local.generate(ids, **kwargs)
        torch.manual_seed(7)
        assert remote.generate(ids, **kwargs).tolist() == ref.tolist()
    finally:
        remote.swarm.shutdown()


def test_default_route_takes_one_format_the_most_precise(swarm, path):
    """With no formats given, a session uses the float32 peers only (NF4 and int8 cover the model too)."""
    remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers)
    try:
        assert {(h.dtype, h.quant) for h in remote.swarm.route()} == {("float32", "none")}
        formats = {r.format for r in remote.swarm.core.records}
        assert formats == {"float32", "float32/int8", "float32/nf4"}
        ids = _prompt(7, seed=3)
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
        assert remote.generate(ids, **kwargs).tolist() == local.generate(ids, **kwargs).tolist()
        # audits re-run a span only on a peer of the same format
        by_format = {r.format: r.peer_id for r in remote.swarm.core.records if r.start == 0}
        core = remote.swarm.core
        assert core.audits._candidates(0, 3, "float32", "nf4", frozenset()) == [by_format["float32/nf4"]]
        assert core.audits._candidates(0, 3, "float32", "none", frozenset()) == [by_format["float32"]]
    finally:
        remote.swarm.shutdown()


def test_a_format_nobody_serves_is_a_clear_error(swarm, path):
    remote = AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, formats=["bfloat16"],
                                                             route_timeout=0.5)
    try:
        with pytest.raises(MissingBlocksError, match=r"format bfloat16.*other formats serve it: float32"):
            remote.generate(_prompt(4, seed=0), max_new_tokens=2, pad_token_id=0)
    finally:
        remote.swarm.shutdown()
    with pytest.raises(ValueError, match="DTYPE, QUANT or DTYPE/QUANT"):
        AutoDistributedModelForCausalLM.from_pretrained(path, swarm.initial_peers, formats=["fp4"])


BIG_CACHE = 2**22  # cache tokens: 1 GiB of KV-cache budget per tiny block, so a block is far bigger than the
# drift of a process's RSS between computing a budget and the peer sizing itself (never allocated up front)


def _fit(path: str, q: str, blocks: int, resident: int, cache_tokens: int = BIG_CACHE, slack: float = 0.5) -> int:
    """A --max-memory that holds exactly ``blocks`` blocks (and ``slack`` of a block more) in a process
    holding ``resident`` bytes when it sizes itself."""
    per_block = quant.blocks_that_fit(layout.load_config(path), q, torch.float32, cache_tokens, 10**15, "test").per_block
    return resident + quant.RUNTIME_OVERHEAD + blocks * per_block + int(slack * per_block)


def test_peer_without_blocks_takes_as_many_as_fit_where_its_format_is_weakest(swarm, path):
    """With the NF4 peer of [3, 6) gone (float32 and int8 still serve those blocks), an NF4 peer with no
    --blocks sizes itself to 3 blocks and fills the NF4 gap: placement counts peers of its own format."""
    swarm.stop([swarm.by_quant["nf4"][1]])
    # a peer process holds 385 (forked) to 530 MiB when it sizes itself: half a block (512 MiB) of slack
    budget = _fit(path, "nf4", 3, resident=450 * 2**20)
    peer = swarm.add_peers(path, [(None, None)], extra=["--quant", "nf4", "--max-memory", str(budget),
                                                        "--cache-tokens", str(BIG_CACHE),
                                                        "--placement-jitter", "0", "--balance-period", "0"])[0]
    try:
        assert peer.ready["blocks"] == [3, 6]
        assert "sizing: max memory" in peer.stderr_tail(20000)
    finally:
        swarm.stop([peer])


def test_sizing_errors_name_the_fix(path):
    with pytest.raises(SystemExit, match="too small for one block.*--quant nf4"):
        Peer(PeerConfig(model_dir=path, start=None, end=None, max_memory=1000))
    with pytest.raises(SystemExit, match="6 blocks do not fit in --max-memory"):
        Peer(PeerConfig(model_dir=path, start=0, end=6, cache_tokens=BIG_CACHE,
                        max_memory=_fit(path, "none", 2, quant.process_rss())))
    # --max-memory is the whole process: what it holds when it sizes itself counts
    assert Peer(PeerConfig(model_dir=path, start=None, end=None, quant="nf4", cache_tokens=BIG_CACHE,
                           max_memory=_fit(path, "nf4", 4, quant.process_rss()))).num_blocks == 4
    assert Peer(PeerConfig(model_dir=path, start=None, end=None, quant="nf4", cache_tokens=BIG_CACHE,
                           max_memory=_fit(path, "nf4", 4, 0, slack=0))).num_blocks == 3


def test_sizing_counts_quantized_blocks_at_their_size_and_what_loading_holds(path):
    """Quantized blocks are counted at their quantized size (the same budget holds more of them), except
    that while loading a quantized block also holds its full-precision tensors."""
    config = layout.load_config(path)
    fit = {q: quant.blocks_that_fit(config, q, torch.float32, 1024, 10**15, "test") for q in ("none", "int8")}
    budget = 5 * fit["int8"].per_block
    held = {q: quant.blocks_that_fit(config, q, torch.float32, 1024, budget, "test").num_blocks for q in fit}
    assert held["int8"] == 5 and held["none"] < 5
    assert fit["int8"].block_loading > fit["none"].block_weights > fit["int8"].block_weights
    fixed = quant.blocks_that_fit(config, "int8", torch.float32, 1024, budget, "test", resident=fit["int8"].per_block,
                                  overhead=fit["int8"].per_block)
    assert fixed.num_blocks == 3 and fixed.fixed == 2 * fit["int8"].per_block


def test_estimated_block_size_matches_what_loads(path):
    """The sizing arithmetic is within 10 % of the bytes a loaded block really holds, for each format."""
    config = layout.load_config(path)
    for q in ("none", "int8", "nf4"):
        runner = BlockRunner(path, 0, 6, quant=q)
        fit = quant.blocks_that_fit(config, q, torch.float32, 1, 10**12, "test")
        assert abs(6 * fit.block_weights - runner.weight_bytes) <= 0.1 * runner.weight_bytes, q


def test_quant_without_bitsandbytes_is_a_clear_error(path, monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(quant.QuantError, match="pip install bitsandbytes"):
        quant.check_backend("nf4", torch.device("cpu"))
    with pytest.raises(SystemExit, match="--quant int8 needs bitsandbytes"):
        Peer(PeerConfig(model_dir=path, start=0, end=3, quant="int8"))


def test_a_checkpoint_bitsandbytes_cannot_pack_fails_at_load_naming_the_layer(tiny_checkpoint, swarm):
    """Hidden size 96: on a CPU with AVX512-BF16, bitsandbytes' NF4 repacking for its CPU kernel cannot
    reshape a 96 -> 96 layer (a reshape traceback on the first request, before). The peer now exits
    before it announces, with one message naming the layer and the formats that do work."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import has_avx512bf16

    path96 = tiny_checkpoint("llama", hidden_size=96)
    config = layout.load_config(path96)
    quant.check_layers(config, "int8", torch.float32, torch.device("cpu"))  # int8 serves it everywhere
    if not has_avx512bf16():  # bitsandbytes' plain CPU path has no such limit: the check lets NF4 through
        quant.check_layers(config, "nf4", torch.float32, torch.device("cpu"))
        return
    args = launch.swarmllm_command("peer", path96, "--initial-peers", *swarm.initial_peers, "--blocks", "0:3",
                                   "--quant", "nf4", "--device", "cpu", "--host", "127.0.0.1")
    done = subprocess.run(args, capture_output=True, text=True, timeout=180)  # killed by its PID at the deadline
    assert done.returncode != 0
    assert "SWARMLLM_READY" not in done.stdout
    assert "Traceback" not in done.stderr and "loading blocks" not in done.stderr, done.stderr[-3000:]
    assert (f"--quant nf4: bitsandbytes {bnb.__version__} cannot run this model's layer layers.0.self_attn.q_proj "
            "(96 -> 96 features) on cpu") in done.stderr, done.stderr[-3000:]
    assert "formats that work for this model here: int8, none (serve with --quant int8)" in done.stderr


def test_device_names():
    assert quant.resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert quant.resolve_device("auto").type == "cuda"
    with pytest.raises(ValueError, match="--device must be"):
        quant.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            quant.resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
@pytest.mark.parametrize("q", ["none", "nf4", "int8"])
def test_cuda_blocks_equal_local_on_cuda(path, q):
    """The same blocks on CUDA give the hidden states of transformers' local model on CUDA."""
    config = quant.quantization_config(q, torch.float32)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=config,
                                                 device_map={"": "cuda"}).eval()
    first, second = BlockRunner(path, 0, 3, device="cuda", quant=q), BlockRunner(path, 3, 6, device="cuda", quant=q)
    ids = _prompt(9, seed=2).cuda()
    with torch.inference_mode():
        ref = local.model(ids, output_hidden_states=True)
        pos = torch.arange(9, device="cuda")[None]
        mid = first.forward(ref.hidden_states[0], pos, None, first.new_cache())
        out = second.forward(mid, pos, None, second.new_cache())
        assert torch.equal(mid, ref.hidden_states[3])
        assert torch.equal(local.model.norm(out), ref.last_hidden_state)
