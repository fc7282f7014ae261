"""Loading the base model the file commands (check, merge, extract) work on: a diffusers folder, a
single-file checkpoint, or ``builtin:tiny-sd1`` / ``builtin:tiny-sdxl``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lycotrain.errors import ModelError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def load_pipeline(spec: str):
    """A diffusers pipeline (fp32, CPU) from a folder, a single ``.safetensors`` checkpoint or a builtin name."""
    from lycotrain.diffusion.models import BUILTIN_PREFIX, builtin_model_path

    path = builtin_model_path(spec) if spec.startswith(BUILTIN_PREFIX) else Path(spec)
    if not path.exists():
        raise ModelError(f"model {spec}: no such file or folder; give a diffusers folder, a single-file "
                         ".safetensors checkpoint or builtin:tiny-sd1")
    from diffusers import DiffusionPipeline

    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"model {path}: not a diffusers folder (no model_index.json)")
        return DiffusionPipeline.from_pretrained(path)
    from lycotrain.diffusion import models

    single = getattr(models, "load_single_file", None)
    if single is None:
        raise ModelError(f"model {path}: single-file checkpoints are not supported yet; convert it to a "
                         "diffusers folder")
    return single(path)


def components_of(pipeline) -> dict[str, nn.Module]:
    """The parts adapters live in: ``unet``, ``text_encoder`` and (SDXL) ``text_encoder_2``."""
    return {name: getattr(pipeline, name) for name in COMPONENTS if getattr(pipeline, name, None) is not None}
