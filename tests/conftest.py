"""Shared fixtures: tiny random decoders of every supported family, built in code, and a byte tokenizer."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU in CI

import pytest
import torch

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text")


def pytest_collection_modifyitems(config, items):
    """With TRITON_INTERPRET=0 (native kernels, e.g. on a GPU machine) the tests that run Triton
    kernels on CPU tensors cannot run: skip them, saying where the native checks are."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    skip = pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 (the suite's "
                                   "default); the native GPU checks are tests/test_engine_gpu.py and the "
                                   "benchmarks' correctness gates")
    for item in items:
        if item.get_closest_marker("interpreter"):
            item.add_marker(skip)


class ByteTokenizer:
    """Bytes as tokens (vocab 256): enough to calibrate and evaluate tiny random models."""

    vocab_size = 256
    eos_token_id = 0
    pad_token_id = 0

    def __call__(self, text, return_tensors=None, add_special_tokens=False):
        ids = torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


def tiny_config(family: str, **over):
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                  tie_word_embeddings=False)
    common.update(over)
    cls = {
        "llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config,
        "qwen3": tf.Qwen3Config, "gemma2": tf.Gemma2Config, "gemma3_text": tf.Gemma3TextConfig,
    }[family]
    if family.startswith("gemma"):
        common.update(query_pre_attn_scalar=16, sliding_window=64)
    return cls(**common)


def tiny_model(family: str = "llama", seed: int = 0, **over):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family, **over)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # HF init is tiny (std 0.02): widen it so activations are not all alike
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model


SAMPLE_TEXT = (
    "Anarchism is a political philosophy that advocates self-governed societies based on voluntary "
    "institutions. These are often described as stateless societies, although several authors have "
    "defined them more specifically as institutions based on non-hierarchical free associations. "
) * 12


@pytest.fixture
def tok():
    return ByteTokenizer()


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def hf_byte_tokenizer():
    """A real Hugging Face fast tokenizer (byte-level, 256 tokens + eos) that save_pretrained can write."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<eos>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture
def model_dir(tmp_path):
    """A tiny random Llama saved as a Hugging Face folder with its tokenizer (vocab 257)."""
    model = tiny_model("llama", vocab_size=257)
    path = tmp_path / "tiny-llama"
    model.save_pretrained(path)
    hf_byte_tokenizer().save_pretrained(path)
    return path
