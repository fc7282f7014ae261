"""Shared helpers of the text-model tests: tiny causal LMs built once per test session."""

from __future__ import annotations

import functools
import tempfile
import warnings
from pathlib import Path

import torch

from lycotrain.text.models import build_tiny_causal_lm

_ROOT = Path(tempfile.mkdtemp(prefix="lycotrain-text-tests-"))


@functools.lru_cache(maxsize=None)
def tiny_model_dir(arch: str = "llama") -> Path:
    """A tiny random-weight ``arch`` model folder (built once per session)."""
    return build_tiny_causal_lm(_ROOT / arch, arch, seed=0)


def load_model(arch: str = "llama"):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch))
    model.eval()
    return model


def token_batch(batch: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (batch, length), generator=generator)


def peft_load(model, folder):
    """PeftModel.from_pretrained, returning the model and the warnings it raised about keys."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, str(folder))
    key_warnings = [str(w.message) for w in caught if "key" in str(w.message).lower()
                    and "rank_pattern keys did not match" not in str(w.message)]
    peft_model.eval()
    return peft_model, key_warnings
