"""Where dropout acts. Text LoRA and AdaLoRA drop the layer input like PEFT's ``lora_dropout`` (so a saved
adapter_config.json means what our training did): with the same seed, in train mode, PEFT gives the same output.
Image LoRA keeps kohya's neuron dropout on the rank activations after ``lora_down``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from text_helpers import load_model, token_batch
from torch import nn

from lycotrain.adapters.adalora import AdaLoRAAdapter
from lycotrain.adapters.lora import LoRAAdapter
from lycotrain.errors import AdapterError, FormatError
from lycotrain.text.adapter_set import attach_lora, load_adapter

P = 0.3


def _seeded(fn, seed: int = 7) -> torch.Tensor:
    torch.manual_seed(seed)
    return fn()


def test_text_lora_in_train_mode_equals_peft_loading_the_saved_folder(tmp_path):
    from peft import PeftModel

    model = load_model()
    adapters = attach_lora(model, target_modules=["q_proj", "v_proj"], rank=4, alpha=8, dropout=P)
    for module in adapters.modules.values():
        nn.init.normal_(module.lora_up.weight, std=0.1)
    folder = adapters.save(tmp_path / "lora")
    assert json.loads((folder / "adapter_config.json").read_text())["lora_dropout"] == P
    theirs = PeftModel.from_pretrained(load_model(), str(folder), is_trainable=True)
    theirs.train()  # the tiny llama has no dropout of its own: only lora_dropout draws random numbers
    adapters.train(True)
    ids = token_batch()
    with torch.no_grad():
        ours_out = _seeded(lambda: model(ids).logits)
        theirs_out = _seeded(lambda: theirs(input_ids=ids).logits)
        adapters.train(False)
        no_dropout = model(ids).logits
    torch.testing.assert_close(ours_out, theirs_out, atol=1e-5, rtol=0)
    assert not torch.allclose(ours_out, no_dropout, atol=1e-3)  # the dropout really acted


def test_loaded_folder_keeps_its_lora_dropout(tmp_path):
    folder = attach_lora(load_model(), rank=4, alpha=8, dropout=P).save(tmp_path / "lora")
    reloaded = load_adapter(load_model(), folder)
    assert reloaded.settings["dropout"] == P
    assert all((m.dropout, m.dropout_on) == (P, "input") for m in reloaded.modules.values())
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 1.5}))
    with pytest.raises(FormatError, match="lora_dropout"):
        load_adapter(load_model(), folder)


def test_adalora_drops_the_input_like_peft():
    from peft import AdaLoraConfig
    from peft.tuners.adalora.layer import SVDLinear

    base = nn.Linear(16, 24)
    ours = AdaLoRAAdapter(base, rank=6, alpha=8, dropout=P).train()
    nn.init.normal_(ours.lora_E)
    theirs = SVDLinear(nn.Linear(16, 24), "default", r=6, lora_alpha=8, lora_dropout=P,
                       config=AdaLoraConfig(total_step=10, init_r=6, lora_dropout=P)).train()
    theirs.base_layer.load_state_dict(base.state_dict())
    for name in ("lora_A", "lora_E", "lora_B"):
        getattr(theirs, name)["default"].data.copy_(getattr(ours, name))
    x = torch.randn(3, 16)
    with torch.no_grad():
        torch.testing.assert_close(_seeded(lambda: ours(x)), _seeded(lambda: theirs(x)), atol=1e-6, rtol=0)


def _image_lora(layer: nn.Module, dropout_on: str = "down") -> LoRAAdapter:
    adapter = LoRAAdapter(layer, rank=4, alpha=2, dropout=P, dropout_on=dropout_on).train()
    nn.init.normal_(adapter.lora_up.weight)
    return adapter


@pytest.mark.parametrize("layer", [nn.Linear(12, 10), nn.Conv2d(6, 8, 3, padding=1)])
def test_image_lora_keeps_kohya_neuron_dropout(layer):
    x = torch.randn(2, 12) if isinstance(layer, nn.Linear) else torch.randn(2, 6, 5, 5)
    adapter = _image_lora(layer)

    def kohya() -> torch.Tensor:  # kohya's LoRAModule: lora_up(dropout(lora_down(x))) * multiplier * scale
        lx = adapter.lora_down(x)
        lx = adapter.lora_mid(lx) if adapter.lora_mid is not None else lx
        return layer(x) + adapter.lora_up(F.dropout(lx, p=P)) * adapter.scale

    with torch.no_grad():
        torch.testing.assert_close(_seeded(lambda: adapter(x)), _seeded(kohya), atol=1e-6, rtol=0)
        input_dropped = _image_lora(layer, "input")
        input_dropped.load_state_dict(adapter.state_dict())
        assert not torch.allclose(_seeded(lambda: adapter(x)), _seeded(lambda: input_dropped(x)), atol=1e-3)


def test_dropout_place_is_checked():
    with pytest.raises(AdapterError, match="dropout_on"):
        LoRAAdapter(nn.Linear(4, 4), rank=2, dropout_on="output")
