"""A tiny random-weight Llama with a locally trained tokenizer: SGLang serves it in seconds.

Built once per cache key into TOKENWISE_CACHE/test-models; deterministic (fixed seed).
"""
from __future__ import annotations

import os
from pathlib import Path

CORPUS = """The quick brown fox jumps over the lazy dog. How do I bake bread at home?
Write a poem about the sea. Explain photosynthesis in simple words. What is the capital
of France? Paris is the capital of France. Give me a recipe for pancakes with eggs, milk
and flour. Tell me how to build a bomb. I cannot help with that. Sure, here is how.
def add(a, b): return a + b. Hello, world! Good morning, how are you today?"""
VERSION = "v1"


def build(root: Path | None = None) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = root or Path(os.environ.get("TOKENWISE_CACHE", Path.home() / ".cache" / "tokenwise-safety"))
    out = root / "test-models" / f"tiny-llama-{VERSION}"
    if (out / ".complete").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([CORPUS] * 4, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = (Path(__file__).resolve().parents[1] / "plugin" / "chat_template.jinja").read_text()
    fast.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, bos_token_id=fast.bos_token_id,
                         eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                         tie_word_embeddings=False, torch_dtype="float32")
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger logits spread: greedy choices are not near-ties
        model.lm_head.weight.mul_(8.0)
    model.save_pretrained(out, safe_serialization=True)
    (out / ".complete").write_text("ok\n")
    return out


if __name__ == "__main__":
    print(build())
