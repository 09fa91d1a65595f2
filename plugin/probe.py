"""Harm probe: standardise -> PCA(k) -> logistic head, folded into one affine map.

The artifact is a safetensors file (the fitted pieces, kept separate so calibration can
be inspected and re-fitted) plus a JSON file of metadata. At load time the pieces fold
into one weight vector and bias, so scoring a batch is a single matmul:

    logit = ((h - mean) / scale - pca_mean) @ components.T @ coef + intercept
          = h @ w + b,   w = components.T @ coef / scale,
                         b = intercept - (mean / scale + pca_mean) @ components.T @ coef

k = 0 means no PCA (the head reads all standardised features): the artifact then has no
pca_mean / components, and components is the identity above.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

TENSOR_NAMES = ("mean", "scale", "pca_mean", "components", "coef", "intercept")
PCA_NAMES = ("pca_mean", "components")  # absent when k == 0
FORMAT_VERSION = 2  # 2: several layers (concatenated) and a decision window; 1 still loads


class ProbeError(ValueError):
    """A probe artifact that cannot be used; the message says what and how to fix it."""


@dataclasses.dataclass(frozen=True)
class ProbeMeta:
    model_fingerprint: str
    layers: list[int]  # hidden_states indices as transformers counts them; -1 = final (post-norm)
    hidden_size: int  # the model's; the probe reads len(layers) * hidden_size features
    k: int  # PCA size; 0 = no PCA
    threshold: float
    metrics: dict
    provenance: dict
    # A position is judged harmful when it and the window-1 positions before it all score
    # at or over the threshold (benign false alarms are isolated spikes; harm persists).
    window: int = 1
    tensors_sha256: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def features(self) -> int:
        return self.hidden_size * len(self.layers)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fold(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float]:
    """Fold the fitted pieces into (w [H], b), computed in float64."""
    t = {name: tensors[name].to(torch.float64) for name in TENSOR_NAMES if name in tensors}
    if "components" in t:
        direction = t["components"].T @ t["coef"]  # [H]
        centre = t["mean"] / t["scale"] + t["pca_mean"]
    else:
        direction, centre = t["coef"], t["mean"] / t["scale"]
    w = direction / t["scale"]
    b = t["intercept"].reshape(()) - centre @ direction
    return w, float(b)


class HarmProbe:
    """Immutable, shared by every request: scores hidden states [N, H] -> P(harmful) [N]."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: ProbeMeta):
        self.tensors = tensors
        self.meta = meta
        w64, self.bias = fold(tensors)
        self.weight64 = w64
        self._weights: dict[tuple, torch.Tensor] = {}

    @property
    def threshold(self) -> float:
        return self.meta.threshold

    def weight(self, device, dtype) -> torch.Tensor:
        """Folded weight on (device, dtype), cached: no per-step host->device copy."""
        key = (str(device), dtype)
        if key not in self._weights:
            self._weights[key] = self.weight64.to(device=device, dtype=dtype)
        return self._weights[key]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, F] (the probe's layers concatenated), any float dtype -> logits [N]
        float32 (one matvec)."""
        if hidden.shape[-1] != self.meta.features:
            raise ProbeError(f"feature size {hidden.shape[-1]} != probe's {self.meta.features} "
                             f"({len(self.meta.layers)} layers x hidden size {self.meta.hidden_size})")
        # bf16 matvec would round the logit to ~2 significant digits; fp32 costs nothing here.
        w = self.weight(hidden.device, torch.float32)
        return hidden.to(torch.float32) @ w + self.bias

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(hidden))

    # ---- artifact I/O -------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write <base>.safetensors and <base>.json (see artifact_paths); returns the JSON path."""
        meta_path, tensor_path = artifact_paths(path)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().to(torch.float32) for k, v in self.tensors.items()},
                  str(tensor_path))
        meta = dataclasses.replace(self.meta, tensors_sha256=sha256_file(tensor_path))
        meta_path.write_text(json.dumps(dataclasses.asdict(meta), indent=2, sort_keys=True) + "\n")
        return meta_path

    @classmethod
    def load(cls, path: str | Path) -> "HarmProbe":
        meta_path, tensor_path = artifact_paths(path)
        hint = "re-run `python -m tokenwise_safety.calibrate` or pass --safety-probe PATH"
        for p in (meta_path, tensor_path):
            if not p.is_file():
                raise ProbeError(f"safety probe file not found: {p} ({hint})")
        try:
            raw = json.loads(meta_path.read_text())
            if raw.get("format_version") == 1:  # one layer, per-token decisions
                raw.update(layers=[raw.pop("layer")], window=1, format_version=FORMAT_VERSION)
            meta = ProbeMeta(**raw)
        except (json.JSONDecodeError, TypeError, AttributeError, KeyError) as e:
            raise ProbeError(f"safety probe metadata {meta_path} is corrupt: {e} ({hint})") from e
        if meta.format_version != FORMAT_VERSION:
            raise ProbeError(f"safety probe {meta_path} has format {meta.format_version}, "
                             f"this plugin reads {FORMAT_VERSION} ({hint})")
        _check_meta(meta, meta_path)
        actual = sha256_file(tensor_path)
        if actual != meta.tensors_sha256:
            raise ProbeError(f"safety probe tensors {tensor_path} are corrupt: sha256 {actual[:12]}... "
                             f"!= {meta.tensors_sha256[:12]}... recorded in {meta_path.name} ({hint})")
        try:
            tensors = load_file(str(tensor_path))
        except Exception as e:  # safetensors raises its own error types
            raise ProbeError(f"safety probe tensors {tensor_path} unreadable: {e} ({hint})") from e
        _check_shapes(tensors, meta, tensor_path)
        _check_values(tensors, tensor_path)
        return cls(tensors, meta)


ARTIFACT_SUFFIXES = (".json", ".safetensors")
MAX_WINDOW = 8  # as --safety-window allows


def artifact_paths(path: str | Path) -> tuple[Path, Path]:
    """(<base>.json, <base>.safetensors) of a probe named with either suffix or none.
    Only a trailing .json / .safetensors is stripped: 'llama-3.1-8b.json' must not become
    'llama-3.json', as Path.with_suffix would make it."""
    p = Path(path)
    base = p.name
    for suffix in ARTIFACT_SUFFIXES:
        if base.endswith(suffix) and len(base) > len(suffix):
            base = base[:-len(suffix)]
            break
    return p.with_name(base + ".json"), p.with_name(base + ".safetensors")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_meta(meta: ProbeMeta, where) -> None:
    """The artifact's own numbers, before anything uses them: each bad one is one line."""
    t = meta.threshold
    if not (isinstance(t, (int, float)) and not isinstance(t, bool) and _finite(t) and 0.0 < t < 1.0):
        raise ProbeError(f"safety probe {where}: threshold {_short(t)} must be a finite number "
                         "strictly between 0 and 1")
    if not (_is_int(meta.window) and 1 <= meta.window <= MAX_WINDOW):
        raise ProbeError(f"safety probe {where}: window {_short(meta.window)} must be an integer "
                         f"from 1 to {MAX_WINDOW}")
    if not (isinstance(meta.layers, list) and meta.layers and all(_is_int(i) for i in meta.layers)):
        raise ProbeError(f"safety probe {where}: layers {_short(meta.layers)} must be a non-empty "
                         "list of hidden_states indices")
    if not (_is_int(meta.hidden_size) and meta.hidden_size > 0 and _is_int(meta.k) and meta.k >= 0):
        raise ProbeError(f"safety probe {where}: hidden_size {_short(meta.hidden_size)} and "
                         f"k {_short(meta.k)} must be integers (hidden_size > 0, k >= 0)")


def _finite(x) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


def _check_shapes(tensors, meta: ProbeMeta, where) -> None:
    h, k = meta.features, meta.k
    names = [n for n in TENSOR_NAMES if k or n not in PCA_NAMES]
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ProbeError(f"safety probe {where} lacks tensors {missing}")
    expected = {"mean": (h,), "scale": (h,), "pca_mean": (h,), "components": (k, h),
                "coef": (k or h,), "intercept": (1,)}
    expected = {n: expected[n] for n in names}
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise ProbeError(f"safety probe {where}: tensor {name} has shape "
                             f"{tuple(tensors[name].shape)}, metadata implies {shape}")


def _check_values(tensors, where) -> None:
    """A NaN or inf anywhere, or a zero scale (a division), would score NaN or inf."""
    for name in TENSOR_NAMES:
        if name in tensors and not torch.isfinite(tensors[name]).all():
            raise ProbeError(f"safety probe {where}: tensor {name} holds NaN or inf values")
    zeros = int((tensors["scale"] == 0).sum())
    if zeros:
        raise ProbeError(f"safety probe {where}: tensor scale holds {zeros} zero(s), "
                         "which would divide by zero")


def model_fingerprint(config: dict) -> str:
    """Identity of a served model's architecture and vocabulary, from its config.json.

    It catches a probe used on a different model family or size (the hidden states would
    be meaningless); it cannot tell two fine-tunes of one base apart.
    """
    text_cfg = config.get("text_config", config)
    keys = ("architectures", "model_type", "hidden_size", "num_hidden_layers",
            "intermediate_size", "num_attention_heads", "vocab_size")
    ident = {k: config.get(k, text_cfg.get(k)) for k in keys}
    blob = json.dumps(ident, sort_keys=True).encode()
    return "cfg-sha256:" + hashlib.sha256(blob).hexdigest()[:16]
