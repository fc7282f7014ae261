"""Stable Diffusion models: the tiny random-weight pipelines the project builds itself, and loading.

The tiny pipelines are made of the real diffusers/transformers classes and saved as ordinary diffusers
folders, so every later feature (training, previews, export, single-file round trips) loads them through
the same code path as a real checkpoint. They keep every layer type of the real UNets (cross-attention
transformer blocks, ResNets with ``time_emb_proj`` and ``conv_shortcut``, down/up-samplers) and the real
VAE downscale factor of 8, so bucket and latent arithmetic is the same as on SD1.5/SDXL.

Loading (``load_pipeline``) accepts the built-in tiny models, diffusers folders and one-file checkpoints in the
original layout (``single_file.py``), always offline.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lycotrain.errors import ModelError
from lycotrain.paths import BUILTIN_PREFIX, builtin_model_folder

TINY_ARCHS = ("sd1", "sdxl")
# Bump when a tiny architecture changes: the built-in models are cached per version, so no user keeps an old one.
# 2: the tiny SD1 follows SD1's block order (attention-less innermost blocks).
TINY_VERSION = 2


# Shared tiny geometry. Channels 32/64 with 8 norm groups; the VAE has 4 blocks (downscale 8, like SD).
_TINY_UNET: dict[str, Any] = dict(
    sample_size=8,  # 64 px default preview size
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
)
# SD1.x's block order, shortened to two blocks: attention in the outer blocks, none in the innermost ones.
# The WebUIs' diffusers->LDM name conversion assumes this order (A1111 places the upsampler of up block 0
# where SD1's attention-less block has it), so a tiny model with another order would drop modules there.
_TINY_SD1_BLOCKS: dict[str, Any] = dict(
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)
# The tiny SDXL keeps attention in both blocks: its LDM names come out right in every loader, and its
# second block's two transformer layers are the SDXL-only feature the tests need.
_TINY_SDXL_BLOCKS: dict[str, Any] = dict(
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
_TINY_VAE: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
)
_TINY_CLIP: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,  # the CLIP context: captions are truncated exactly as on real models
    hidden_act="quick_gelu",
)
# The SD1.5 training noise schedule (scaled linear betas, 1000 steps).
_SD_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    steps_offset=1,
    prediction_type="epsilon",
)


# ---- tiny pipelines ---------------------------------------------------------------------------------
def _tiny_tokenizer(pad_token: str):
    from lycotrain.diffusion.tokenizer import make_clip_tokenizer, tiny_vocabulary

    return make_clip_tokenizer(tiny_vocabulary(), pad_token, _TINY_CLIP["max_position_embeddings"])


def _tiny_text_config(tokenizer, hidden_size: int, **extra: Any):
    from transformers import CLIPTextConfig

    params = {**_TINY_CLIP, "hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, **extra}
    return CLIPTextConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **params)


def _tiny_sd1():
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _tiny_tokenizer(pad_token="<|endoftext|>")
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, 32))
    unet = UNet2DConditionModel(**_TINY_UNET, **_TINY_SD1_BLOCKS, cross_attention_dim=32, attention_head_dim=4)
    vae = AutoencoderKL(**_TINY_VAE)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDPMScheduler(**_SD_SCHEDULER), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def _tiny_sdxl():
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _tiny_tokenizer(pad_token="<|endoftext|>")
    tokenizer_2 = _tiny_tokenizer(pad_token="!")  # SDXL's second tokenizer pads with "!" like OpenCLIP
    # SDXL's TE1 is read at its penultimate layer, TE2 is a projection model; widths 32 + 48 -> context 80
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, 32))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer_2, 48, projection_dim=48))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        **_TINY_SDXL_BLOCKS,
        cross_attention_dim=32 + 48,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=48 + 6 * time_embed_dim,  # pooled TE2 + 6 size/crop numbers
    )
    vae = AutoencoderKL(**_TINY_VAE, scaling_factor=0.13025, force_upcast=False)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet,
                                     scheduler=DDPMScheduler(**_SD_SCHEDULER), add_watermarker=False)


def build_tiny_pipeline(out_dir: str | Path, arch: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny random-weight ``arch`` pipeline ("sd1" or "sdxl") as a diffusers folder at ``out_dir``.

    Deterministic: the same seed gives identical weights (the global RNG is left as it was).
    """
    builders = {"sd1": _tiny_sd1, "sdxl": _tiny_sdxl}
    if arch not in builders:
        raise ModelError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipeline = builders[arch]()
    out_dir = Path(out_dir)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def builtin_model_path(name: str) -> Path:
    """Resolve ``builtin:tiny-sd1`` / ``builtin:tiny-sdxl`` to its folder, building it on first use.

    The build happens in a temporary folder next to the target and is renamed into place, so a crash or a
    concurrent build never leaves a half-written model that a later run would trust.
    """
    return builtin_model_folder(name, TINY_ARCHS, "model_index.json",
                                lambda folder, arch: build_tiny_pipeline(folder, arch=arch), version=TINY_VERSION)


# ---- loading ----------------------------------------------------------------------------------------
FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")
_PIPELINES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}


@dataclass
class LoadedModel:
    """A loaded Stable Diffusion pipeline plus what training needs to know about it."""

    pipeline: Any
    family: str  # "sd1" | "sd2" | "sd2-v" | "sdxl"
    source: str

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def prediction_type(self) -> str:
        """"epsilon" or "v_prediction", as the scheduler config says."""
        return str(self.pipeline.scheduler.config.get("prediction_type", "epsilon"))

    @property
    def unet(self) -> Any:
        return self.pipeline.unet

    @property
    def vae(self) -> Any:
        return self.pipeline.vae

    @property
    def scheduler(self) -> Any:
        return self.pipeline.scheduler

    @property
    def text_encoders(self) -> tuple[Any, ...]:
        return tuple(te for te in (self.pipeline.text_encoder, getattr(self.pipeline, "text_encoder_2", None))
                     if te is not None)

    @property
    def tokenizers(self) -> tuple[Any, ...]:
        return tuple(tok for tok in (self.pipeline.tokenizer, getattr(self.pipeline, "tokenizer_2", None))
                     if tok is not None)

    def components(self) -> dict[str, Any]:
        """The trainable-model components by diffusers name (for ``inject_pipeline``)."""
        names = ("unet", "text_encoder") + (("text_encoder_2",) if self.is_sdxl else ())
        return {name: getattr(self.pipeline, name) for name in names}

    def noise_scheduler(self) -> Any:
        """A DDPM scheduler with the model's training noise schedule and prediction type (for the loss)."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipeline.scheduler.config)


def folder_family(pipeline: Any) -> str:
    """Family of a loaded diffusers pipeline: SDXL by its second text encoder; SD2 by its 1024-wide
    OpenCLIP-H context; ``sd2-v`` when the scheduler predicts v."""
    if getattr(pipeline, "text_encoder_2", None) is not None:
        return "sdxl"
    if pipeline.unet.config.cross_attention_dim != 1024:
        return "sd1"
    return "sd2-v" if pipeline.scheduler.config.get("prediction_type") == "v_prediction" else "sd2"


def _load_folder(folder: Path, dtype: torch.dtype | None) -> Any:
    import json

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    index = folder / "model_index.json"
    if not index.is_file():
        raise ModelError(f"{folder}: not a diffusers model folder (no model_index.json); point model.path at a "
                         "diffusers folder or at one .safetensors checkpoint")
    name = json.loads(index.read_text()).get("_class_name", "")
    if name not in _PIPELINES:
        raise ModelError(f"{folder}: {name or 'this pipeline'} is not supported; lycotrain trains "
                         "Stable Diffusion 1.x, 2.x and XL base models")
    cls = StableDiffusionXLPipeline if _PIPELINES[name] == "sdxl" else StableDiffusionPipeline
    kwargs = {"safety_checker": None, "requires_safety_checker": False} if cls is StableDiffusionPipeline else {}
    return cls.from_pretrained(folder, local_files_only=True, torch_dtype=dtype, **kwargs)


def load_pipeline(path: str | Path, family: str = "auto", dtype: torch.dtype | None = None) -> LoadedModel:
    """Load SD1.x / SD2.x / SDXL from ``builtin:<name>``, a diffusers folder or one original-layout
    ``.safetensors``/``.ckpt``, fully offline.

    ``family`` "auto" detects it; naming it checks the model against it, and for SD2 chooses between
    epsilon ("sd2") and v-prediction ("sd2-v"), which the weights cannot tell.
    """
    from lycotrain.diffusion.single_file import load_single_file

    if family != "auto" and family not in FAMILIES:
        raise ModelError(f"unknown model family {family!r}; choose auto or one of {', '.join(FAMILIES)}")
    source = str(path)
    path = builtin_model_path(source) if source.startswith(BUILTIN_PREFIX) else Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"model path {path} does not exist")
    if path.is_file():
        pipeline, family = load_single_file(path, family=family, dtype=dtype)
    else:
        pipeline = _load_folder(path, dtype)
        detected = folder_family(pipeline)
        if family != "auto" and family.split("-")[0] != detected.split("-")[0]:
            raise ModelError(f"{path} holds a {detected} model, not {family!r}")
        family = detected if family == "auto" else family
    _match_prediction_type(pipeline, family)
    return LoadedModel(pipeline, family, source)


def _match_prediction_type(pipeline: Any, family: str) -> None:
    """An SD2 model named "sd2"/"sd2-v" by the user predicts what the name says, whatever the scheduler
    config it came with (single files carry none, and folders are sometimes mislabelled)."""
    if family not in ("sd2", "sd2-v"):
        return
    wanted = "v_prediction" if family == "sd2-v" else "epsilon"
    if pipeline.scheduler.config.get("prediction_type") != wanted:
        pipeline.scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config, prediction_type=wanted)
