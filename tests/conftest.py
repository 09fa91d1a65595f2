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

TINY_SERVER_FLAGS = ["--dtype", "float32", "--enable-metrics", "--disable-radix-cache"]


def random_probe(model_dir: Path, out: Path, k: int = 8, seed: int = 0, threshold: float = 0.5) -> Path:
    """A probe with random directions for `model_dir`: plumbing tests need exact maths, not meaning."""
    config = json.loads((model_dir / "config.json").read_text())
    hidden = config.get("text_config", config)["hidden_size"]
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "mean": torch.randn(hidden, generator=g) * 0.1,
        "scale": torch.rand(hidden, generator=g) + 0.5,
        "pca_mean": torch.randn(hidden, generator=g) * 0.1,
        "components": torch.linalg.qr(torch.randn(hidden, k, generator=g))[0].T.contiguous(),
        "coef": torch.randn(k, generator=g),
        "intercept": torch.tensor([0.1]),
    }
    meta = ProbeMeta(model_fingerprint(config), -1, hidden, k, threshold, {}, {"source": "random test probe"})
    return HarmProbe(tensors, meta).save(out)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return tiny_llama.build()


@pytest.fixture(scope="session")
def tiny_probe(tiny_model, tmp_path_factory) -> Path:
    return random_probe(tiny_model, tmp_path_factory.mktemp("probe") / "tiny.json")


@pytest.fixture(scope="session")
def tiny_server(tiny_model, tiny_probe, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "tiny_on.log"
    with Server(tiny_model, safety=["--safety-probe", str(tiny_probe)], extra=TINY_SERVER_FLAGS,
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
