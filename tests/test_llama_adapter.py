"""Llama-Adapter: output equals the base model at init on every architecture (GQA included), the prompt path
equals an explicit re-computation, only the prompts and gates train, and removal restores the model."""

from __future__ import annotations

import math

import pytest
import torch
from text_helpers import load_model, token_batch

from lycotrain.adapters.llama_adapter import adaption_attention
from lycotrain.errors import AdapterError
from lycotrain.text.adapter_set import attach_llama_adapter

ARCHS = ["llama", "mistral", "qwen2", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_output_equals_base_at_init_and_gate_opens(arch):
    model = load_model(arch)
    ids = token_batch()
    with torch.no_grad():
        base = model(ids).logits
    adapters = attach_llama_adapter(model, adapter_len=4, adapter_layers=2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)
        for module in adapters.modules.values():
            module.adaption_gate.fill_(0.5)
        assert (model(ids).logits - base).abs().max() > 1e-3
    adapters.remove()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)


def test_grouped_query_attention_matches_repeat_interleave():
    q = torch.randn(2, 4, 5, 8)
    k, v = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 8)
    gate = torch.tensor([0.3])
    k_full, v_full = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
    expected = gate * torch.softmax(q @ k_full.transpose(-1, -2) / math.sqrt(8), dim=-1) @ v_full
    torch.testing.assert_close(adaption_attention(q, k, v, gate), expected, atol=1e-6, rtol=0)


def test_tiny_models_use_grouped_query_attention():
    config = load_model("llama").config
    assert config.num_key_value_heads < config.num_attention_heads


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_only_prompts_and_gates_get_gradients(arch):
    model = load_model(arch)
    adapters = attach_llama_adapter(model, adapter_len=4, adapter_layers=1)
    ids = token_batch()
    model(ids, labels=ids).loss.backward()
    trainable = {id(p) for p in adapters.trainable_parameters()}
    assert all(p.grad is None for p in model.parameters() if id(p) not in trainable)
    gate = next(iter(adapters.modules.values())).adaption_gate
    assert gate.grad is not None and gate.grad.abs().sum() > 0  # the zero gate learns from step 1
    assert adapters.counts()["trainable"] == 4 * model.config.hidden_size + 1


def test_too_many_layers_is_an_error():
    with pytest.raises(AdapterError, match="adapter_layers"):
        attach_llama_adapter(load_model(), adapter_len=4, adapter_layers=3)
