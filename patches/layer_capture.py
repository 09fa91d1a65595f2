"""Seam: the model's decoder layers. Captures the residual stream the probe reads.

SGLang keeps only the final (post-norm) hidden state, and its per-layer capture
(`layers_to_capture`, for EAGLE3) differs between models (Gemma 3 records the block
output without the residual). What every model shares: the residual stream entering
layer i, which transformers calls hidden_states[i], is the sum SGLang's fused add-norm
returns from layer i's input_layernorm(hidden, residual) -> (normed, hidden + residual).
A forward hook on that norm copies the sum into a buffer the worker reads after the
forward; the copy is taken at once because later fused norms update the residual in
place. The copy is a tensor op, so a CUDA graph captured with the hook replays it into
the same buffer.
"""
from __future__ import annotations

import torch

# Rows preallocated per tap: covers every CUDA-graph batch size (no allocation is
# allowed while a graph is captured); eager prefills grow the buffer when larger.
MIN_ROWS = 1024


class LayerTap:
    """The residual stream entering one decoder layer, for every token of the last forward."""

    def __init__(self, input_norm: torch.nn.Module, rows: int = MIN_ROWS):
        self.buf: torch.Tensor | None = None
        self.rows = rows
        self.handle = input_norm.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
            raise RuntimeError(f"{type(module).__name__} returned no residual sum: this model's "
                               "layers cannot be tapped (calibrate with --layer-sets=-1)")
        stream = output[1]
        n = stream.shape[0]
        if self.buf is None or self.buf.shape[0] < n or self.buf.dtype != stream.dtype \
                or self.buf.device != stream.device:
            self.buf = torch.empty(max(n, self.rows), stream.shape[-1], dtype=stream.dtype,
                                   device=stream.device)
        self.buf[:n].copy_(stream)
        return None

    def rows_of(self, n: int) -> torch.Tensor:
        """The first n rows written by the last forward (n = its token count)."""
        if self.buf is None:
            raise RuntimeError("layer tap read before any forward pass")
        return self.buf[:n]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layer list of an SGLang causal LM (text or multimodal wrapper)."""
    for path in ("model.layers", "language_model.model.layers", "model.language_model.layers", "layers"):
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return obj
    raise RuntimeError(f"cannot find the decoder layers of {type(model).__name__}: the probe's "
                       "non-final layers cannot be captured (calibrate with --layer-sets=-1)")


def install(model: torch.nn.Module, layers: list[int]) -> dict[int, LayerTap]:
    """Taps for each non-final hidden_states index in `layers` (-1 or len(layers) =
    final, read from SGLang's own capture)."""
    blocks = decoder_layers(model)
    taps = {}
    for index in layers:
        if index in (-1, len(blocks)):
            continue
        if not 1 <= index < len(blocks):
            raise RuntimeError(f"probe layer {index} is outside 1..{len(blocks)} "
                               f"(hidden_states indices of a {len(blocks)}-layer model; -1 = final)")
        norm = getattr(blocks[index], "input_layernorm", None)
        if norm is None:
            raise RuntimeError(f"decoder layer {index} of this model has no input_layernorm to tap "
                               "(calibrate with --layer-sets=-1)")
        taps[index] = LayerTap(norm)
    return taps


LOAD_MODEL = "sglang.srt.model_executor.model_runner.ModelRunner.load_model"
TAPS_ATTR = "_tokenwise_taps"


def after_load_model(result, runner, *args, **kwargs):
    """Install the taps right after the weights load, before any CUDA graph is captured."""
    from .server_args import ATTR  # noqa: PLC0415 (patches import each other lazily)
    config = getattr(runner.server_args, ATTR, None)
    if config is None or hasattr(runner, TAPS_ATTR):
        return result
    if getattr(runner, "is_draft_worker", False):
        # A draft model's tokens are scored by the target at verify; its own probe, when
        # given, ranks its drafts (patches/harmless_draft.py).
        if config.get("draft") is not None:
            _check_and_tap(runner, config["scorer"], config["draft"], runner.server_args.speculative_draft_model_path)
        _install_speculative_hooks(config)
        return result
    _check_and_tap(runner, config["scorer"], config, runner.server_args.model_path)
    if getattr(runner.server_args, "speculative_algorithm", None):
        _install_speculative_hooks(config)
    if runner.server_args.enable_metrics and getattr(runner, "tp_rank", 0) == 0:
        from tokenwise_safety.info import describe
        from tokenwise_safety.metrics import publish_info
        publish_info(describe(config))
    return result


def _install_speculative_hooks(config) -> None:
    """The hooks on SGLang's speculative workers (imported only where one runs): forced
    pivots as drafts, and harmless-first drafting when a draft probe is given. One call
    registers them all: HookRegistry patches a target once, with the hooks it holds then."""
    from sglang.srt.plugins.hook_registry import HookRegistry

    from . import harmless_draft, pivot_drafts, register_hooks
    register_hooks((pivot_drafts.HOOKS if pivot_drafts.ENABLED else ()) +
                   (harmless_draft.HOOKS if config.get("draft") is not None else ()))
    HookRegistry.apply_hooks()


def _check_and_tap(runner, scorer: str, probe: dict, model_name) -> None:
    """The probe fits the loaded model (a hub id was not checked at launch; a folder again,
    cheaply), then the taps for its layers."""
    from tokenwise_safety.probe import HarmProbe
    from .server_args import check_probe_fits
    if scorer == "probe":
        check_probe_fits(HarmProbe.load(probe["probe_path"]), probe["probe_path"],
                         runner.model_config.hf_config.to_dict(), model_name)
    setattr(runner, TAPS_ATTR, install(runner.model, probe["layers"]))


def taps_of(runner) -> dict[int, LayerTap]:
    return getattr(runner, TAPS_ATTR, {})
