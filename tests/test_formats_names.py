"""Module names on the real-size SD1.5 / SD2.1 / SDXL architectures (meta device: names and shapes only).

Every name lycotrain exports must be one that A1111 and ComfyUI (and so Forge) map on that model, and the
SDXL names must be exactly kohya's (fixture generated from kohya's own UNet classes)."""

import json
from pathlib import Path

import pytest
from _formats_models import real_size_components

from lycotrain.formats.compat import key_maps
from lycotrain.formats.kohya import file_names
from lycotrain.formats.names import LDMNameMap, UNetLayout, model_names
from lycotrain.inject import inject_pipeline

FIXTURE = json.loads((Path("/work/shared/fixtures/kohya_module_names.json")).read_text())


def canonical(name: str) -> str:
    """The fixture was generated under transformers 5, whose CLIPTextModel lacks the ``text_model`` level that
    every WebUI needs (spec §2.2); lycotrain's spelling re-inserts it."""
    for prefix in ("lora_te_", "lora_te1_"):
        if name.startswith(prefix + "encoder_"):
            return prefix + "text_model_" + name[len(prefix):]
    return name


def fixture_names(family: str, part: str) -> set[str]:
    return {canonical(name) for name, _, _ in FIXTURE[family][part]}


@pytest.fixture(scope="module", params=["sd1", "sd2", "sdxl"])
def real_model(request):
    return request.param, real_size_components(request.param)


@pytest.mark.parametrize("preset,part", [("attn-mlp", "unet_default"), ("full", "unet_with_conv")])
def test_exported_names_equal_kohya_and_every_loader_maps_them(real_model, preset, part):
    family, components = real_model
    adapters = inject_pipeline(components, family, method="lora", params={"rank": 1}, preset=preset)
    try:
        exported = file_names(adapters, family, components["unet"].config)
        unet = {n for n in exported.values() if n.startswith("lora_unet_")}
        te = {n for n in exported.values() if not n.startswith("lora_unet_")}
        assert unet == fixture_names(family, part)
        assert te == fixture_names(family, "te")
        assert all("." not in n for n in exported.values())
        names = model_names(components)
        maps = key_maps(names, components["unet"].config)
        for internal, file_name in exported.items():
            for loader in ("a1111", "comfyui", "forge"):
                assert maps.resolve(loader, file_name) == internal, (loader, file_name)
    finally:
        adapters.remove()


def test_shapes_of_named_layers_equal_kohya(real_model):
    family, components = real_model
    names = model_names(components)
    for part in ("unet_with_conv", "te"):
        for name, _, shape in FIXTURE[family][part]:
            layer = names.layers[names.from_file[canonical(name)]]
            assert list(layer.weight.shape) == shape, name


def test_ldm_map_is_derived_from_the_layout_and_inverts():
    layout = UNetLayout.from_config(real_size_components("sdxl")["unet"].config)
    ldm = LDMNameMap(layout)
    assert ldm.to_ldm("lora_unet_down_blocks_1_attentions_0_proj_in") == "lora_unet_input_blocks_4_1_proj_in"
    assert ldm.to_ldm("lora_unet_up_blocks_0_upsamplers_0_conv") == "lora_unet_output_blocks_2_2_conv"
    assert ldm.to_ldm("lora_unet_mid_block_resnets_1_conv2") == "lora_unet_middle_block_2_out_layers_3"
    assert ldm.to_ldm("lora_unet_down_blocks_0_downsamplers_0_conv") == "lora_unet_input_blocks_3_0_op"
    assert ldm.to_ldm("lora_unet_down_blocks_0_resnets_0_unknown") is None
    assert ldm.to_diffusers("lora_unet_input_blocks_4_0_skip_connection") == \
        "lora_unet_down_blocks_1_resnets_0_conv_shortcut"
    # a different layout gives different numbers: nothing is hard-coded for SDXL
    tiny = LDMNameMap(UNetLayout((1, 1), (True, True), (True, True)))
    assert tiny.to_ldm("lora_unet_down_blocks_1_attentions_0_proj_in") == "lora_unet_input_blocks_3_1_proj_in"
    assert tiny.to_ldm("lora_unet_up_blocks_0_upsamplers_0_conv") == "lora_unet_output_blocks_1_2_conv"
