"""A model's structure and its checkpoint, seen through transformers' own code.

Which modules are the transformer blocks is read from the model itself: the ``nn.ModuleList`` whose items
are the layer class the model names in ``_no_split_modules`` (``model.layers``, ``transformer.h``,
``gpt_neox.layers``, …). A part of a model — a peer's blocks [start, end), or a client's embeddings, final
norm and head — is loaded by the model class's own ``from_pretrained``: the model is built on the meta
device with every block outside the part swapped for an empty placeholder (and, for a peer, every other
module that holds weights swapped for an identity), so transformers' key renaming, weight conversions
(fused MoE experts), dtype rules and quantizers apply unchanged, and only the tensors the part's modules
name are ever read from disk (safetensors are opened lazily; an unmatched tensor is never materialised).
Non-persistent buffers (rotary frequencies, embedding scales) are computed by the model's constructors.

Both the peer and the client import it (the ground floor); no I/O beyond what ``from_pretrained`` does
(and ``hub`` fetching a hub id's files).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.utils import logging as hf_logging

from layout import hub
from layout.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Config fields that hold one entry per block and must be sliced when a model object describes a sub-range.
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")


class Placeholder(nn.Module):
    """Stands where a block outside the loaded part would be: holds nothing, must never run."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("a block that this part of the model does not hold was called")


class StandIn(nn.Module):
    """Stands for a module of the embedding stage or the final norm on a peer (which holds neither):
    passes hidden states through unchanged, and answers an embedding lookup (token or position ids)
    with zeros, so that the base model's forward runs; the first block then gets the received hidden
    states instead (``BlockRunner``)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.hidden_size = hidden_size

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if x.is_floating_point():
            return x
        return torch.zeros(*x.shape, self.hidden_size, device=x.device)  # (…, hidden)


def is_position_helper(module: nn.Module) -> bool:
    """A module that holds buffers but no weights (rotary embeddings): computed from the config, needed
    wherever blocks run."""
    return any(True for _ in module.buffers()) and not any(True for _ in module.parameters())


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


def config_source(model: str) -> str:
    """A local folder holding ``model``'s config and tokenizer: ``model`` itself, or for a hub repo id
    (``org/name[@revision]``) its snapshot with only those files fetched (``layout.hub``)."""
    if hub.is_hub_id(model):
        return hub.fetch_metadata(model)
    return model


def part_source(model: str, blocks: range, *, keep_outside: bool) -> str:
    """A local folder ``load_part`` can load ``blocks`` (and, with ``keep_outside``, the rest but the
    block stack) of ``model`` from: ``model`` itself, or for a hub repo id a view of only the shards
    holding those tensors, fetched first."""
    if not hub.is_hub_id(model):
        return model
    snapshot = hub.fetch_metadata(model)  # once: config and part share it
    config = load_config(snapshot)
    return hub.fetch_part(model, stack_attr_for(config), config.num_hidden_layers, blocks, outside=keep_outside,
                          snapshot=snapshot)


def load_config(model_dir: str) -> PretrainedConfig:
    """The checkpoint's (text decoder) config; ``model_dir`` may also be a hub repo id."""
    model_dir = config_source(model_dir)
    if os.path.isdir(model_dir) and not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise CheckpointError(f"{model_dir} has no config.json: point at a transformers checkpoint folder")
    config = AutoConfig.from_pretrained(model_dir)
    return config.get_text_config(decoder=True)


def span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """A copy of ``config`` in which a model over blocks [start, end) sees them as its blocks 0..end-start-1.

    Base models index per-layer config lists by their loop position (``config.layer_types[i]``), so a
    module holding a sub-range must carry the sliced lists."""
    if not 0 <= start < end <= config.num_hidden_layers:
        raise ValueError(
            f"block range [{start}, {end}) is outside the model's {config.num_hidden_layers} blocks"
        )
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = end - start
    for field in PER_LAYER_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, (list, tuple)) and len(value) == config.num_hidden_layers:
            setattr(cfg, field, list(value[start:end]))
    return cfg


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(dotted path, list) of the model's block stack: the ModuleList of the class named in ``_no_split_modules``."""
    layer_classes = set(getattr(model, "_no_split_modules", None) or ())
    for name, module in model.named_modules():
        if (isinstance(module, nn.ModuleList) and len(module)
                and all(type(m).__name__ in layer_classes for m in module)):
            return name, module
    raise CheckpointError(
        f"{type(model).__name__} has no list of blocks of a class in _no_split_modules {sorted(layer_classes)}: "
        "this model family cannot be split into blocks")


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def part_class(cls: type, blocks: range, *, keep_outside: bool) -> type:
    """A subclass of ``cls`` that builds itself with only ``blocks`` of its block stack.

    The blocks outside the range become placeholders (their checkpoint names stay unmatched, so they
    are not read); with ``keep_outside=False`` every other module of the base model but the position
    helpers (embeddings, their norm, the final norm, even a weightless one) becomes a ``StandIn``.
    After loading, ``narrow_blocks`` leaves only the held blocks in the stack."""

    def __init__(self, config, *args, **kwargs):
        cls.__init__(self, config, *args, **kwargs)
        path, layers = find_blocks(self)
        for i in range(len(layers)):
            if i not in blocks:
                layers[i] = Placeholder()
        if not keep_outside:
            base = self.base_model
            prefix = f"{base.base_model_prefix}." if base is not self else ""
            local_path = path[len(prefix):] if path.startswith(prefix) else path
            for name, child in list(base.named_children()):
                if name != local_path.split(".")[0] and not is_position_helper(child):
                    setattr(base, name, StandIn(config.get_text_config(decoder=True).hidden_size))
        self._swarm_blocks_path = path

    # Same name and module as ``cls``: transformers looks weight conversions up by class name.
    return type(cls.__name__, (cls,), {"__init__": __init__, "__module__": cls.__module__})


def narrow_blocks(model: nn.Module) -> nn.ModuleList:
    """Leave only the held blocks (not placeholders) in the model's block stack; returns the new list."""
    path = model._swarm_blocks_path
    held = nn.ModuleList([m for m in model.get_submodule(path) if not isinstance(m, Placeholder)])
    _set_submodule(model, path, held)
    return held


@contextlib.contextmanager
def _quiet_transformers():
    """from_pretrained reports every unmatched tensor (the other blocks): expected here, so not shown."""
    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    progress = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)
        if progress:
            hf_logging.enable_progress_bar()


def load_part(model_dir: str, cls: type, blocks: range, *, keep_outside: bool, dtype: torch.dtype,
              **kwargs) -> nn.Module:
    """``cls.from_pretrained(model_dir)`` holding only ``blocks`` of the stack (and, with
    ``keep_outside``, the modules outside the stack). Raises CheckpointError if a tensor it needs is missing."""
    part = part_class(cls, blocks, keep_outside=keep_outside)
    if os.path.isdir(model_dir):
        checkpoint_files(model_dir)  # a clear error for a folder that is not a safetensors checkpoint
    with _quiet_transformers():
        model, info = part.from_pretrained(model_dir, dtype=dtype, output_loading_info=True, **kwargs)
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise CheckpointError(f"{model_dir} lacks tensors {missing[:5]} (and {max(0, len(missing) - 5)} more) "
                              f"for blocks [{blocks.start}, {blocks.stop}): is it the right checkpoint?")
    mismatched = list(info.get("mismatched_keys", ()))
    if mismatched:
        raise CheckpointError(f"{model_dir} has tensors of the wrong shape: {mismatched[:5]}")
    model._swarm_tensor_names = tuple(sorted(n for n, _ in model.named_parameters()))  # global block indices
    narrow_blocks(model)
    return model


def stack_attr_for(config) -> str:
    """The last name of the block stack's path (``layers``, ``h``), read from the model on the meta device."""
    from transformers import AutoModel

    with torch.device("meta"):
        model = AutoModel.from_config(config)
    return find_blocks(model)[0].rsplit(".", 1)[-1]
