"""The generic block runner: the model's own base model, loaded by transformers, holding blocks [start, end).

Any decoder-only family whose transformers base model takes ``inputs_embeds, attention_mask,
position_ids, past_key_values`` runs through it (Llama, Mistral, Qwen2/3, Qwen3-MoE, Mixtral,
DeepSeek-V3, gpt-oss, Gemma 2/3, Phi-3, OLMo 2, Granite, Falcon, BLOOM, GPT-NeoX, …): masks, sliding
windows, ALiBi, rotary embeddings, MoE routing and cache layers all come from transformers' own code.
``layout.load_part`` builds the base model with only these blocks (each keeps its global
``layer_idx``, so structure that changes along the stack — dense-then-MoE, sliding/global, sinks — is
right for any range) and every other module but the rotary helpers (embeddings, final norm) as a
``layout.StandIn``.

At run time a module over blocks [a, b) is the base model with that sub-list of blocks and a config
whose per-layer lists are sliced to the span; the received hidden states go into its first block as
they are (a pre-hook replaces whatever the embedding stage did to them, e.g. Gemma's scaling), and
its cache is indexed from block a (layer 0 = block a), which keeps ``get_seq_length`` and mask sizes
right (see the notes' cache pitfalls).
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn
from transformers import AutoModel, DynamicCache, PretrainedConfig

import layout
import wire
from peer import prefixes
from peer.quant import (check_backend as quant_check, logical_numel, quantization_config, release_checkpoint_pages,
                        resident_bytes, warm_quantized_layers)
from layout import load_config, span_config  # noqa: F401  (re-exported: the peer's config readers)

logger = logging.getLogger(__name__)

DTYPES = wire.HIDDEN_DTYPE_NAMES  # what a peer computes in is what the wire carries


class SpanCache(DynamicCache):
    """A KV cache for blocks [start, end).

    Decoder layers address the cache by their global block index (``self_attn.layer_idx``); a session
    over [start, end) needs index 0 to be its own first block, because transformers reads layer 0 for
    the sequence length and mask sizes. ``update`` shifts the index accordingly.
    """

    def __init__(self, config: PretrainedConfig, start: int, end: int):
        super().__init__(config=config)
        self.start, self.end = start, end

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states, value_states, layer_idx - self.start, *args, **kwargs)


class BlockRunner:
    """Runs blocks [start, end) of one model; one per peer. Not thread-safe: one compute owner calls it."""

    supports_batching = True  # decode steps of sessions over the same span may share a forward pass

    def __init__(self, model_dir: str, start: int, end: int, *, dtype: str = "float32", device: str = "cpu",
                 quant: str = "none"):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        self.full_config = load_config(model_dir)
        span_config(self.full_config, start, end)  # validates the range
        self.start, self.end = start, end
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]
        self.device = torch.device(device)
        self.quant = quant
        bnb_config = quantization_config(quant, DTYPES[dtype])  # validates quant
        quant_check(quant, self.device)
        self.hidden_size: int = self.full_config.hidden_size
        self.model_type: str = self.full_config.model_type
        base_cls = AutoModel._model_mapping[type(self.full_config)]
        if bnb_config is None:
            module = layout.load_part(model_dir, base_cls, range(start, end), keep_outside=False, dtype=self.dtype)
            module.to(self.device)
        else:  # bitsandbytes modules are placed while loading (transformers refuses .to() on some of them)
            module = layout.load_part(model_dir, base_cls, range(start, end), keep_outside=False, dtype=self.dtype,
                                      quantization_config=bnb_config, device_map={"": str(self.device)})
            module.eval()
            warm_quantized_layers(module, self.dtype)  # before the trim: bitsandbytes' first-call repacking
            release_checkpoint_pages(module)
        module.eval()
        self.blocks_attr = module._swarm_blocks_path  # "layers", "h", …: a direct child of the base model
        if "." in self.blocks_attr:
            raise layout.CheckpointError(f"{base_cls.__name__} keeps its blocks at {self.blocks_attr}, not as a child")
        self.blocks: nn.ModuleList = getattr(module, self.blocks_attr)
        self._entry: torch.Tensor | None = None  # the hidden states the next forward's first block receives
        for block in self.blocks:
            block.register_forward_pre_hook(self._enter, with_kwargs=True)
        self.module = module
        self.loaded_tensor_names: tuple[str, ...] = module._swarm_tensor_names  # named as in the full model
        self.num_parameters = sum(logical_numel(p) for p in module.parameters())
        self.weight_bytes = resident_bytes(module)
        self.prefix_nonce = prefixes.new_nonce()  # kept prefixes match only sessions on these weights
        meta_left = [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
        if meta_left:
            raise RuntimeError(f"tensors left unmaterialised after loading: {meta_left[:5]}")
        self._views: dict[tuple[int, int], nn.Module] = {}

    def _enter(self, block: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of every block: the first block of a pass gets the received hidden states."""
        entry, self._entry = self._entry, None
        if entry is None:
            return None
        if args:
            return (entry, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": entry}

    def _view(self, start: int, end: int) -> nn.Module:
        """A base model over blocks [start, end) that shares this runner's blocks (no copy of weights)."""
        if (start, end) not in self._views:
            if not self.start <= start < end <= self.end:
                raise ValueError(f"blocks [{start}, {end}) are not within this runner's [{self.start}, {self.end})")
            view = copy.copy(self.module)
            view._modules = dict(self.module._modules)
            view._modules[self.blocks_attr] = nn.ModuleList(self.blocks[start - self.start:end - self.start])
            view.config = span_config(self.full_config, start, end)
            view.config._attn_implementation = self.module.config._attn_implementation
            self._views[(start, end)] = view
        return self._views[(start, end)]

    def new_cache(self, start: int | None = None, end: int | None = None) -> SpanCache:
        """A cache for a session over [start, end) (default: every block this runner holds)."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        return SpanCache(self._view(start, end).config, start, end)

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,  # (batch, seq, hidden)
        position_ids: torch.Tensor,  # (batch, seq) int64
        attention_mask: torch.Tensor | None,  # (batch, past + seq) 0/1, or None for no padding
        cache: SpanCache,
    ) -> torch.Tensor:
        """Run blocks [cache.start, cache.end) on new tokens, appending their keys/values to ``cache``."""
        return self.run_view(self._view(cache.start, cache.end), hidden, position_ids, attention_mask, cache)

    def backward(self, hidden: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                 grad_output: torch.Tensor, start: int | None = None, end: int | None = None) -> torch.Tensor:
        """The gradient of blocks [start, end)'s output with respect to their input ``hidden``, given the
        gradient of a loss with respect to that output (weights frozen; the forward is recomputed here
        and nothing is kept): (batch, seq, hidden) in ``grad_output``'s dtype."""
        view = self._view(self.start if start is None else start, self.end if end is None else end)
        with torch.enable_grad():
            x = hidden.to(self.device, self.dtype).detach().requires_grad_(True)
            self._entry = x
            try:
                out = view(inputs_embeds=x, attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                           position_ids=position_ids.to(self.device), use_cache=False).last_hidden_state
            finally:
                self._entry = None
            (grad,) = torch.autograd.grad(out, x, grad_output.to(self.device, out.dtype))
        return grad.to(grad_output.dtype)

    @torch.inference_mode()
    def run_view(self, view: nn.Module, hidden, position_ids, attention_mask, cache) -> torch.Tensor:
        """Run ``view`` (a ``_view`` of this runner) on new tokens with ``cache``: (batch, seq, hidden)."""
        hidden = hidden.to(self.device, self.dtype)
        self._entry = hidden
        try:
            out = view(
                inputs_embeds=hidden,
                attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                position_ids=position_ids.to(self.device),
                past_key_values=cache,
                use_cache=True,
            )
        finally:
            self._entry = None
        return out.last_hidden_state  # (batch, seq, hidden)
