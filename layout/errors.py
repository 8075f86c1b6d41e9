"""What goes wrong reading a model: a checkpoint folder that cannot be loaded, a hub id that cannot be fetched."""

from __future__ import annotations


class CheckpointError(ValueError):
    """The checkpoint directory is missing, incomplete or not a checkpoint this model class can load."""


class HubError(RuntimeError):
    """A model could not be fetched from the hub; the message names the fix."""
