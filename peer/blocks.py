"""The generic block runner: a truncated copy of the model's own base model holding blocks [start, end).

Any decoder-only family whose transformers base model takes ``inputs_embeds, attention_mask,
position_ids, past_key_values`` (Llama, Mistral, Qwen2/3, Phi3, Gemma2/3, Mixtral, …) runs through it:
masks, sliding windows, rotary embeddings and cache layers all come from transformers' own code.
The truncated model has ``num_hidden_layers = end - start``, per-layer config lists sliced to the span,
no embedding table and an identity final norm; its cache is indexed locally (layer 0 = block start),
which keeps ``get_seq_length`` and mask sizes right (see the notes' cache pitfalls).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, DynamicCache, PretrainedConfig

from peer import loader, wire

logger = logging.getLogger(__name__)

DTYPES = wire.HIDDEN_DTYPE_NAMES  # what a peer computes in is what the wire carries
# Config fields that hold one entry per layer and must be sliced to the span.
_PER_LAYER_FIELDS = ("layer_types", "no_rope_layers", "mlp_only_layers", "sliding_window_pattern_layers")


class SpanCache(DynamicCache):
    """A KV cache for blocks [start, end) of a runner whose first block is ``runner_start``.

    Decoder layers address the cache by their index within the runner (``self_attn.layer_idx``); a
    session over a sub-range needs index 0 to be its own first block, because transformers reads
    layer 0 for the sequence length and mask sizes. ``update`` shifts the index accordingly.
    """

    def __init__(self, config: PretrainedConfig, start: int, end: int, runner_start: int):
        super().__init__(config=config)
        self.start, self.end = start, end
        self._shift = start - runner_start

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states, value_states, layer_idx - self._shift, *args, **kwargs)


def load_config(model_dir: str) -> PretrainedConfig:
    config = AutoConfig.from_pretrained(model_dir)
    return config.get_text_config(decoder=True)


def span_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """A copy of ``config`` describing only blocks [start, end)."""
    if not 0 <= start < end <= config.num_hidden_layers:
        raise ValueError(
            f"block range [{start}, {end}) is outside the model's {config.num_hidden_layers} blocks"
        )
    cfg = copy.deepcopy(config)
    cfg.num_hidden_layers = end - start
    for field in _PER_LAYER_FIELDS:
        value = getattr(config, field, None)
        if isinstance(value, (list, tuple)) and len(value) == config.num_hidden_layers:
            setattr(cfg, field, list(value[start:end]))
    return cfg


class BlockRunner:
    """Runs blocks [start, end) of one model; one per peer. Not thread-safe: one compute owner calls it."""

    supports_batching = True  # decode steps of sessions over the same span may share a forward pass

    def __init__(self, model_dir: str, start: int, end: int, *, dtype: str = "float32", device: str = "cpu"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.full_config = load_config(model_dir)
        self.start, self.end = start, end
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]
        self.device = torch.device(device)
        self.config = span_config(self.full_config, start, end)
        self.hidden_size: int = self.config.hidden_size
        with torch.device("meta"):
            module = AutoModel.from_config(self.config, dtype=self.dtype)
        module.embed_tokens = None  # the client owns embeddings
        module.norm = nn.Identity()  # and the final norm
        state = loader.load_blocks(model_dir, start, end, self.dtype)
        missing = {k for k in module.state_dict() if k.startswith("layers.")} - set(state)
        if missing:
            raise wire.CheckpointError(f"{model_dir} lacks tensors {sorted(missing)[:5]} for blocks [{start}, {end})")
        module.load_state_dict(state, strict=False, assign=True)
        # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild them for real.
        module.rotary_emb = type(module.rotary_emb)(config=self.config).to(self.device)
        module.to(self.device)
        module.eval()
        self.module = module
        self.loaded_tensor_names: tuple[str, ...] = tuple(sorted(state))
        self.num_parameters = sum(p.numel() for p in module.parameters())
        meta_left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if meta_left:
            raise RuntimeError(f"tensors left unmaterialised after loading: {meta_left[:5]}")
        self._views: dict[tuple[int, int], nn.Module] = {(start, end): module}

    def _view(self, start: int, end: int) -> nn.Module:
        """A model over blocks [start, end) that shares this runner's layer modules (no copy of weights)."""
        if (start, end) not in self._views:
            if not self.start <= start < end <= self.end:
                raise ValueError(f"blocks [{start}, {end}) are not within this runner's [{self.start}, {self.end})")
            view = copy.copy(self.module)
            view._modules = dict(self.module._modules)
            view.layers = nn.ModuleList(self.module.layers[start - self.start:end - self.start])
            view.config = span_config(self.full_config, start, end)
            view.config._attn_implementation = self.config._attn_implementation
            self._views[(start, end)] = view
        return self._views[(start, end)]

    def new_cache(self, start: int | None = None, end: int | None = None) -> SpanCache:
        """A cache for a session over [start, end) (default: every block this runner holds)."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        return SpanCache(self._view(start, end).config, start, end, self.start)

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,  # (batch, seq, hidden)
        position_ids: torch.Tensor,  # (batch, seq) int64
        attention_mask: torch.Tensor | None,  # (batch, past + seq) 0/1, or None for no padding
        cache: SpanCache,
    ) -> torch.Tensor:
        """Run blocks [cache.start, cache.end) on new tokens, appending their keys/values to ``cache``."""
        out = self._view(cache.start, cache.end)(
            inputs_embeds=hidden.to(self.device, self.dtype),
            attention_mask=None if attention_mask is None else attention_mask.to(self.device),
            position_ids=position_ids.to(self.device),
            past_key_values=cache,
            use_cache=True,
        )
        return out.last_hidden_state  # (batch, seq, hidden)
