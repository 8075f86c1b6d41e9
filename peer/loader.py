"""Reading a peer's share of a checkpoint: only the tensors of its blocks, never embeddings or LM head.

Works with a single ``model.safetensors`` or a sharded checkpoint (``model.safetensors.index.json``):
only the shards that hold one of the wanted tensors are opened, and only the wanted tensors are read.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable

import torch
from safetensors import safe_open

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# "model.layers.7.self_attn.q_proj.weight" (causal LM checkpoint) or "layers.7...." (base model checkpoint)
_BLOCK_RE = re.compile(r"^(?:(?:model|transformer)\.)?layers\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """The checkpoint directory is missing, incomplete or not a safetensors checkpoint."""


def checkpoint_files(model_dir: str) -> dict[str, str]:
    """tensor name -> file path for every tensor of the checkpoint (reads only headers)."""
    index_path = os.path.join(model_dir, INDEX_FILE)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(model_dir, fname) for name, fname in weight_map.items()}
    single = os.path.join(model_dir, SINGLE_FILE)
    if os.path.isfile(single):
        with safe_open(single, framework="pt") as f:
            return {name: single for name in f.keys()}
    raise CheckpointError(
        f"{model_dir} has neither {SINGLE_FILE} nor {INDEX_FILE}: point at a transformers safetensors checkpoint"
    )


def block_tensor_names(names: Iterable[str], start: int, end: int) -> dict[str, str]:
    """checkpoint name -> local name ('layers.{i - start}.…') for the tensors of blocks [start, end)."""
    wanted = {}
    for name in names:
        match = _BLOCK_RE.match(name)
        if match and start <= int(match.group(1)) < end:
            wanted[name] = f"layers.{int(match.group(1)) - start}.{match.group(2)}"
    return wanted


def load_blocks(model_dir: str, start: int, end: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict (local names) of blocks [start, end), read tensor by tensor from the checkpoint."""
    files = checkpoint_files(model_dir)
    wanted = block_tensor_names(files, start, end)
    found_blocks = {int(_BLOCK_RE.match(n).group(1)) for n in wanted}
    missing = sorted(set(range(start, end)) - found_blocks)
    if missing:
        raise CheckpointError(f"{model_dir} has no tensors for blocks {missing}: is the block range right?")
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        by_file.setdefault(files[name], []).append(name)
    state = {}
    for path, names in by_file.items():
        with safe_open(path, framework="pt") as f:
            for name in names:
                state[wanted[name]] = f.get_tensor(name).to(dtype)
    return state


def client_tensor_names(names: Iterable[str]) -> list[str]:
    """The tensors a client loads: everything that is not a transformer block."""
    return [n for n in names if not _BLOCK_RE.match(n)]
