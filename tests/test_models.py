"""Tiny SD pipelines: real classes, offline, deterministic, fast; the built-in model cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lycotrain.cli import main as cli_main
from lycotrain.diffusion.models import TINY_VERSION, build_tiny_pipeline, builtin_model_path
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
    # SD1's block order (attention-less innermost blocks), which the WebUIs' LDM name conversion assumes
    assert unet.config.down_block_types == ["CrossAttnDownBlock2D", "DownBlock2D"]
    assert unet.config.up_block_types == ["UpBlock2D", "CrossAttnUpBlock2D"]
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
    stale = tmp_path / "models" / "tiny-sd1"  # a cache from before the tiny SD1 changed its block order
    stale.mkdir(parents=True)
    (stale / "model_index.json").write_text("{}")
    path = builtin_model_path("builtin:tiny-sd1")
    assert path == tmp_path / "models" / f"tiny-sd1-v{TINY_VERSION}" and (path / "model_index.json").is_file()
    stamp = (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert builtin_model_path("builtin:tiny-sd1") == path
    assert (path / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["tiny-sd1", path.name]  # no temp folder
    with pytest.raises(ModelError, match="builtin:tiny-sdxl"):
        builtin_model_path("builtin:tiny-sd3")


@pytest.mark.parametrize("arch, marker", [("sd1", "unet/config.json"), ("llama", "config.json")])
def test_build_tiny_command(tmp_path, capsys, arch, marker):
    assert cli_main(["build-tiny", "--arch", arch, "--out", str(tmp_path / "m")]) == 0
    assert (tmp_path / "m" / marker).is_file()
    assert f"tiny {arch}" in capsys.readouterr().out


# ---- loading: folders, single files, families -------------------------------------------------------------
def _fresh(pipeline):
    """Copy every weight into fresh memory: BLAS results can depend on a tensor's alignment (memory-mapped
    files), so bit-identical outputs are compared on equally allocated weights."""
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            for param in component.parameters():
                param.data = param.data.clone()
    return pipeline


def _image(pipeline):
    generator = torch.Generator().manual_seed(0)
    return pipeline("a photo of sks", num_inference_steps=2, output_type="pt", generator=generator).images


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_load_folder_detects_family(tiny_dirs, arch):
    from lycotrain.diffusion.models import load_pipeline

    model = load_pipeline(tiny_dirs[arch])
    assert model.family == arch and model.prediction_type == "epsilon"
    assert len(model.text_encoders) == len(model.tokenizers) == (2 if arch == "sdxl" else 1)
    assert set(model.components()) == {"unet", "text_encoder"} | ({"text_encoder_2"} if arch == "sdxl" else set())
    assert model.noise_scheduler().config.num_train_timesteps == 1000
    with pytest.raises(ModelError, match="not 'sd2'"):
        load_pipeline(tiny_dirs[arch], family="sd2")


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_single_file_round_trip_is_identical(tiny_dirs, tmp_path, arch):
    from safetensors import safe_open

    from lycotrain.diffusion.models import load_pipeline
    from lycotrain.diffusion.single_file import detect_family, save_single_file

    original = load_pipeline(tiny_dirs[arch])
    file = save_single_file(original.pipeline, tmp_path / f"{arch}.safetensors", arch)
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
    assert detect_family(keys) == arch
    expected = {"model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.middle_block.1.proj_in.weight",
                "model.diffusion_model.output_blocks.2.0.skip_connection.weight",
                "first_stage_model.encoder.down.0.block.0.conv1.weight", "first_stage_model.decoder.mid.attn_1.q.weight"}
    if arch == "sd1":
        expected |= {"cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                     "model.diffusion_model.output_blocks.1.1.conv.weight"}  # upsampler of attention-less up block 0
    else:
        expected |= {"model.diffusion_model.label_emb.0.0.weight",
                     "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
                     "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight",
                     "conditioner.embedders.1.model.text_projection"}
    assert expected <= keys

    loaded = load_pipeline(file)
    assert loaded.family == arch
    for name in ("unet", "vae", "text_encoder") + (("text_encoder_2",) if arch == "sdxl" else ()):
        a, b = getattr(original.pipeline, name).state_dict(), getattr(loaded.pipeline, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert loaded.pipeline.tokenizer("a photo").input_ids == original.pipeline.tokenizer("a photo").input_ids
    assert torch.equal(_image(_fresh(loaded.pipeline)), _image(_fresh(original.pipeline)))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_original_layout_matches_diffusers_converter_on_real_sizes(family):
    """Our writer's names for the real SD1.5/SD2.1/SDXL architectures (meta tensors) are exactly what
    diffusers' own original->diffusers converter reads back."""
    import json
    from importlib import resources
    from types import SimpleNamespace

    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lycotrain.diffusion.single_file import original_state_dict

    folder = resources.files("lycotrain") / "data" / "configs" / family
    config = {c: json.loads((folder / c / "config.json").read_text())
              for c in ("unet", "vae", "text_encoder", "text_encoder_2") if (folder / c / "config.json").is_file()}
    with torch.device("meta"):
        parts = {"unet": UNet2DConditionModel.from_config(config["unet"]),
                 "vae": AutoencoderKL.from_config(config["vae"])}
        for name in ("text_encoder", "text_encoder_2"):
            if name in config:
                cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
                parts[name] = cls(CLIPTextConfig(**config[name]))
    original = original_state_dict(SimpleNamespace(**parts), family)
    assert detect_family_of(original) == family
    assert convert_ldm_unet_checkpoint(original, parts["unet"].config).keys() == parts["unet"].state_dict().keys()
    assert convert_ldm_vae_checkpoint(original, parts["vae"].config).keys() == parts["vae"].state_dict().keys()
    te = parts["text_encoder"]
    back = (convert_ldm_clip_checkpoint(original) if family != "sd2"
            else convert_open_clip_checkpoint(te, original, prefix="cond_stage_model.model."))
    assert {k.removeprefix("text_model.") for k in back} == set(te.state_dict())
    if family == "sdxl":
        te2 = parts["text_encoder_2"]
        back = convert_open_clip_checkpoint(te2, original, prefix="conditioner.embedders.1.model.")
        assert set(back) == set(te2.state_dict())


def detect_family_of(state) -> str:
    from lycotrain.diffusion.single_file import detect_family

    return detect_family(state.keys())


def test_load_errors_are_clear(tiny_dirs, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from lycotrain.diffusion.models import load_pipeline
    from lycotrain.diffusion.single_file import save_single_file

    with pytest.raises(ModelError, match="does not exist"):
        load_pipeline(tmp_path / "missing")
    with pytest.raises(ModelError, match="model_index.json"):
        load_pipeline(tmp_path)
    (tmp_path / "sd3").mkdir()
    (tmp_path / "sd3" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    with pytest.raises(ModelError, match="StableDiffusion3Pipeline is not supported"):
        load_pipeline(tmp_path / "sd3")
    save_file({"transformer.x": torch.zeros(1)}, str(tmp_path / "flux.safetensors"))
    with pytest.raises(ModelError, match="model.diffusion_model"):
        load_pipeline(tmp_path / "flux.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot read"):
        load_pipeline(tmp_path / "broken.safetensors")
    with pytest.raises(ModelError, match="unknown model family"):
        load_pipeline(tiny_dirs["sd1"], family="sd3")

    # an SD2-layout file without our metadata: the weights cannot say epsilon or v, the user must
    sd1 = load_pipeline(tiny_dirs["sd1"]).pipeline
    tagged = save_single_file(sd1, tmp_path / "sd2.safetensors", "sd2")
    with safe_open(str(tagged), "pt") as f:
        bare = {k: f.get_tensor(k) for k in f.keys()}
    save_file(bare, str(tmp_path / "bare-sd2.safetensors"))
    with pytest.raises(ModelError, match="'sd2-v'"):
        load_pipeline(tmp_path / "bare-sd2.safetensors")
    assert load_pipeline(tagged).family == "sd2"
    model = load_pipeline(tagged, family="sd2-v")  # the user's word sets the parameterisation
    assert model.family == "sd2-v" and model.prediction_type == "v_prediction"


def test_ckpt_is_read_without_running_pickled_code(tmp_path):
    from lycotrain.diffusion.single_file import load_ckpt

    weights = {"model.diffusion_model.out.2.weight": torch.ones(2)}
    torch.save({"state_dict": weights, "global_step": 10}, tmp_path / "ok.ckpt")
    assert load_ckpt(tmp_path / "ok.ckpt").keys() == weights.keys()
    torch.save({"state_dict": weights, "payload": ModelError("pickled object")}, tmp_path / "evil.ckpt")
    with pytest.raises(ModelError, match="safely"):
        load_ckpt(tmp_path / "evil.ckpt")


def test_clip_vocabulary_matches_openai_ids():
    from lycotrain.diffusion.tokenizer import clip_vocabulary, make_clip_tokenizer

    tokenizer = make_clip_tokenizer(clip_vocabulary())
    assert len(tokenizer) == 49408
    # reference ids of the OpenAI CLIP tokenizer for this prompt
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
