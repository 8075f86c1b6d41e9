"""The model layout: the ground floor's second half (with ``wire``), which peer and client both load from.

Files:
- parts.py   which modules are the blocks (read from the model itself), and loading a part of a checkpoint
             (a peer's blocks, a client's embeddings and head) through transformers' own ``from_pretrained``
- hub.py     a hub id (``org/name[@revision]``) fetched through huggingface_hub: only the shards a part needs
- errors.py  CheckpointError (a folder that cannot be loaded) and HubError (a hub id that cannot be fetched)

``import layout`` gives the loading functions (``layout.load_part``, ``layout.find_blocks``, …).
"""

from layout.errors import CheckpointError, HubError
from layout.parts import (
    INDEX_FILE, PER_LAYER_FIELDS, SINGLE_FILE, Placeholder, StandIn, checkpoint_files, config_source, find_blocks,
    is_position_helper, load_config, load_part, narrow_blocks, part_class, part_source, span_config, stack_attr_for,
)

__all__ = [
    "CheckpointError", "HubError", "INDEX_FILE", "PER_LAYER_FIELDS", "SINGLE_FILE", "Placeholder", "StandIn",
    "checkpoint_files", "config_source", "find_blocks", "is_position_helper", "load_config", "load_part",
    "narrow_blocks", "part_class", "part_source", "span_config", "stack_attr_for",
]
