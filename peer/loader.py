"""Reading a peer's share of a checkpoint: only the tensors of its blocks, never embeddings or LM head.

Works with a single ``model.safetensors`` or a sharded checkpoint (``model.safetensors.index.json``):
only the shards that hold one of the wanted tensors are opened, and only the wanted tensors are read.
"""

from __future__ import annotations

import torch
from safetensors import safe_open

from peer.wire import BLOCK_NAME_RE, CheckpointError, block_tensor_names, checkpoint_files

def load_blocks(model_dir: str, start: int, end: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict (local names) of blocks [start, end), read tensor by tensor from the checkpoint."""
    files = checkpoint_files(model_dir)
    wanted = block_tensor_names(files, start, end)
    found_blocks = {int(BLOCK_NAME_RE.match(n).group(1)) for n in wanted}
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
