"""Causal language models: loading a local transformers folder offline, and the tiny random-weight models
the project builds itself for the demo and the tests.

The tiny models are made of the real transformers classes (Llama, Mistral, Qwen2, GPT-2) and saved as
ordinary folders, so training, generation and the PEFT round trip go through exactly the code path of a
real checkpoint. Their tokenizer is a byte-level BPE generated here (the 256 byte symbols, a few merges,
special tokens and a small chat template), so no vocabulary is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lycotrain.errors import ModelError
from lycotrain.paths import BUILTIN_PREFIX, builtin_model_folder

TINY_ARCHS = ("llama", "mistral", "qwen2", "gpt2")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gpt2")

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
# Jinja chat template of the tiny tokenizer: one "<|role|>\n content </s>\n" block per message.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# A handful of merges of frequent English byte pairs ("Ġ" is the byte-level space); enough to make the
# tokenizer a real BPE (merges are applied, offsets are non-trivial) while keeping the vocabulary tiny.
_TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"),
                ("Ġ", "a"), ("r", "e"), ("Ġ", "s"), ("e", "s"), ("o", "r"), ("Ġ", "w"), ("i", "s")]

_TINY_GEOMETRY: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
# Weights ~N(0, 0.1) instead of the usual 0.02: after the final norm a random lm_head with std 0.02 cannot
# produce confident logits at hidden size 64, so no adapter could lower the loss much (the demo must learn).
_TINY_INIT_STD = 0.1


# ---- tokenizer ------------------------------------------------------------------------------------------
def build_byte_tokenizer():
    """A byte-level BPE fast tokenizer with the 256 byte symbols, a few merges and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for left, right in _TINY_MERGES:
        vocab.setdefault(left + right, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(_TINY_MERGES)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                        additional_special_tokens=list(ROLE_TOKENS), clean_up_tokenization_spaces=False)
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


# ---- tiny models ----------------------------------------------------------------------------------------
def _vocab_size(tokenizer) -> int:
    return ((len(tokenizer) + 63) // 64) * 64  # round up like real models do


def _tiny_config(arch: str, tokenizer):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    ids = dict(vocab_size=_vocab_size(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    g = _TINY_GEOMETRY
    if arch == "gpt2":
        return GPT2Config(n_embd=g["hidden_size"], n_layer=g["num_hidden_layers"], n_head=g["num_attention_heads"],
                          n_positions=g["max_position_embeddings"], resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, initializer_range=_TINY_INIT_STD, **ids)
    config_cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    extra = {"tie_word_embeddings": False}
    if arch == "mistral":
        extra["sliding_window"] = None
    return config_cls(**g, **ids, **extra, initializer_range=_TINY_INIT_STD)


def build_tiny_causal_lm(out_dir: str | Path, arch: str = "llama", seed: int = 0) -> Path:
    """Write a tiny random-weight ``arch`` causal LM with the byte tokenizer as a transformers folder.

    Deterministic: the same seed gives identical weights (the global RNG is left as it was).
    """
    from transformers import AutoModelForCausalLM

    if arch not in TINY_ARCHS:
        raise ModelError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    tokenizer = build_byte_tokenizer()
    config = _tiny_config(arch, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_llama(out_dir: str | Path, seed: int = 0) -> Path:
    """The demo model: a tiny Llama (hidden 64, 2 layers, 4 heads, 2 KV heads) with the byte tokenizer."""
    return build_tiny_causal_lm(out_dir, "llama", seed)


def builtin_model_path(name: str) -> Path:
    """Resolve ``builtin:tiny-llama`` (or tiny-mistral/qwen2/gpt2) to its folder, building it once.

    The build happens in a temporary folder next to the target and is renamed into place, so a crash or a
    concurrent build never leaves a half-written model that a later run would trust.
    """
    return builtin_model_folder(name, TINY_ARCHS, "config.json", lambda folder, arch: build_tiny_causal_lm(folder, arch=arch))


# ---- loading --------------------------------------------------------------------------------------------
def resolve_model_path(path: str | Path) -> Path:
    """A local model folder, or a ``builtin:`` name built on first use; never a Hub download."""
    text = str(path)
    if text.startswith(BUILTIN_PREFIX):
        return builtin_model_path(text)
    folder = Path(text).expanduser()
    if not (folder / "config.json").is_file():
        raise ModelError(f"model.path {text!r}: no config.json there; give a local transformers model folder "
                         f"(with config.json, weights and tokenizer) or builtin:tiny-llama")
    return folder


def read_model_config(path: str | Path) -> tuple[Path, Any]:
    """The folder of ``model.path`` and its transformers config (config.json only), of a supported type."""
    from transformers import AutoConfig

    folder = resolve_model_path(path)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelError(f"{folder}: model type {config.model_type!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    return folder, config


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load a local causal LM and its tokenizer (offline). The model is frozen and in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = read_model_config(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: cannot load the model or its tokenizer ({exc}); check that the folder holds "
                         "the weights (.safetensors) and tokenizer files") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    return model, tokenizer
