"""Seam: dense linear layers and the LM head on a CPU without AMX.

On a CPU with AMX, SGLang prepacks every linear weight once (_amx_process_weight_after_loading)
and multiplies with sgl_kernel.weight_packed_linear. Elsewhere it calls F.linear, and torch's
float32 GEMM over a handful of rows costs 2-4x one row on this project's AVX2 CPU (one
thread, Qwen 1.5B's MLP gate/up: 8.1 ms for 1 row, 32 ms for 4; its LM head: 63 and 254 ms;
python bench/packed_linear.py).
A handful of rows is what speculative verify (D tokens a request), the draft model's
extend and batched decode multiply, so speculation could not pay for itself there.

After a model's KV pool is allocated, this packs each float32 weight of an unquantized linear layer, and the
LM head, once with torch's own oneDNN reorder (the prepacking inductor's CPU freezing uses),
and multiplies two or more rows with the packed copy (4 rows: 16 ms and 108 ms). One row
keeps F.linear, whose GEMV is faster at one thread, and so do weights under
PACKED_MIN_ELEMENTS, where oneDNN's call overhead loses (a 64-wide layer: 0.03 ms against
0.008 ms). The price is a second copy of those
weights in memory, taken only from what is left once the KV pool is sized (so the pool is the
size it would be without packing) and only while SGLang's runtime reserve for activations,
pre-load memory x (1 - --mem-fraction-static), stays free; otherwise the server logs why and
serves with F.linear. A weight changed after loading (its storage or version differs) is not
served from a stale copy. Like cpu_verify_attention it is active without --safety-plugin,
so plugin-off and plugin-on servers compare alike; TOKENWISE_CPU_PACKED_LINEAR=0 turns it off.
"""
from __future__ import annotations

import logging
import os

import torch

ALLOC_MEMORY_POOL = "sglang.srt.model_executor.model_runner.ModelRunner.alloc_memory_pool"
LINEAR_APPLY = "sglang.srt.layers.quantization.unquant.UnquantizedLinearMethod.apply"
LM_HEAD = "sglang.srt.layers.logits_processor.LogitsProcessor._compute_lm_head"
ENV = "TOKENWISE_CPU_PACKED_LINEAR"
PACKED_ATTR = "_tokenwise_packed"
BATCH_HINT = 8  # oneDNN picks its blocked layout for about this many rows
PACKED_MIN_ELEMENTS = 1 << 18  # SmolLM2's 576x1536 MLP gains 1.6x at 4 rows; a 1000x64 layer loses 2x

logger = logging.getLogger(__name__)


def wanted(device: str) -> bool:
    """CPU serving without AMX (which SGLang packs itself), unless turned off."""
    if device != "cpu" or os.environ.get(ENV, "1") == "0" or not torch.backends.mkldnn.is_available():
        return False
    from sglang.srt.utils import cpu_has_amx_support
    return not cpu_has_amx_support()


def after_alloc_memory_pool(result, runner, *args, **kwargs):
    if getattr(runner, PACKED_ATTR, False) or not wanted(str(runner.device)):
        return result
    setattr(runner, PACKED_ATTR, True)
    layers = [m for m in linear_layers(runner.model) if packable(m)]
    if not layers:  # e.g. a bf16 model, or only small layers
        return result
    extra = sum(m.weight.numel() * m.weight.element_size() for m in layers) / 2**30
    free, reserve = free_and_reserve_gb(runner)
    if not room_to_pack(extra, free, reserve):
        logger.warning("tokenwise: linear weights not prepacked for oneDNN: they need %.2f GB, %.2f GB is free "
                       "after the KV pool and SGLang keeps %.2f GB of it for activations (lower "
                       "--max-total-tokens or raise --mem-fraction-static to make room); few-row matmuls stay "
                       "on F.linear", extra, free, reserve)
        return result
    for m in layers:
        pack(m)
    logger.info("tokenwise: %d float32 linear weights prepacked for oneDNN, %.2f GB more memory (%s=0 turns "
                "this off)", len(layers), extra, ENV)
    return result


def linear_layers(model) -> list:
    """SGLang's unquantized linear layers, and the LM head."""
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod
    layers = [m for m in model.modules() if isinstance(getattr(m, "quant_method", None), UnquantizedLinearMethod)]
    head = getattr(model, "lm_head", None)
    if head is not None and all(head is not m for m in layers):
        layers.append(head)
    return layers


def free_and_reserve_gb(runner) -> tuple[float, float]:
    """Memory free now, and the part SGLang's KV sizing left for activations (its own formula:
    pre-load memory x (1 - mem_fraction_static))."""
    from sglang.srt.runtime_context import get_schedule
    from sglang.srt.utils import get_available_gpu_memory
    free = get_available_gpu_memory(str(runner.device), runner.gpu_id, empty_cache=False)
    return free, runner.pre_model_load_memory * (1 - get_schedule().mem_fraction_static)


def room_to_pack(extra_gb: float, free_gb: float, reserve_gb: float) -> bool:
    return free_gb - extra_gb >= reserve_gb


def packable(module) -> bool:
    weight = getattr(module, "weight", None)
    return isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.dtype == torch.float32 \
        and weight.device.type == "cpu" and weight.numel() >= PACKED_MIN_ELEMENTS


def pack(module) -> bool:
    if not packable(module):
        return False
    weight = module.weight
    setattr(module, PACKED_ATTR, (blocked_copy(weight), weight.data_ptr(), weight._version))
    return True


def blocked_copy(weight: torch.Tensor) -> torch.Tensor:
    """The weight reordered into oneDNN's blocked layout, for `linear`."""
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), BATCH_HINT)


def packed_weight(module, x: torch.Tensor):
    """The packed copy when it serves x: two or more float32 rows on the CPU, weight unchanged."""
    entry = getattr(module, PACKED_ATTR, None)
    if entry is None or x.dim() != 2 or x.shape[0] < 2 or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    blocked, ptr, version = entry
    weight = module.weight
    return blocked if weight.data_ptr() == ptr and weight._version == version else None


def linear(x: torch.Tensor, blocked: torch.Tensor, bias) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), blocked, bias, "none", [], "")


def around_linear_apply(original, method, layer, x, bias=None, *args, **kwargs):
    blocked = packed_weight(layer, x)
    if blocked is None or args or kwargs:
        return original(method, layer, x, bias, *args, **kwargs)
    return linear(x, blocked, bias)


def around_compute_lm_head(original, processor, hidden_states, lm_head, embedding_bias=None, *args, **kwargs):
    blocked = packed_weight(lm_head, hidden_states)
    plain_head = not (hasattr(lm_head, "set_lora") or args or kwargs.get("out") is not None)
    if blocked is None or embedding_bias is not None or not plain_head:
        return original(processor, hidden_states, lm_head, embedding_bias, *args, **kwargs)
    return linear(hidden_states, blocked, None)
