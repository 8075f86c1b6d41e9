"""Weight formats of a peer's blocks, its device, and how many blocks fit in its memory.

Quantization is transformers' bitsandbytes integration unchanged: a peer passes a ``BitsAndBytesConfig``
to ``from_pretrained`` (``layout.load_part``), so the blocks hold the same ``Linear8bitLt`` /
``Linear4bit`` modules, with the same weights, as a local ``AutoModelForCausalLM.from_pretrained(...,
quantization_config=quantization_config(quant, dtype))``; ``quantization_config`` is the one place both
sides build it. Only the blocks' linear layers are quantized (as transformers does: the embeddings and the
LM head, which stay on the client, keep full precision; fused MoE expert tensors are not ``nn.Linear``
and keep the compute dtype too).

Sizing is arithmetic on the model built on the meta device (no weights read): a block's bytes are its
linear weights at the quantized size (bitsandbytes' layout: NF4 = 4 bits plus one absmax byte per 64
weights and a float per 256 of those; int8 = 1 byte plus a float per output row) and every other
tensor at the compute dtype's size, plus its KV cache budget.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import re

import psutil
import torch
from torch import nn

QUANTS = ("none", "int8", "nf4")
NF4_BLOCKSIZE = 64  # bitsandbytes' 4-bit blocksize: one absmax per 64 weights
NF4_NESTED_BLOCKSIZE = 256  # with double quantization the absmaxes are themselves quantized by 256s
CPU_SHARE = 0.8  # default --max-memory: this share of the RAM available when the peer starts
GPU_SHARE = 0.9  # ... or of the free memory of its GPU
# Bytes a CPU peer's process grows by beyond what it holds when it sizes itself and its blocks' weights and
# KV caches, whatever it serves: the loading machinery (modeling code, the allocator heap a load leaves),
# hivemind's streams and message buffers, and a step's activations (a 512-token chunk against a long
# history). Measured by `python -m bench.memory --self-sized` (README, Performance), with a margin.
RUNTIME_OVERHEAD = 256 * 2**20
# KV caches grow by concatenation (transformers' DynamicLayer): each step reallocates a block's whole cache,
# and the freed generations stay in the allocator's arenas, so on the CPU a block's KV-cache budget is
# counted 1.5 times (measured: 4 NF4 blocks with 8192-token budgets, 2000-token prompts, peaked 213 MiB
# above their weights and budgets, on top of the runtime's baseline).
KV_SLACK = 1.5


class _Int8CastNotice(logging.Filter):
    """LLM.int8 multiplies in float16 whatever the compute dtype, and bitsandbytes logs so on every call."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_Int8CastNotice())
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


class QuantError(RuntimeError):
    """A weight format this machine cannot serve (no bitsandbytes, or no backend for the device)."""


def quantization_config(quant: str, dtype: torch.dtype):
    """The ``BitsAndBytesConfig`` for ``quant`` with compute dtype ``dtype`` (None for "none").

    NF4 uses double quantization (as Petals' NF4 does): 0.127 fewer bits per weight, same outputs rule."""
    if quant not in QUANTS:
        raise ValueError(f"quant must be one of {QUANTS}, got {quant!r}")
    if quant == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                              bnb_4bit_use_double_quant=True)


def _run_layer(quant: str, in_features: int, out_features: int, device: torch.device, dtype: torch.dtype) -> None:
    """Quantize a random ``in_features`` -> ``out_features`` linear layer in ``quant`` and run it once on
    ``device``, as a peer's first forward does (bitsandbytes repacks NF4 weights for its CPU kernel then)."""
    import bitsandbytes as bnb

    x = torch.randn(2, in_features, device=device, dtype=dtype)
    if quant == "nf4":
        layer = bnb.nn.Linear4bit(in_features, out_features, bias=False, quant_type="nf4", compute_dtype=dtype)
    else:
        layer = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False)
    layer = layer.to(device).eval()  # bitsandbytes repacks only in eval mode, as a peer runs
    with torch.inference_mode():
        layer(x)


def check_backend(quant: str, device: torch.device) -> None:
    """Raise QuantError naming the fix unless bitsandbytes can quantize and multiply on ``device``."""
    if quant == "none":
        return
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise QuantError(f"--quant {quant} needs bitsandbytes, which does not import here ({e}): "
                         "`pip install bitsandbytes` (or serve with --quant none)") from None
    try:
        _run_layer(quant, NF4_BLOCKSIZE, NF4_BLOCKSIZE, device, torch.float32)
    except Exception as e:  # bitsandbytes raises many types for "no kernel for this device"
        raise QuantError(f"--quant {quant}: bitsandbytes {getattr(bnb, '__version__', '?')} has no usable backend "
                         f"on {device} ({type(e).__name__}: {e}); serve with --quant none, or install a "
                         "bitsandbytes build for this device") from None


def quantized_layers(config, quant: str, dtype: torch.dtype) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every block layer that transformers' bitsandbytes integration
    quantizes in ``quant``: its own choice of modules, applied to the model built on the meta device."""
    from transformers import AutoModel
    from transformers.integrations import replace_with_bnb_linear
    from transformers.quantizers import AutoHfQuantizer

    import layout

    if quant == "none":
        return []
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    quantizer = AutoHfQuantizer.from_config(quantization_config(quant, dtype))
    skip = quantizer.get_modules_to_not_convert(model, quantizer.quantization_config.llm_int8_skip_modules,
                                                model._keep_in_fp32_modules)
    model = replace_with_bnb_linear(model, modules_to_not_convert=skip, quantization_config=quantizer.quantization_config,
                                    pre_quantized=False)
    path, blocks = layout.find_blocks(model)
    import bitsandbytes as bnb

    return [(f"{path}.{i}.{name}", m.in_features, m.out_features) for i, block in enumerate(blocks)
            for name, m in block.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))]


def _first_failure(config, quant: str, dtype: torch.dtype, device: torch.device) -> tuple[str, Exception] | None:
    """The first block layer bitsandbytes cannot run in ``quant`` on ``device`` (each shape tried once), or None."""
    tried: set[tuple[int, int]] = set()
    for name, in_features, out_features in quantized_layers(config, quant, dtype):
        if (in_features, out_features) in tried:
            continue
        tried.add((in_features, out_features))
        try:
            _run_layer(quant, in_features, out_features, device, dtype)
        except Exception as e:  # bitsandbytes' CPU packing raises RuntimeError, AssertionError, ...
            return f"{name} ({in_features} -> {out_features} features)", e
    return None


def check_layers(config, quant: str, dtype: torch.dtype, device: torch.device) -> None:
    """Raise QuantError, before a peer loads or announces anything, if bitsandbytes cannot run one of the
    model's block layers in ``quant`` on ``device`` (seen: NF4 on a CPU with AVX512-BF16 needs in_features a
    multiple of 64 and out_features a multiple of 32), naming the layer and the formats that work."""
    failure = _first_failure(config, quant, dtype, device)
    trim_heap()  # the test layers' full-size temporaries would otherwise count as this peer's baseline
    if failure is None:
        return
    layer, error = failure
    works = [q for q in reversed(QUANTS) if q != quant and (q == "none" or _first_failure(config, q, dtype, device) is None)]
    import bitsandbytes as bnb

    raise QuantError(f"--quant {quant}: bitsandbytes {bnb.__version__} cannot run this model's layer {layer} on "
                     f"{device} ({type(error).__name__}: {str(error).strip() or 'no message'}); formats that work for "
                     f"this model here: {', '.join(works)} (serve with --quant {works[0]})")


def warm_quantized_layers(module: nn.Module, dtype: torch.dtype) -> None:
    """Run every quantized layer of a loaded ``module`` once, on zeros, in the loading thread.

    bitsandbytes repacks an NF4 weight for its CPU kernel on the layer's first call, through full-size
    int32 temporaries (8x the packed bytes). Left to the first request, that happened in whichever
    thread served it, after ``release_checkpoint_pages`` had trimmed the heap, and the freed temporaries
    stayed resident (measured: 19.4 MiB per 8.27 MiB NF4 block after serving). Done here, the trim that
    follows returns them."""
    import bitsandbytes as bnb

    with torch.inference_mode():
        for name, layer in module.named_modules():
            if isinstance(layer, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                device = layer.weight.device
                try:
                    layer(torch.zeros(1, layer.in_features, dtype=dtype, device=device))
                except Exception as e:  # as in check_layers
                    raise QuantError(f"bitsandbytes cannot run layer {name} ({layer.in_features} -> "
                                     f"{layer.out_features} features) on {device} ({type(e).__name__}: {e}); "
                                     "serve this model in another --quant") from None


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda if torch sees a GPU, else mps, else cpu; anything else is checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}); use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: torch has no MPS backend here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {name!r}")
    return device


def parse_size(text: str) -> int:
    """'24GiB', '500MB', '1.5G', '123456' -> bytes (K/M/G/T alone are binary, as in free -h)."""
    match = _SIZE_RE.match(str(text))
    unit = (match.group(2) or "").upper() if match else None
    if not match or unit not in _UNITS:
        raise ValueError(f"a size like 8GiB, 500MB or 1073741824 was expected, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def human(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError


def default_max_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, how it was chosen): a safe share of what is free on ``device`` right now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(GPU_SHARE * free), f"{GPU_SHARE:.0%} of the {human(free)} free on {device}"
    if device.type == "mps":
        total = torch.mps.recommended_max_memory() - torch.mps.current_allocated_memory()
        return int(GPU_SHARE * total), f"{GPU_SHARE:.0%} of the {human(total)} MPS recommends"
    available = psutil.virtual_memory().available
    return int(CPU_SHARE * available), f"{CPU_SHARE:.0%} of the {human(available)} of RAM available"


def release_checkpoint_pages(module: nn.Module) -> None:
    """After loading quantized blocks: give back the memory the full-precision checkpoint still holds.

    The tensors that stay in full precision (norms, biases, fused experts) are views of the checkpoint's
    memory mapping, which keeps the whole mapping, and every page the quantizer read through it, resident
    (measured: +335 MiB of RssFile for 80 MiB of int8 blocks). Copying them (small) lets the mapping go;
    malloc_trim returns the quantizer's freed full-precision temporaries to the OS (glibc only)."""
    with torch.no_grad():
        for sub in module.modules():
            for name, param in list(sub.named_parameters(recurse=False)):
                if param.dtype.is_floating_point and getattr(param, "quant_state", None) is None:
                    param.data = param.data.clone()
            for name, buf in list(sub.named_buffers(recurse=False)):
                if buf is not None and buf.dtype.is_floating_point:
                    sub._buffers[name] = buf.clone()
    trim_heap()


def trim_heap(collect: bool = True) -> None:
    """Give the allocator's free memory back to the OS (glibc's malloc_trim, which covers every thread's
    arena): what a load, a check or a long step freed would otherwise stay resident. ``collect``: run the
    garbage collector first (tens of ms; the compute thread skips it)."""
    if collect:
        gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


try:
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # not glibc: the allocator keeps what it keeps
    _malloc_trim = None


def logical_numel(param: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight counts its unpacked shape."""
    state = getattr(param, "quant_state", None)
    if state is not None and getattr(state, "shape", None) is not None:
        return int(torch.Size(state.shape).numel())
    return param.numel()


def resident_bytes(module: nn.Module) -> int:
    """Bytes a loaded module's weights occupy: parameters, buffers, and bitsandbytes' quantization
    statistics (kept on the weight objects, not registered as tensors of the module)."""
    total, seen = 0, set()

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for t in list(module.parameters()) + list(module.buffers()):
        add(t)
        state = getattr(t, "quant_state", None)
        if state is not None:
            for value in state.as_dict(packed=False).values():
                add(value)
        add(getattr(t, "SCB", None))
    return total


def linear_bytes(layer: nn.Linear, quant: str, itemsize: int) -> int:
    """Resident bytes of one linear layer's weight and bias once loaded in ``quant``."""
    n = layer.weight.numel()
    bias = layer.bias.numel() * itemsize if layer.bias is not None else 0
    if quant == "nf4":
        absmax = -(-n // NF4_BLOCKSIZE)
        return n // 2 + absmax + 4 * -(-absmax // NF4_NESTED_BLOCKSIZE) + bias
    if quant == "int8":
        return n + 4 * layer.weight.shape[0] + bias
    return n * itemsize + bias


def block_bytes(block: nn.Module, quant: str, itemsize: int) -> int:
    """Resident bytes of one block's weights in ``quant`` (built on the meta device; nothing is read)."""
    total, counted = 0, set()
    for module in block.modules():
        if isinstance(module, nn.Linear):
            total += linear_bytes(module, quant, itemsize)
            counted.update(id(p) for p in module.parameters(recurse=False))
    for p in block.parameters():
        if id(p) not in counted:
            total += p.numel() * itemsize
    return total


def kv_bytes_per_token(config, itemsize: int) -> int:
    """KV-cache bytes one token costs in one block (keys and values; MLA-style caches included)."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    key_dim = getattr(config, "qk_nope_head_dim", 0) + getattr(config, "qk_rope_head_dim", 0) or head_dim
    value_dim = getattr(config, "v_head_dim", None) or head_dim
    return heads * (key_dim + value_dim) * itemsize


def process_rss() -> int:
    """Bytes this process holds in RAM now (its RSS)."""
    return psutil.Process().memory_info().rss


def checkpoint_itemsize(config) -> int:
    """Bytes per element of the checkpoint's stored weights (its config's dtype; float32 if it names none)."""
    name = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32"
    dtype = name if isinstance(name, torch.dtype) else getattr(torch, str(name).removeprefix("torch."), torch.float32)
    return torch.empty((), dtype=dtype).element_size()


@dataclasses.dataclass(frozen=True)
class Fit:
    """How many blocks fit, and the arithmetic behind it (for the log)."""

    num_blocks: int
    budget: int  # bytes the peer may use
    block_weights: int  # bytes of the largest block's weights in the chosen format
    block_cache: int  # bytes of one block's KV-cache budget
    block_loading: int  # bytes one block holds while it loads (a quantized block: its full-precision tensors too)
    fixed: int  # bytes that do not grow with blocks: what the process holds now, and the runtime's overhead
    explanation: str

    @property
    def per_block(self) -> int:
        """Bytes one block costs at its worst: serving with its KV cache full, or loading."""
        return max(self.block_weights + self.block_cache, self.block_loading)


def blocks_that_fit(config, quant: str, dtype: torch.dtype, cache_tokens: int, budget: int, budget_reason: str,
                    *, resident: int = 0, overhead: int = 0, kv_slack: float = KV_SLACK) -> Fit:
    """As many blocks as ``budget`` bytes hold, at most the model's; raises ValueError naming the fixes if
    not even one fits. What counts: ``resident`` bytes the process holds already and ``overhead`` bytes it
    grows by whatever it serves (see RUNTIME_OVERHEAD), then per block the larger of its weights in
    ``quant`` plus its KV cache for ``cache_tokens`` tokens times ``kv_slack``, and what it holds while loading (a quantized
    block's full-precision tensors stay mapped until the load ends)."""
    from transformers import AutoModel

    import layout

    itemsize = torch.empty((), dtype=dtype).element_size()
    with torch.device("meta"):
        model = AutoModel.from_config(config)
    _, blocks = layout.find_blocks(model)
    weights = max(block_bytes(b, quant, itemsize) for b in blocks)
    stored = max(sum(p.numel() for p in b.parameters()) for b in blocks) * checkpoint_itemsize(config)
    loading = weights + (stored if quant != "none" else 0)
    cache = int(kv_slack * cache_tokens * kv_bytes_per_token(config, itemsize))
    fixed = resident + overhead
    fit = Fit(0, budget, weights, cache, loading, fixed, "")
    per_block = fit.per_block
    room = max(0, budget - fixed)
    n = min(config.num_hidden_layers, room // per_block)
    text = (f"max memory {human(budget)} ({budget_reason}); fixed {human(fixed)} (this process now "
            f"{human(resident)} + runtime overhead {human(overhead)}); one block = {human(weights)} of weights "
            f"({quant}, {str(dtype).removeprefix('torch.')}) + {human(cache)} of KV cache ({cache_tokens} tokens"
            + (f", x {kv_slack} for reallocation" if kv_slack != 1 else "") + ")"
            + (f", {human(loading)} while loading" if loading > weights else "")
            + f" = {human(per_block)}; {room} // {per_block} = {room // per_block} blocks"
            + (f", capped at the model's {config.num_hidden_layers}" if n < room // per_block else ""))
    if n < 1:
        raise ValueError(
            f"--max-memory {human(budget)} is too small for one block of this model: {text}. Raise --max-memory, "
            f"serve a smaller format (--quant nf4), or lower --cache-tokens")
    return dataclasses.replace(fit, num_blocks=int(n), explanation=text)
