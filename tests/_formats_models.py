"""Models for the formats tests: real-size SD1.5 / SD2.1 / SDXL architectures on the meta device (names and
shapes only, no weights) and tiny random-weight pipelines components (real weights, fast)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

SD1_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8,
)
SD2_UNET = dict(SD1_UNET, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280)


def _clip(cls, spec: dict) -> torch.nn.Module:
    return cls(CLIPTextConfig(vocab_size=1000, bos_token_id=0, eos_token_id=2, pad_token_id=1, **spec))


def real_size_components(family: str) -> dict[str, torch.nn.Module]:
    """The full-size architecture of ``family`` on the meta device (a few seconds, no memory)."""
    with torch.device("meta"):
        if family == "sd1":
            return {"unet": UNet2DConditionModel(**SD1_UNET), "text_encoder": _clip(CLIPTextModel, CLIP_L)}
        if family == "sd2":
            return {"unet": UNet2DConditionModel(**SD2_UNET), "text_encoder": _clip(CLIPTextModel, CLIP_H)}
        return {"unet": UNet2DConditionModel(**SDXL_UNET), "text_encoder": _clip(CLIPTextModel, CLIP_L),
                "text_encoder_2": _clip(CLIPTextModelWithProjection, CLIP_G)}


def tiny_components(folder) -> dict[str, torch.nn.Module]:
    """UNet and text encoder(s) of a tiny diffusers folder built by ``build_tiny_pipeline`` (fresh copies)."""
    folder = Path(folder)
    parts: dict[str, torch.nn.Module] = {"unet": UNet2DConditionModel.from_pretrained(folder / "unet"),
                                         "text_encoder": CLIPTextModel.from_pretrained(folder / "text_encoder")}
    if (folder / "text_encoder_2").is_dir():
        parts["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2")
    for module in parts.values():
        module.eval()
    return parts


def unet_output(unet, seed: int = 0) -> torch.Tensor:
    """The UNet output on fixed random inputs (SDXL gets its added conditioning)."""
    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=gen)
    context = torch.randn(1, 5, unet.config.cross_attention_dim, generator=gen)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 48, generator=gen),
                                      "time_ids": torch.randn(1, 6, generator=gen)}
    with torch.no_grad():
        return unet(sample, 10, context, **extra).sample


def randomize(adapters, std: float = 0.05, seed: int = 0) -> None:
    """Give every adapter parameter random values (fresh adapters have delta W = 0, which proves nothing)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in adapters.values():
            for param in adapter.adapter_parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * std)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """The tiny SD1 and SDXL pipelines, built once per test session."""
    from lycotrain.diffusion.models import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_pipeline(root / arch, arch=arch) for arch in ("sd1", "sdxl")}
