"""Our PEFT folders load in peft 0.21.2 with no key warnings, every saved key is used, and PEFT's logits equal
ours to 1e-5; lycotrain reloads them to identical logits; the merged export equals the adapted model."""

from __future__ import annotations

import json

import pytest
import torch
from text_helpers import load_model, peft_load, token_batch

from lycotrain.errors import FormatError
from lycotrain.formats import peft as peft_format
from lycotrain.text.adapter_set import attach_adalora, attach_llama_adapter, attach_lora, load_adapter

TOL = 1e-5


def _targets(arch: str) -> list[str]:
    return ["c_attn"] if arch == "gpt2" else ["q_proj", "v_proj"]


def _trained_lora(arch: str):
    model = load_model(arch)
    adapters = attach_lora(model, target_modules=_targets(arch), rank=4, alpha=8)
    for module in adapters.modules.values():  # a non-zero delta, so the comparison means something
        torch.nn.init.normal_(module.lora_up.weight, std=0.1)
    return model, adapters


def _trained_adalora(arch: str = "llama"):
    """AdaLoRA after 10 steps with the allocator: E values trained and some ranks pruned."""
    model = load_model(arch)
    adapters = attach_adalora(model, target_modules=_targets(arch), init_r=6, target_r=2, alpha=8, total_step=10,
                              tinit=1, tfinal=2)
    optimizer = torch.optim.AdamW(adapters.trainable_parameters(), lr=1e-2)
    ids = token_batch()
    for step in range(10):
        loss = model(ids, labels=ids).loss + adapters.extra_loss()
        loss.backward()
        optimizer.step()
        adapters.after_optimizer_step(step)
        optimizer.zero_grad()
    return model, adapters


def _trained_llama_adapter(arch: str):
    model = load_model(arch)
    adapters = attach_llama_adapter(model, adapter_len=4, adapter_layers=2)
    for module in adapters.modules.values():
        torch.nn.init.constant_(module.adaption_gate, 0.7)
    return model, adapters


def _assert_peft_matches(arch, model, adapters, folder):
    adapters.train(False)
    ids = token_batch()
    with torch.no_grad():
        ours = model(ids).logits
        base = load_model(arch)(ids).logits
    assert (ours - base).abs().max() > 1e-3, "the adapter must change the output for the test to mean anything"
    adapters.save(folder)
    peft_model, warnings = peft_load(load_model(arch), folder)
    assert warnings == []
    from peft import get_peft_model_state_dict

    saved = set(peft_format.read_peft_folder(folder)[1])
    assert saved == set(get_peft_model_state_dict(peft_model)), "every saved key is one PEFT uses"
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=TOL, rtol=0)
    reloaded_model = load_model(arch)
    load_adapter(reloaded_model, folder).train(False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded_model(ids).logits, ours, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_lora_folder_loads_in_peft(tmp_path, arch):
    model, adapters = _trained_lora(arch)
    _assert_peft_matches(arch, model, adapters, tmp_path / "lora")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["fan_in_fan_out"] == (arch == "gpt2")


def test_adalora_folder_with_rank_pattern_loads_in_peft(tmp_path):
    model, adapters = _trained_adalora()
    pattern = adapters.rank_pattern()
    assert pattern is not None and sum(map(sum, pattern.values())) == 2 * len(pattern)  # target_r * modules
    _assert_peft_matches("llama", model, adapters, tmp_path / "adalora")
    config = json.loads((tmp_path / "adalora" / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {f"{p}.lora_E": v for p, v in pattern.items()}
    _, tensors = peft_format.read_peft_folder(tmp_path / "adalora")
    for path, kept in pattern.items():  # physically pruned, like PEFT's own save
        assert tensors[peft_format.peft_key(path, "lora_E")].shape == (sum(kept), 1)


@pytest.mark.parametrize("arch", ["llama", "mistral", "gpt2"])
def test_llama_adapter_folder_loads_in_peft(tmp_path, arch):
    model, adapters = _trained_llama_adapter(arch)
    _assert_peft_matches(arch, model, adapters, tmp_path / "adapter")


@pytest.mark.parametrize("method", ["lora", "adalora"])
def test_merged_export_equals_adapted_model(tmp_path, method):
    from transformers import AutoModelForCausalLM

    model, adapters = _trained_lora("llama") if method == "lora" else _trained_adalora()
    adapters.train(False)
    ids = token_batch()
    with torch.no_grad():
        ours = model(ids).logits
    adapters.export_merged(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, ours, atol=TOL, rtol=0)
        torch.testing.assert_close(model(ids).logits, ours, atol=TOL, rtol=0)  # unmerged again afterwards


def test_wrong_base_model_is_a_format_error(tmp_path):
    _, adapters = _trained_lora("llama")
    adapters.save(tmp_path / "lora")
    with pytest.raises(FormatError, match="base model"):
        load_adapter(load_model("gpt2"), tmp_path / "lora")


def test_missing_folder_is_a_format_error(tmp_path):
    with pytest.raises(FormatError, match="adapter_config.json"):
        peft_format.read_peft_folder(tmp_path)
