"""Shared fixtures: a tiny random Llama (plumbing) and the bundled Gemma (end-to-end),
each served by the real SGLang server on 127.0.0.1, stopped by PID after the session."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tokenwise_safety.launch.server import Server  # noqa: E402
from tokenwise_safety.probe import HarmProbe, ProbeMeta, model_fingerprint  # noqa: E402

import tiny_llama  # noqa: E402

TINY_PROBE_LAYERS = (1, -1)
TINY_SERVER_FLAGS = ["--dtype", "float32", "--enable-metrics", "--disable-radix-cache"]


def random_probe(model_dir: Path, out: Path, k: int = 8, seed: int = 0, threshold: float = 0.5,
                 layers=(-1,), window: int = 1) -> Path:
    """A probe with random directions for `model_dir`: plumbing tests need exact maths, not meaning."""
    config = json.loads((model_dir / "config.json").read_text())
    width = config.get("text_config", config)["hidden_size"]
    hidden = width * len(layers)
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "mean": torch.randn(hidden, generator=g) * 0.1,
        "scale": torch.rand(hidden, generator=g) + 0.5,
        "coef": torch.randn(k or hidden, generator=g),
        "intercept": torch.tensor([0.1]),
    }
    if k:  # k == 0: no PCA, the head reads the standardised features
        tensors["pca_mean"] = torch.randn(hidden, generator=g) * 0.1
        tensors["components"] = torch.linalg.qr(torch.randn(hidden, k, generator=g))[0].T.contiguous()
    meta = ProbeMeta(model_fingerprint(config), list(layers), width, k, threshold, {},
                     {"source": "random test probe"}, window=window)
    return HarmProbe(tensors, meta).save(out)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return tiny_llama.build()


@pytest.fixture(scope="session")
def tiny_probe(tiny_model, tmp_path_factory) -> Path:
    # Reads the residual stream after layer 1 (tapped) and the final layer (SGLang's own).
    return random_probe(tiny_model, tmp_path_factory.mktemp("probe") / "tiny.json", layers=TINY_PROBE_LAYERS)


@pytest.fixture(scope="session")
def tiny_server(tiny_model, tiny_probe, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "tiny_on.log"
    with Server(tiny_model, safety=["--safety-probe", str(tiny_probe), "--safety-trace-detail", "full"],
                extra=TINY_SERVER_FLAGS,
                log_path=log) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_server_off(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "tiny_off.log"
    with Server(tiny_model, safety=None, extra=TINY_SERVER_FLAGS, log_path=log) as server:
        yield server


# SGLANG_PLUGINS is SGLang's whitelist of entry points to load: naming none of ours
# gives stock SGLang in the same venv.
STOCK_ENV = {"SGLANG_PLUGINS": "no-such-plugin"}


@pytest.fixture(scope="session")
def tiny_server_stock(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "tiny_stock.log"
    with Server(tiny_model, safety=None, extra=TINY_SERVER_FLAGS, log_path=log, env=STOCK_ENV) as server:
        yield server


@pytest.fixture(scope="session")
def bundled_model() -> Path:
    from tokenwise_safety.bundled import prepare
    return prepare()
