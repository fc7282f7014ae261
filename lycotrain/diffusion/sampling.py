"""Preview images: the configured prompts rendered with a chosen diffusers sampler into ``RUN_DIR/previews``.

Each prompt has its own seed and a private ``torch.Generator``, so previews are reproducible and never touch
the global RNG (a preview in the middle of a run does not change the training that follows).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from lycotrain.atomic import atomic_write
from lycotrain.engine.config import SamplePrompt

PREVIEW_DIR = "previews"

# config name -> diffusers scheduler class (A1111 names: Euler, Euler a, DPM++ 2M, DDIM, UniPC)
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "ddim": ("DDIMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_sampler(name: str, training_scheduler_config: Any) -> Any:
    """The sampler ``name`` over the model's noise schedule (betas, prediction type, zero-terminal-SNR).

    A zero-terminal-SNR schedule samples with "trailing" timesteps, so the first step is the last training
    timestep, the pure noise the model learnt to start from (Lin et al. 2023; "leading" would start at 751 of
    1000 with 4 steps and never see it).
    """
    cls_name, options = SAMPLERS[name]
    if training_scheduler_config.get("rescale_betas_zero_snr"):
        options = {**options, "timestep_spacing": "trailing"}
    cls = getattr(importlib.import_module("diffusers"), cls_name)
    return cls.from_config(training_scheduler_config, **options)


@torch.no_grad()
def render_previews(pipeline: Any, prompts: list[SamplePrompt], *, sampler: str, scheduler_config: Any,
                    default_size: int, out_dir: Path, stem: str) -> list[Path]:
    """Render every prompt with ``pipeline`` (adapters as they are in its modules) into ``out_dir``.

    Files are ``<stem>-<index>.png``, written atomically. Returns their paths.
    """
    pipeline.scheduler = make_sampler(sampler, scheduler_config)
    pipeline.set_progress_bar_config(disable=True)
    device = next(pipeline.unet.parameters()).device
    paths = []
    for index, prompt in enumerate(prompts):
        generator = torch.Generator(device=device).manual_seed(prompt.seed)
        latents = pipeline(prompt=prompt.prompt, negative_prompt=prompt.negative_prompt or None,
                           num_inference_steps=prompt.steps, guidance_scale=prompt.cfg,
                           width=prompt.width or default_size, height=prompt.height or default_size,
                           generator=generator, output_type="latent").images
        image = decode_latents(pipeline, latents)
        path = out_dir / f"{stem}-{index}.png"
        atomic_write(path, lambda tmp, im=image: im.save(tmp, format="PNG"))
        paths.append(path)
    return paths


@torch.no_grad()
def decode_latents(pipeline: Any, latents: torch.Tensor) -> Any:
    """The PIL image of ``latents``, decoded by the VAE in its own dtype (fp32) even under an fp16/bf16
    autocast: fp16 VAEs overflow (NaN/black images)."""
    vae = pipeline.vae
    with torch.autocast(latents.device.type, enabled=False):
        pixels = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return pipeline.image_processor.postprocess(pixels, output_type="pil")[0]
