"""Injection: kohya names and shapes on real-size models (meta device), wrap/unwrap, state, presets, errors."""

from __future__ import annotations

import json
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest
import torch
from torch import nn

from lycotrain.adapters import METHOD_NAMES
from lycotrain.errors import AdapterError, ConfigError, FormatError
from lycotrain.inject import PRESETS, AdapterSet, inject, inject_pipeline

FIXTURE = Path("/work/shared/fixtures/kohya_module_names.json")
if not FIXTURE.is_file():
    FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "kohya_module_names.json"
CONFIGS = resources.files("lycotrain") / "data" / "configs"

# parameters that give every method a small adapter with a nonzero-able delta
METHOD_PARAMS = {"lora": {"rank": 2, "alpha": 1.0}, "loha": {"rank": 2, "alpha": 1.0},
                 "lokr": {"rank": 2, "alpha": 1.0, "factor": 4}, "oft": {"block_size": 4}, "hra": {"rank": 2}}


def _fixture() -> dict:
    if not FIXTURE.is_file():
        pytest.skip(f"fixture {FIXTURE} not present")
    return json.loads(FIXTURE.read_text())


def _expected(rows: list, te: bool = False) -> dict[str, tuple[str, tuple[int, ...]]]:
    # some of the fixture's text-encoder names (SD1, SD2, SDXL TE1) were derived under transformers 5 without
    # the ``text_model`` level; the spec (webui-formats.md §2.2) requires it, so it is re-inserted here
    def fix(name: str) -> str:
        return name if not te or "_text_model_" in name else name.replace("_encoder_layers_",
                                                                          "_text_model_encoder_layers_", 1)

    return {fix(name): (kind, tuple(shape)) for name, kind, shape in rows}


def _meta_unet(family: str):
    from diffusers import UNet2DConditionModel

    config = json.loads((CONFIGS / family / "unet" / "config.json").read_text())
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _meta_text(family: str, component: str = "text_encoder"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = json.loads((CONFIGS / family / component / "config.json").read_text())
    cls = CLIPTextModelWithProjection if config["architectures"] == ["CLIPTextModelWithProjection"] else CLIPTextModel
    with torch.device("meta"):
        return cls(CLIPTextConfig(**config))


LORA = dict(method="lora", params={"rank": 4})


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_real_size_unet_and_te_match_kohya_names_and_shapes(family):
    fixture = _fixture()[family]
    unet = _meta_unet(family)
    for preset, key in (("attn-mlp", "unet_default"), ("full", "unet_with_conv")):
        adapters = inject(unet, prefix="lora_unet_", preset=preset, **LORA)
        assert adapters.layout() == _expected(fixture[key])
        adapters.remove()
    te = inject(_meta_text(family), prefix="lora_te_", preset="attn-mlp", **LORA)
    assert te.layout() == _expected(fixture["te"], te=True)


def test_real_size_sdxl_counts_and_shapes():
    # the fixture's SDXL UNet names are LDM names (formats maps them); counts and shape multisets must agree
    fixture = _fixture()["sdxl"]
    unet = _meta_unet("sdxl")
    for preset, key in (("attn-mlp", "unet_default"), ("full", "unet_with_conv")):
        adapters = inject(unet, prefix="lora_unet_", preset=preset, **LORA)
        assert len(adapters) == len(fixture[key])
        assert Counter(adapters.layout().values()) == Counter(_expected(fixture[key]).values())
        adapters.remove()
    te = inject_pipeline({"text_encoder": _meta_text("sdxl"), "text_encoder_2": _meta_text("sdxl", "text_encoder_2")},
                         "sdxl", preset="attn-mlp", **LORA)
    assert len(te) == 264
    assert te.layout() == _expected(fixture["te"], te=True)


def test_full_preset_gives_kxk_convs_the_conv_params():
    unet = _meta_unet("sd1")
    adapters = inject(unet, prefix="lora_unet_", preset="full", method="lora", params={"rank": 8},
                      conv_params={"rank": 2})
    ranks = {name: a.rank for name, a in adapters.items()}
    assert ranks["lora_unet_down_blocks_0_resnets_0_conv1"] == 2
    assert ranks["lora_unet_down_blocks_0_downsamplers_0_conv"] == 2
    assert ranks["lora_unet_down_blocks_0_resnets_0_time_emb_proj"] == 8  # Linear: linear params
    assert ranks["lora_unet_down_blocks_1_resnets_0_conv_shortcut"] == 8  # 1x1: linear params
    assert ranks["lora_unet_down_blocks_0_attentions_0_proj_in"] == 8


# ---- on the tiny pipeline (real weights) --------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from lycotrain.diffusion.models import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd1", arch="sd1")


@pytest.fixture
def tiny(tiny_dir):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    return {"unet": UNet2DConditionModel.from_pretrained(tiny_dir, subfolder="unet"),
            "text_encoder": CLIPTextModel.from_pretrained(tiny_dir, subfolder="text_encoder")}


def _unet_inputs() -> tuple:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([10, 700]), torch.randn(2, 7, 32, generator=gen)


def _randomize(adapters: AdapterSet) -> None:
    with torch.no_grad():
        for p in adapters.parameters():
            p.add_(torch.randn_like(p) * 0.1)


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_inject_train_remove_restores_bit_for_bit(tiny, method):
    unet = tiny["unet"]
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    grads_before = {n: p.requires_grad for n, p in unet.named_parameters()}
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        reference = unet(x, t, ctx).sample
    adapters = inject(unet, prefix="lora_unet_", method=method, params=METHOD_PARAMS[method], preset="full")
    with torch.no_grad():
        assert torch.allclose(unet(x, t, ctx).sample, reference, atol=1e-6)  # identity at init
    unet(x, t, ctx).sample.square().mean().backward()
    assert all(p.grad is None for a in adapters.values() for p in a.base.parameters())  # base layers frozen
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.parameters())
    _randomize(adapters)
    with torch.no_grad():
        adapted = unet(x, t, ctx).sample
        adapters.merge()
        merged = unet(x, t, ctx).sample
        adapters.unmerge()
    assert not torch.allclose(adapted, reference, atol=1e-4)
    assert torch.allclose(merged, adapted, atol=1e-4, rtol=1e-4)
    adapters.remove()
    assert len(adapters) == 0
    after = unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in unet.named_parameters()} == grads_before


def test_state_dict_load_and_multiplier(tiny):
    unet = tiny["unet"]
    adapters = inject(unet, prefix="lora_unet_", preset="attn", method="lora", params={"rank": 2, "alpha": 1})
    assert len(adapters) == 4 * 2 * (1 + 2 + 1)  # q,k,v,out x attn1/attn2 x (1 down + 2 up + 1 mid) transformers
    assert set(adapters.counts()) == {"Linear"}
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    state = {k: v.clone() for k, v in adapters.state_dict().items()}  # like torch, state_dict shares storage
    assert {f"{name}.lora_down.weight", f"{name}.lora_up.weight", f"{name}.alpha"} <= state.keys()
    _randomize(adapters)
    x, t, ctx = _unet_inputs()
    with torch.no_grad():
        trained = unet(x, t, ctx).sample
        saved = {k: v.clone() for k, v in adapters.state_dict().items()}
        adapters.load_state_dict(state)  # the zero-init state: output back to base
        adapters.set_multiplier(0.0)
        base = unet(x, t, ctx).sample
        adapters.set_multiplier(1.0)
        assert torch.allclose(unet(x, t, ctx).sample, base, atol=1e-6)
        adapters.load_state_dict(saved)
        assert torch.equal(unet(x, t, ctx).sample, trained)
    with pytest.raises(FormatError, match="missing"):
        adapters.load_state_dict({k: v for k, v in saved.items() if not k.startswith(name)})
    with pytest.raises(FormatError, match="shape"):
        adapters.load_state_dict({**saved, f"{name}.lora_up.weight": torch.zeros(32, 3)})
    adapters.merge()
    with pytest.raises(AdapterError, match="merged"):
        adapters.set_multiplier(0.5)


def test_text_encoder_names_presets_and_pipeline_prefixes(tiny):
    te = tiny["text_encoder"]
    attn = inject(te, prefix="lora_te_", preset="attn", **LORA)
    assert set(attn) == {f"lora_te_text_model_encoder_layers_{i}_self_attn_{p}" for i in range(2)
                         for p in ("q_proj", "k_proj", "v_proj", "out_proj")}
    attn.remove()
    both = inject_pipeline(tiny, "sd1", preset="full", **LORA)
    assert len(both.parameters("lora_te_")) == 2 * 2 * 6  # down+up per module, 6 modules x 2 layers
    assert len(both.parameters()) == len(both.parameters("lora_unet_")) + len(both.parameters("lora_te_"))
    assert both.extra_loss() is None


def test_include_exclude_and_overrides(tiny):
    unet = tiny["unet"]
    adapters = inject(unet, prefix="lora_unet_", method="lora", params={"rank": 4}, preset="attn-mlp",
                      include=[r"^lora_unet_up_blocks"], exclude=[r"ff_net"],
                      overrides=[(r"attn2", {"rank": 2}),
                                 (r"up_blocks_1_attentions_1_.*attn2_to_k", {"rank": 1, "alpha": 0.5})])
    assert adapters and all(n.startswith("lora_unet_up_blocks") and "ff_net" not in n for n in adapters)
    ranks = {n: a.rank for n, a in adapters.items()}
    assert ranks["lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"] == 4
    assert ranks["lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_q"] == 2
    assert ranks["lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"] == 2
    assert ranks["lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k"] == 1
    assert float(adapters["lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k"].alpha) == 0.5


def test_bad_requests_get_clear_errors(tiny):
    unet = tiny["unet"]
    with pytest.raises(ConfigError, match="preset"):
        inject(unet, prefix="lora_unet_", preset="everything", **LORA)
    with pytest.raises(ConfigError, match="include pattern"):
        inject(unet, prefix="lora_unet_", include=["("], **LORA)
    with pytest.raises(AdapterError, match="no layer"):
        inject(unet, prefix="lora_unet_", include=["nothing_like_this"], **LORA)
    with pytest.raises(ConfigError, match="override pattern"):
        inject(unet, prefix="lora_unet_", overrides=[("typo_blocks", {"rank": 1})], **LORA)
    inject(unet, prefix="lora_unet_", **LORA)
    with pytest.raises(AdapterError, match="already holds adapters"):
        inject(unet, prefix="lora_unet_", **LORA)
    with pytest.raises(AdapterError, match="component"):
        inject_pipeline({"vae": nn.Linear(2, 2)}, "sd1", **LORA)


def test_presets_are_nested(tiny):
    unet = tiny["unet"]
    names = {}
    for preset in PRESETS:
        adapters = inject(unet, prefix="lora_unet_", preset=preset, **LORA)
        names[preset] = set(adapters)
        adapters.remove()
    assert names["attn"] < names["attn-mlp"] < names["full"]
