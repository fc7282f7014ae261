"""Tiny SD pipelines: real classes, offline, deterministic, fast; the built-in model cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lycotrain.cli import main as cli_main
from lycotrain.diffusion.models import build_tiny_pipeline, builtin_model_path
from lycotrain.errors import ModelError


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_pipeline(root / arch, arch=arch, seed=0) for arch in ("sd1", "sdxl")}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{f.parent.name}/{k}": v for f in sorted(folder.glob("*/*.safetensors")) for k, v in load_file(f).items()}


def test_sd1_loads_with_diffusers_and_samples(tiny_dirs):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_dirs["sd1"], local_files_only=True)
    unet = pipe.unet
    assert unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    names = [n for n, _ in unet.named_modules()]
    for needed in ("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k", "down_blocks.0.downsamplers.0.conv",
                   "up_blocks.0.upsamplers.0.conv", "down_blocks.1.resnets.0.conv_shortcut",
                   "down_blocks.0.resnets.0.time_emb_proj", "mid_block.attentions.0.proj_in"):
        assert needed in names
    assert isinstance(unet.get_submodule("down_blocks.0.attentions.0.proj_in"), torch.nn.Conv2d)  # SD1: 1x1 conv
    assert pipe.vae_scale_factor == 8
    ids = pipe.tokenizer("a photo of sks dog", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == pipe.tokenizer.bos_token_id
    assert pipe.tokenizer.decode(pipe.tokenizer("a photo of sks dog").input_ids, skip_special_tokens=True) \
        == "a photo of sks dog"
    image = pipe("a photo", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_sdxl_has_two_text_encoders_and_text_time(tiny_dirs):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModelWithProjection

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dirs["sdxl"], local_files_only=True)
    assert isinstance(pipe.text_encoder_2, CLIPTextModelWithProjection)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == (pipe.text_encoder.config.hidden_size
                                                    + pipe.text_encoder_2.config.hidden_size)
    assert isinstance(pipe.unet.get_submodule("down_blocks.0.attentions.0.proj_in"), torch.nn.Linear)
    image = pipe("a photo", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_same_seed_same_weights_other_seed_differs(tiny_dirs, tmp_path):
    rng_before = torch.get_rng_state()
    again = build_tiny_pipeline(tmp_path / "again", arch="sd1", seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # building leaves the caller's RNG alone
    first, second = _weights(tiny_dirs["sd1"]), _weights(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    other = _weights(build_tiny_pipeline(tmp_path / "other", arch="sd1", seed=1))
    assert not torch.equal(first["unet/conv_in.weight"], other["unet/conv_in.weight"])


def test_unet_forward_is_fast(tiny_dirs):
    import time

    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_dirs["sd1"], subfolder="unet")
    latents, context = torch.randn(2, 4, 4, 4), torch.randn(2, 77, 32)
    unet(latents, torch.tensor([1, 500]), context)
    start = time.perf_counter()
    with torch.no_grad():
        unet(latents, torch.tensor([1, 500]), context)
    assert time.perf_counter() - start < 0.5


def test_builtin_path_builds_once(tmp_path, monkeypatch):
    monkeypatch.setenv("LYCOTRAIN_HOME", str(tmp_path))
    path = builtin_model_path("builtin:tiny-sd1")
    assert path == tmp_path / "models" / "tiny-sd1" and (path / "model_index.json").is_file()
    stamp = (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert builtin_model_path("builtin:tiny-sd1") == path
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "models").iterdir()] == ["tiny-sd1"]  # no temp folder left behind
    with pytest.raises(ModelError, match="builtin:tiny-sdxl"):
        builtin_model_path("builtin:tiny-sd3")


def test_build_tiny_command(tmp_path, capsys):
    assert cli_main(["build-tiny", "--arch", "sd1", "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / "unet" / "config.json").is_file()
    assert "tiny sd1" in capsys.readouterr().out
