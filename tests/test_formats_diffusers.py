"""An independent reader of our files: diffusers' ``load_lora_weights`` (kohya converter, and for SDXL its
SGM -> diffusers block map) gives the same UNet and text-encoder outputs as our merged adapters."""

import pytest
import torch
from _formats_models import randomize, tiny_components, tiny_dirs, unet_output  # noqa: F401 (fixture)
from diffusers import DiffusionPipeline

from lycotrain.formats.kohya import save_webui_file
from lycotrain.inject import inject_pipeline


def outputs(components, seed=0):
    tokens = torch.tensor([[0, 5, 9, 17, 1]])
    result = {"unet": unet_output(components["unet"], seed)}
    with torch.no_grad():
        for key in ("text_encoder", "text_encoder_2"):
            if key in components:
                result[key] = components[key](tokens).last_hidden_state
    return result


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_diffusers_load_lora_weights_matches_our_merged_model(tmp_path, tiny_dirs, arch):
    components = tiny_components(tiny_dirs[arch])
    adapters = inject_pipeline(components, arch, method="lora", preset="full",
                               params={"rank": 4, "alpha": 2.0, "use_tucker": False})  # diffusers has no lora_mid
    randomize(adapters)
    path = tmp_path / "ours.safetensors"
    save_webui_file(path, adapters, family=arch, unet_config=components["unet"].config, dtype="fp32")
    adapters.merge()
    ours = outputs(components)
    pipe = DiffusionPipeline.from_pretrained(tiny_dirs[arch])
    base = outputs({k: getattr(pipe, k) for k in ours})
    pipe.load_lora_weights(str(path))
    theirs = outputs({k: getattr(pipe, k) for k in ours})
    for key in ours:
        change = float((ours[key] - base[key]).norm())
        assert change > 1e-3, key  # the adapters do something
        assert float((theirs[key] - ours[key]).norm()) <= 1e-5 * float(ours[key].norm()), key
