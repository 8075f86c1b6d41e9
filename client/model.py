"""AutoDistributedModelForCausalLM: the model's own transformers class, with its blocks in the swarm.

The client loads, through transformers' ``from_pretrained``, only the embeddings, final norm and LM
head (and generation config): the model's own class with an empty block stack. Its base model keeps
its own forward (the family's embedding stage and output class); a pre-hook on the final norm streams
the hidden states through the swarm's blocks first (``attach_swarm``). The causal-LM head and
``generate()`` are transformers' own, unchanged, so sampling, logits processors, streamers and
padding all behave as they do locally. The KV caches live on the peers; ``RemoteCache`` only tells
generate() how many tokens they already hold.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
from typing import Iterator

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig
from transformers.cache_utils import Cache
from transformers.generation.configuration_utils import GenerationMode

from client.errors import SwarmError, UnverifiableError
from client.config import ClientConfig
from client.front import RemoteSession, RemoteSwarm
from dht import records
import layout
from verify.auditor import NO_CHECKER
from verify.reputation import Verdict

logger = logging.getLogger(__name__)

MAX_DRAFT_OVERSHOOT = 64  # tokens a session is sized beyond max_length for speculative decoding
MAX_REDOS = 3  # with verify_mode="redo"/"strict": generations re-done after an audit caught a lying peer


class RemoteCache(Cache):
    """Stands in for the KV caches held by the peers of one session."""

    is_compileable = False

    def __init__(self, session: RemoteSession):
        super().__init__(layers=[])
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return self.session.max_length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: the peers' caches follow the chosen beams (carried by the next step)."""
        self.session.reorder(beam_idx.tolist())

    def crop(self, tokens_to_remove: int) -> None:
        """Roll back (transformers' speculative decoding drops rejected draft tokens): ``-k`` removes k
        tokens and 0 none, as transformers' caches do; a positive value is the older API's length to keep."""
        keep = self.session.position + tokens_to_remove if tokens_to_remove <= 0 else tokens_to_remove
        self.session.crop(keep)


class _SwarmCall(threading.local):
    """The step the calling thread's base-model forward is running (read by the final norm's pre-hook)."""

    def __init__(self):
        self.session: RemoteSession | None = None
        self.position_ids: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        self.active = False
        self.keep_last = 0  # positions the caller's head reads (logits_to_keep); 0 = all of them


def remote_base_class(base_cls: type) -> type:
    """The model's own base-model class, whose blocks run in the swarm.

    Its forward is the family's own (embedding scale, embedding norm, ALiBi or rotary set-up, the output
    class its head reads, e.g. MoE router logits) over an empty block stack; the final norm's pre-hook
    (see ``attach_swarm``) sends the hidden states through the swarm's blocks before the norm runs.
    The KV caches live on the peers, so the local forward runs without a cache or a mask of its own."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, **kwargs):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        session = past_key_values.session if isinstance(past_key_values, RemoteCache) else None
        if past_key_values is not None and session is None:
            raise TypeError(f"{type(past_key_values).__name__} cannot hold a swarm's cache: use model.inference_session()")
        batch, seq = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        past = session.position if session is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq).unsqueeze(0)
        position_ids = position_ids.expand(batch, -1).contiguous()  # (batch, seq)
        if attention_mask is not None and attention_mask.ndim != 2:
            raise ValueError(f"attention_mask must be 2D (batch, past + seq), got {tuple(attention_mask.shape)}")
        call = self._swarm_call
        if call.active:
            raise RuntimeError("a swarm forward is already running in this thread")
        call.session, call.position_ids, call.attention_mask, call.active = session, position_ids, attention_mask, True
        try:
            out = base_cls.forward(self, input_ids=input_ids, inputs_embeds=inputs_embeds,
                                   position_ids=position_ids.to(self.device), use_cache=False, **kwargs)
        finally:
            call.session = call.position_ids = call.attention_mask = None
            call.active = False
        out.past_key_values = past_key_values
        return out

    return type(base_cls.__name__, (base_cls,), {"forward": forward, "__module__": base_cls.__module__})


def _final_norm(base: nn.Module, blocks_name: str) -> str:
    """Name of the base model's final norm: the last module its forward calls that is not a position
    helper (found by running it once on one token; its block stack is empty). It may hold no weights
    (OLMo's non-parametric layer norm)."""
    calls: list[str] = []
    handles = [child.register_forward_hook(lambda *_, name=name: calls.append(name))
               for name, child in base.named_children() if name != blocks_name]
    try:
        with torch.no_grad():
            base(input_ids=torch.zeros(1, 1, dtype=torch.long, device=base.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    stages = [n for n in calls if not layout.is_position_helper(base.get_submodule(n))]
    if len(stages) < 2:
        raise layout.CheckpointError(f"{type(base).__name__}'s forward calls no final norm after its blocks "
                                   f"(modules called: {calls}): this family cannot be split")
    return stages[-1]


class _ThroughSwarm(torch.autograd.Function):
    """The swarm's blocks as one differentiable function of the hidden states: forward through peers that
    serve backward passes, backward sends the output gradient back along the same route (each peer
    recomputes its blocks and returns the input gradient; the weights on the peers stay frozen)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                swarm: RemoteSwarm) -> torch.Tensor:
        out, spans = swarm.forward_for_training(hidden.detach(), position_ids, mask)
        ctx.swarm, ctx.spans, ctx.position_ids, ctx.mask = swarm, spans, position_ids, mask
        ctx.dtype = hidden.dtype
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_in = ctx.swarm.backward(ctx.spans, grad.contiguous(), ctx.position_ids, ctx.mask)
        return grad_in.to(ctx.dtype), None, None, None


def attach_swarm(model: nn.Module, swarm: RemoteSwarm) -> None:
    """Make ``model``'s base model (loaded with no blocks) run its blocks through ``swarm``."""
    base = model.base_model
    blocks_name = model._swarm_blocks_path.split(".")[-1]
    norm = base.get_submodule(_final_norm(base, blocks_name))
    base.__class__ = remote_base_class(type(base))
    base._swarm_call = call = _SwarmCall()

    def through_swarm(_module, args):
        if not call.active:
            raise RuntimeError("the final norm ran outside the model's forward: the swarm was not asked")
        hidden = args[0]  # (batch, seq, hidden) after the family's embedding stage
        training = torch.is_grad_enabled() and hidden.requires_grad
        if call.session is not None:
            if training:
                raise RuntimeError("gradients cannot flow through an inference session (its KV caches live on "
                                   "the peers): call the model without past_key_values, or under torch.no_grad()")
            out = call.session.step(hidden.float(), call.position_ids, call.attention_mask, need_last=call.keep_last)
        elif training:  # loss.backward() will send the gradient back along the same route
            out = _ThroughSwarm.apply(hidden.float(), call.position_ids, call.attention_mask, swarm)
        else:
            out = swarm.forward(hidden.float(), call.position_ids, call.attention_mask)
        return (out.to(hidden.device, hidden.dtype), *args[1:])

    norm.register_forward_pre_hook(through_swarm)


class _ThreadState(threading.local):
    """What one thread's generate() / inference_session() is doing on a model (several threads may
    generate on one model at once, e.g. the OpenAI API's worker threads)."""

    def __init__(self):
        self.active_session: RemoteSession | None = None
        self.generate_sessions: list[RemoteSession] = []


_STATE_LOCK = threading.Lock()


class DistributedMixin:
    """Mixed in front of the model's own XForCausalLM class. generate() is safe to call from several
    threads at once: each call opens its own swarm sessions and keeps them in per-thread state."""

    swarm: RemoteSwarm

    @property
    def _thread_state(self) -> _ThreadState:
        state = self.__dict__.get("_swarm_thread_state")
        if state is None:
            with _STATE_LOCK:
                state = self.__dict__.setdefault("_swarm_thread_state", _ThreadState())
        return state

    @property
    def _active_session(self) -> RemoteSession | None:
        """The calling thread's inference_session(), if any."""
        return self._thread_state.active_session

    @property
    def _generate_sessions(self) -> list[RemoteSession]:
        """Sessions opened by the calling thread's running generate()."""
        return self._thread_state.generate_sessions

    @contextlib.contextmanager
    def inference_session(self, max_length: int, batch_size: int = 1) -> Iterator[RemoteSession]:
        """A session that generate() calls inside the block (in this thread) reuse: later calls continue the text."""
        state = self._thread_state
        if state.active_session is not None:
            raise RuntimeError("an inference session is already active on this model in this thread")
        if self.swarm.cfg.verify_mode == "strict":
            raise UnverifiableError("verify_mode='strict' checks whole generations before returning them, and an "
                                    "inference session's text cannot be generated again: use generate() alone")
        session = self.swarm.open_session(batch_size, max_length)
        state.active_session = session
        try:
            yield session
        finally:
            state.active_session = None
            session.close()

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        if model_kwargs.get("past_key_values") is not None or generation_config.use_cache is False:
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        # beam search runs num_beams rows per sequence; sampling num_return_sequences
        effective_batch = max(generation_config.num_beams, generation_config.num_return_sequences) * batch_size
        length = max_cache_length + 1
        if generation_mode == GenerationMode.ASSISTED_GENERATION:
            # the last check of a draft may run past max_length before its extra tokens are rolled back
            draft = generation_config.prompt_lookup_num_tokens or generation_config.num_assistant_tokens or 0
            length += 1 + min(int(draft), MAX_DRAFT_OVERSHOOT)
        session = self.swarm.open_session(effective_batch, length)
        self._generate_sessions.append(session)
        model_kwargs["past_key_values"] = RemoteCache(session)

    @torch.inference_mode()
    def generate(self, inputs: torch.Tensor | None = None, **kwargs):
        session = self._active_session
        if session is not None and kwargs.get("past_key_values") is None:
            inputs, kwargs = self._continue_session(session, inputs, kwargs)
            kwargs["past_key_values"] = RemoteCache(session)
            output = super().generate(inputs, **kwargs)
            sequences = output if isinstance(output, torch.Tensor) else output.sequences
            session.token_ids = sequences[:, : session.position]
            mask = kwargs.get("attention_mask")
            if mask is not None:
                grown = sequences.shape[1] - mask.shape[1]
                session.attention_mask = torch.cat([mask, mask.new_ones(mask.shape[0], grown)], dim=1)[:, : session.position]
            return output
        mode = self.swarm.cfg.verify_mode
        if mode == "background":
            return self._generate_once(inputs, kwargs)[0]
        streamer = kwargs.pop("streamer", None) if mode == "strict" else None  # fed once the text is checked
        rng_state = torch.get_rng_state()
        for attempt in range(MAX_REDOS + 1):
            output, sessions = self._generate_once(inputs, kwargs)
            results = [r for s in sessions for r in s.audit_results()]
            liars = sorted({r.peer_id for r in results if r.verdict in (Verdict.FAIL, Verdict.GROSS_FAIL)})
            unsettled = [r for r in results if r.verdict != Verdict.PASS] if mode == "strict" else []
            lone = [r for r in unsettled if r.verdict == Verdict.IMPOSSIBLE and r.reason == NO_CHECKER]
            if lone and not liars and not (attempt < MAX_REDOS and self.swarm.wait_for_checkers(
                    lone, self.swarm.cfg.checker_wait)):  # peers that could check may be restarting: wait, redo
                spans = ", ".join(f"[{r.start}, {r.end}) served by {r.peer_id}" for r in lone)
                raise UnverifiableError(f"strict verification: no other peer of the same format could re-run blocks "
                                        f"{spans} (none serves them, or none answered within checker_wait), so "
                                        f"that work cannot be checked and the text is withheld; add peers for "
                                        f"those blocks or use verify_mode='redo'")
            if not liars and not unsettled:
                if streamer is not None:
                    _replay_to_streamer(streamer, inputs if inputs is not None else kwargs.get("input_ids"), output)
                return output
            logger.warning("audits of this generation: %s; %s",
                           f"{liars} caught lying" if liars else [f"{r.peer_id}: {r.verdict.value} {r.reason}".strip()
                                                                  for r in unsettled],
                           f"generating again (redo {attempt + 1} of {MAX_REDOS})" if attempt < MAX_REDOS
                           else "no redo left")
            torch.set_rng_state(rng_state)  # a sampled generation draws the same numbers again
        if mode == "strict":
            raise UnverifiableError(f"strict verification: no attempt of {MAX_REDOS + 1} could be checked "
                                    f"(last: {[(r.peer_id, r.verdict.value) for r in unsettled]}); the text is withheld")
        raise SwarmError(f"every attempt was served by a peer that audits caught lying (last: {liars})")

    def _generate_once(self, inputs, kwargs):
        """One generate() through the swarm: (output, the sessions it opened, closed)."""
        state = self._thread_state
        state.generate_sessions = opened = []
        try:
            return super().generate(inputs, **kwargs), opened
        finally:
            state.generate_sessions = []
            for s in opened:
                s.close()

    @staticmethod
    def _continue_session(session: RemoteSession, inputs, kwargs):
        """Accept either the whole text so far or only the new tokens (as Petals users do)."""
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if session.token_ids is None or inputs is None:
            return inputs, kwargs
        seen = session.token_ids
        starts_with_seen = inputs.shape[1] >= seen.shape[1] and torch.equal(inputs[:, : seen.shape[1]], seen)
        if not starts_with_seen:
            inputs = torch.cat([seen, inputs], dim=1)
            if kwargs.get("attention_mask") is not None:
                old = session.attention_mask if session.attention_mask is not None else torch.ones_like(seen)
                kwargs["attention_mask"] = torch.cat([old, kwargs["attention_mask"]], dim=1)
        elif kwargs.get("attention_mask") is None and session.attention_mask is not None:
            grown = inputs.shape[1] - session.attention_mask.shape[1]
            kwargs["attention_mask"] = torch.cat(
                [session.attention_mask, session.attention_mask.new_ones(inputs.shape[0], grown)], dim=1)
        return inputs, kwargs


def _forward_noting_kept_logits(dist_cls: type, lm_cls: type):
    """The model's forward, which first notes how many last positions its head reads (``logits_to_keep``,
    which generate() sets to 1, or to a draft's length + 1): peers may then leave out the outputs of
    earlier positions they reused from a kept prefix. Same signature as the model's own forward, so
    generate() still sees that it takes ``logits_to_keep``."""

    def forward(self, *args, **kwargs):
        call = self.base_model._swarm_call
        keep = kwargs.get("logits_to_keep", 0)
        call.keep_last = keep if isinstance(keep, int) and not isinstance(keep, bool) and keep > 0 else 0
        try:
            return super(dist_cls, self).forward(*args, **kwargs)
        finally:
            call.keep_last = 0

    forward.__signature__ = inspect.signature(lm_cls.forward)
    forward.__doc__ = lm_cls.forward.__doc__
    return forward


def _replay_to_streamer(streamer, prompt: torch.Tensor | None, output) -> None:
    """Strict mode: the streamer gets the text only after the audits confirmed it, all at once."""
    sequences = output if isinstance(output, torch.Tensor) else output.sequences
    start = 0 if prompt is None else prompt.shape[1]
    if prompt is not None:
        streamer.put(prompt.cpu())
    streamer.put(sequences[:, start:].cpu())
    streamer.end()


class AutoDistributedModelForCausalLM:
    """Factory, like transformers' AutoModelForCausalLM, for models whose blocks run in the swarm."""

    @classmethod
    def from_pretrained(cls, model_dir: str, initial_peers: list[str] | tuple[str, ...], *,
                        model_id: str | None = None, dtype: torch.dtype = torch.float32, **client_options):
        """``model_dir``: a local checkpoint folder or a hub repo id ``org/name[@revision]``. ``client_options``
        are ``ClientConfig``'s fields, e.g. ``formats=["nf4"]`` to route through NF4 peers only (default:
        one format per session, the most precise that covers every block; formats are never mixed
        unless listed here)."""
        config: PretrainedConfig = AutoConfig.from_pretrained(layout.config_source(model_dir))
        text_config = config.get_text_config(decoder=True)
        lm_cls = AutoModelForCausalLM._model_mapping[type(config)]
        # Same name and module as the model's class: transformers looks weight conversions up by class name.
        dist_cls = type(lm_cls.__name__, (DistributedMixin, lm_cls), {"__module__": lm_cls.__module__})
        dist_cls.forward = _forward_noting_kept_logits(dist_cls, lm_cls)
        # The model's own class and constructors (computed buffers are real), loaded by transformers
        # with an empty block stack: embeddings, final norm and head only (for a hub repo id, only the
        # shards holding them are fetched).
        source = layout.part_source(model_dir, range(0), keep_outside=True)
        model = layout.load_part(source, dist_cls, range(0), keep_outside=True, dtype=dtype)
        swarm = RemoteSwarm(ClientConfig(
            initial_peers=tuple(initial_peers),
            model_id=model_id or records.derive_model_id(text_config.to_dict()),
            num_blocks=text_config.num_hidden_layers,
            hidden_size=text_config.hidden_size,
            **client_options,
        ))
        try:
            attach_swarm(model, swarm)
        except BaseException:
            swarm.shutdown()
            raise
        model.swarm = swarm
        model.eval()
        return model
