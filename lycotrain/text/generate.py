"""Greedy generation for previews and ``lycotrain generate``: deterministic, no sampling, no global RNG.

Prompts are framed exactly as training frames them (``dataset.format_prompt``: the chat template's user turn,
or the Alpaca prompt). Plain models decode with a KV cache; the X-LoRA wrapper recomputes the sequence each
token (its two passes have no shared cache), like PEFT's X-LoRA.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from lycotrain.adapters.xlora import XLoRAModel
from lycotrain.text.dataset import format_prompt, has_chat_template


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5 calls the KV cache ``cache``; 4.x ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def encode_prompt(tokenizer: Any, prompt: str, device: torch.device | str = "cpu") -> torch.Tensor:
    text = format_prompt(tokenizer, prompt)
    ids = tokenizer(text, add_special_tokens=not has_chat_template(tokenizer), return_tensors="pt")["input_ids"]
    return ids.to(device)


@torch.no_grad()
def greedy_ids(runner: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, eos_id: int | None) -> list[int]:
    """New token ids (EOS excluded) after ``input_ids`` (1, T), greedy, at most ``max_new_tokens``."""
    new: list[int] = []
    use_cache = not isinstance(runner, XLoRAModel)
    cache_key = _cache_keyword(runner) if use_cache else ""
    cache = None
    sequence = input_ids
    step_input = input_ids
    for _ in range(max_new_tokens):
        if use_cache:
            out = runner(input_ids=step_input, use_cache=True, **({cache_key: cache} if cache is not None else {}))
            cache = getattr(out, cache_key, None)
        else:
            out = runner(input_ids=sequence)
        token = int(out.logits[0, -1].argmax())
        if eos_id is not None and token == eos_id:
            break
        new.append(token)
        step_input = torch.tensor([[token]], device=input_ids.device)
        sequence = torch.cat([sequence, step_input], dim=1)
        if use_cache and cache is None:  # a model that returned no cache: fall back to the full sequence
            step_input = sequence
    return new


def generate_text(runner: nn.Module, tokenizer: Any, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of ``prompt`` (framed as in training), decoded without special tokens."""
    # every module's own mode comes back, not the runner's: a frozen base in eval mode inside a wrapper in train
    # mode (X-LoRA) must not leave a preview with its dropout switched on
    modes = [(module, module.training) for module in runner.modules()]
    runner.eval()
    try:
        device = next(runner.parameters()).device
        ids = greedy_ids(runner, encode_prompt(tokenizer, prompt, device), max_new_tokens, tokenizer.eos_token_id)
    finally:
        for module, mode in modes:
            module.training = mode
    return tokenizer.decode(ids, skip_special_tokens=True)
