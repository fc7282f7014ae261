"""Metadata of WebUI files (specs/webui-formats.md §5-6) and the sidecar files next to them.

* ``ss_*`` keys as kohya writes them: all values strings, JSON-typed fields JSON *objects* (A1111's metadata
  panel crashes on anything else), ``ss_base_model_version`` + ``ss_v2`` consistent with the model (A1111 and
  Forge hide cards whose version they cannot detect).
* ``sshs_model_hash`` as kohya defines it: sha256 of the tensor-data section of a re-serialisation that carries
  only the ``ss_*`` metadata. A1111 shows it as the network hash, so it is always recomputed here.
* ``modelspec.*`` (Stability ModelSpec 1.0.1): informational, read by model managers.
* Sidecars: ``NAME.preview.png`` (A1111/Forge card image) and ``NAME.json`` (A1111 user metadata: activation
  text, preferred weight, description).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import io
import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from lycotrain.atomic import atomic_write, atomic_write_text
from lycotrain.errors import FormatError

BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
ARCHITECTURE = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2-512", "sdxl": "stable-diffusion-xl-v1-base"}
SDXL_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
SD_VERSION_LABEL = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}  # A1111 user-metadata "sd version"
# lycotrain method -> (ss_network_module, LyCORIS algo or None)
NETWORK_MODULE = {"lora": ("networks.lora", None), "loha": ("lycoris.kohya", "loha"),
                  "lokr": ("lycoris.kohya", "lokr"), "oft": ("lycoris.kohya", "diag-oft")}
THUMBNAIL_SIZE = 256


def _json_object_of_objects(field: str, value: Mapping[str, Any]) -> str:
    if not isinstance(value, Mapping) or not all(isinstance(v, Mapping) for v in value.values()):
        raise FormatError(f"metadata {field} must be a dict of dicts (a JSON object of objects)")
    return json.dumps(value, ensure_ascii=False)


def _thumbnail(preview: Path) -> str:
    """A small PNG data URI of the preview (ModelSpec ``thumbnail``)."""
    from PIL import Image

    with Image.open(preview) as image:
        image = image.convert("RGB")
        image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def build_metadata(*, family: str, method: str, rank: int, alpha: float, output_name: str,
                   resolution: tuple[int, int] | int, v_prediction: bool = False,
                   network_args: Mapping[str, Any] | None = None,
                   tag_frequency: Mapping[str, Mapping[str, int]] | None = None,
                   dataset_dirs: Mapping[str, Mapping[str, Any]] | None = None,
                   training: Mapping[str, Any] | None = None, started_at: float | None = None,
                   trigger_phrase: str | None = None, preview: str | Path | None = None,
                   description: str | None = None, base_model_name: str | None = None,
                   clip_skip: int | None = None, date: dt.datetime | None = None) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` metadata of a WebUI file, from plain values the engine has.

    ``family`` is sd1, sd2, sd2-v (SD2 v-prediction) or sdxl. ``method`` is what the file *contains* (an HRA adapter exported as LoRA is ``lora``). ``training`` holds
    further training parameters (``learning_rate``, ``steps``, ``optimizer`` ...), written as ``ss_<key>``.
    ``dataset_dirs`` is ``{folder: {"n_repeats": int, "img_count": int}}``; ``tag_frequency`` is
    ``{folder: {tag: count}}``.
    """
    if family == "sd2-v":  # models.LoadedModel.family spelling
        family, v_prediction = "sd2", True
    if family not in BASE_MODEL_VERSION:
        raise FormatError(f"unknown model family {family!r}; choose one of {', '.join(BASE_MODEL_VERSION)}")
    if method not in NETWORK_MODULE:
        raise FormatError(f"method {method!r} is not stored in WebUI files; choose one of {', '.join(NETWORK_MODULE)}")
    width, height = (resolution, resolution) if isinstance(resolution, int) else resolution
    module, algo = NETWORK_MODULE[method]
    args = dict(network_args or {})
    if algo is not None:
        args = {"algo": algo, **args}
    version = BASE_MODEL_VERSION[family] + ("_v" if v_prediction and family == "sd2" else "")
    meta: dict[str, str] = {
        "ss_network_module": module,
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_base_model_version": version,
        "ss_v2": str(family == "sd2"),
        "ss_output_name": output_name,
        "ss_resolution": str((int(width), int(height))),
        "ss_training_started_at": str(float(started_at if started_at is not None else dt.datetime.now().timestamp())),
        "ss_clip_skip": str(clip_skip),
    }
    if args:
        meta["ss_network_args"] = json.dumps({k: (v if v is None else str(v)) for k, v in args.items()})
    if tag_frequency is not None:
        meta["ss_tag_frequency"] = _json_object_of_objects("ss_tag_frequency", tag_frequency)
    if dataset_dirs is not None:
        meta["ss_dataset_dirs"] = _json_object_of_objects("ss_dataset_dirs", dataset_dirs)
    if base_model_name:
        meta["ss_sd_model_name"] = base_model_name
    for key, value in (training or {}).items():
        if f"ss_{key}" in meta:
            raise FormatError(f"training parameter {key!r} clashes with a metadata key set from the model")
        meta[f"ss_{key}"] = value if isinstance(value, str) else json.dumps(value) if isinstance(value, Mapping) \
            else str(value)
    meta.update(_modelspec(family, v_prediction, output_name, width, height, trigger_phrase, preview,
                           description, clip_skip, date))
    return meta


def _modelspec(family: str, v_prediction: bool, title: str, width: int, height: int, trigger_phrase: str | None,
               preview: str | Path | None, description: str | None, clip_skip: int | None,
               date: dt.datetime | None) -> dict[str, str]:
    arch = ARCHITECTURE[family]
    if family == "sd2" and v_prediction:
        arch = "stable-diffusion-v2-768-v"
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": SDXL_IMPLEMENTATION if family == "sdxl" else "diffusers",
        "modelspec.title": title,
        "modelspec.resolution": f"{width}x{height}",
        "modelspec.date": (date or dt.datetime.now(dt.timezone.utc)).isoformat(timespec="seconds"),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
    }
    if trigger_phrase:
        spec["modelspec.trigger_phrase"] = trigger_phrase
    if description:
        spec["modelspec.description"] = description
    if clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(clip_skip)
    if preview is not None and Path(preview).is_file():
        spec["modelspec.thumbnail"] = _thumbnail(Path(preview))
    return spec


def data_section_sha256(blob: bytes) -> str:
    """sha256 of what follows the safetensors header (the tensor data)."""
    (header_len,) = struct.unpack("<Q", blob[:8])
    return hashlib.sha256(blob[8 + header_len:]).hexdigest()


def model_hash(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """kohya's ``sshs_model_hash``: the data-section sha256 of a re-serialisation with only ss_* metadata."""
    from safetensors.torch import save

    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    blob = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=ss_only)
    return data_section_sha256(blob)


def with_model_hash(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """``metadata`` with a fresh ``sshs_model_hash`` (and no stale legacy hash) when it has ss_* keys."""
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    if any(k.startswith("ss_") for k in meta):
        meta["sshs_model_hash"] = model_hash(tensors, meta)
    return meta


def write_sidecars(path: str | Path, *, family: str, preview: str | Path | None = None,
                   activation_text: str = "", preferred_weight: float = 1.0, description: str = "") -> list[Path]:
    """``NAME.preview.png`` (when a preview exists) and ``NAME.json`` (A1111 user metadata) next to ``path``."""
    from PIL import Image

    path = Path(path)
    stem = path.name.removesuffix(".safetensors")
    written = []
    if preview is not None and Path(preview).is_file():
        target = path.with_name(f"{stem}.preview.png")
        with Image.open(preview) as image:
            rgb = image.convert("RGB")
        atomic_write(target, lambda tmp: rgb.save(tmp, format="PNG"))
        written.append(target)
    user = {"description": description, "sd version": SD_VERSION_LABEL.get(family, "Unknown"),
            "activation text": activation_text, "preferred weight": float(preferred_weight), "notes": ""}
    target = path.with_name(f"{stem}.json")
    atomic_write_text(target, json.dumps(user, indent=4, ensure_ascii=False) + "\n")
    written.append(target)
    return written
