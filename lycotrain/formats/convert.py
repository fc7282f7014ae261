"""Conversions of adapter files: merge into a base model, extract a LoRA by SVD (from any adapter file, or from
the difference of two checkpoints), resize a LoRA's rank, and a summary for ``lycotrain inspect``.

Extraction is the best rank-r approximation (Eckart-Young) of each module's delta W; the error reported is
``||dW - up @ down||_F / ||dW||_F`` per module (0 when the rank reaches the delta's own rank).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lycotrain.errors import FormatError
from lycotrain.formats.kohya import (AdapterFile, adapter_from_tensors, names_fitting_file, read_adapter_file,
                                      write_safetensors)
from lycotrain.formats.lowrank import lora_from_delta
from lycotrain.formats.metadata import BASE_MODEL_VERSION, build_metadata, with_model_hash
from lycotrain.formats.names import model_names

DEFAULT_RESOLUTION = {"sd1": 512, "sd2": 768, "sdxl": 1024}


@dataclass
class Extraction:
    """A LoRA made by SVD, with the approximation error of every module."""

    file: AdapterFile
    errors: dict[str, float] = field(default_factory=dict)  # module -> relative Frobenius error

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def save(self, path: str | Path, dtype: str = "fp16") -> Path:
        from lycotrain.formats.kohya import DTYPES

        if dtype not in DTYPES:
            raise FormatError(f"unknown dtype {dtype!r}; choose fp16 or fp32")
        flat = {k: (v.float() if k.endswith(".alpha") else v.to(DTYPES[dtype]))
                for k, v in self.file.state_dict().items()}
        write_safetensors(path, flat, with_model_hash(flat, self.file.metadata))
        return Path(path)


# ---- merge ------------------------------------------------------------------------------------------
def merge_file(components: Mapping[str, nn.Module], file: AdapterFile | str | Path, multiplier: float = 1.0) -> int:
    """Add each module's delta W (lycotrain's own math, at ``multiplier``) to the base weights in place.

    The model keeps its plain layers (no adapter wrappers), ready to save. Returns the number of merged modules.
    """
    if not isinstance(file, AdapterFile):
        file = read_adapter_file(file)
    names = names_fitting_file(components, file)
    deltas = {}
    with torch.no_grad():
        for name in file.modules:  # compute every delta first: OFT's depends on the unmerged weight
            layer = names.layers[names.from_file[name]]
            deltas[name] = (layer, adapter_from_tensors(file, name, layer).delta_weight(multiplier))
        for layer, delta in deltas.values():
            layer.weight.copy_((layer.weight.float() + delta).to(layer.weight.dtype))
    return len(deltas)


# ---- extract / resize -------------------------------------------------------------------------------
def _lora_metadata(source: Mapping[str, str], rank: int | None, energy: float | None) -> dict[str, str]:
    """The source's metadata, relabelled as a plain LoRA (kohya ``networks.lora``)."""
    meta = {k: v for k, v in source.items() if not k.startswith(("ss_network_", "sshs_"))}
    if meta.get("lycotrain_format") == "native":
        meta = {k: v for k, v in meta.items() if not k.startswith("lycotrain_")}
    meta.update({"ss_network_module": "networks.lora", "ss_network_dim": str(rank) if rank else "Dynamic",
                 "ss_network_alpha": "Dynamic" if not rank else str(float(rank))})
    if energy is not None:
        meta["ss_network_args"] = json.dumps({"extract_energy": str(energy)})
    return meta


def _lora_module_delta(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """delta W of a LoRA module from its tensors alone (the WebUI formula, multiplier 1)."""
    from lycotrain.adapters.lora import lora_delta

    down, up, mid = tensors["lora_down.weight"], tensors["lora_up.weight"], tensors.get("lora_mid.weight")
    rank = down.shape[0]
    if down.dim() == 2:
        shape = torch.Size((up.shape[0], down.shape[1]))
    else:
        kernel = mid.shape[2:] if mid is not None else down.shape[2:]
        shape = torch.Size((up.shape[0], down.shape[1], *kernel))
    scale = float(tensors["alpha"]) / rank if "alpha" in tensors else 1.0
    return lora_delta(up, down, mid, scale, shape)


def _factorize(deltas: Mapping[str, torch.Tensor], rank: int | None, energy: float | None,
               metadata: Mapping[str, str], source: str) -> Extraction:
    modules, errors = {}, {}
    for name, delta in deltas.items():
        low = lora_from_delta(delta, rank=rank, energy=energy)
        modules[name] = low.tensors()
        errors[name] = low.rel_error
    return Extraction(AdapterFile(modules, _lora_metadata(metadata, rank, energy), source), errors)


def resize_lora(file: AdapterFile | str | Path, *, rank: int | None = None, energy: float | None = None) -> Extraction:
    """A LoRA file at a new rank (or the smallest rank keeping ``energy`` of each module's spectrum)."""
    if not isinstance(file, AdapterFile):
        file = read_adapter_file(file)
    methods = file.methods()
    if set(methods) != {"lora"}:
        raise FormatError(f"{file.source}: resize works on LoRA files; this one holds {dict(methods)}. Use "
                          "'lycotrain extract FILE --model ...' to turn other methods into a LoRA")
    deltas = {name: _lora_module_delta(t) for name, t in file.modules.items()}
    return _factorize(deltas, rank, energy, file.metadata, file.source)


def extract_from_file(file: AdapterFile | str | Path, components: Mapping[str, nn.Module], *,
                      rank: int | None = None, energy: float | None = None) -> Extraction:
    """A LoRA approximating any adapter file (LoHa, LoKr, OFT, native HRA ...) on its base model."""
    if not isinstance(file, AdapterFile):
        file = read_adapter_file(file)
    names = model_names(components)
    deltas = {}
    with torch.no_grad():
        for name in file.modules:
            if name not in names.from_file:
                raise FormatError(f"{file.source}: module {name} names no layer of this {names.family} model")
            layer = names.layers[names.from_file[name]]
            deltas[names.file_name(names.from_file[name])] = adapter_from_tensors(file, name, layer).delta_weight(1.0)
    return _factorize(deltas, rank, energy, file.metadata, file.source)


def extract_from_checkpoints(base: Mapping[str, nn.Module], tuned: Mapping[str, nn.Module], *,
                             rank: int | None = None, energy: float | None = None, min_diff: float = 1e-6,
                             output_name: str = "extracted") -> Extraction:
    """A LoRA of ``tuned - base`` over every Linear/Conv2d layer whose weight changed by more than ``min_diff``
    (relative max-abs), named as WebUIs expect for the base model's family."""
    base_names, tuned_names = model_names(base), model_names(tuned)
    if base_names.family != tuned_names.family or base_names.layers.keys() != tuned_names.layers.keys():
        raise FormatError(f"the two checkpoints differ in architecture ({base_names.family} vs "
                          f"{tuned_names.family}); extract needs a model and its fine-tuned version")
    deltas = {}
    with torch.no_grad():
        for name, layer in base_names.layers.items():
            other = tuned_names.layers[name].weight
            if other.shape != layer.weight.shape:
                raise FormatError(f"layer {name} has shape {tuple(layer.weight.shape)} in the base and "
                                  f"{tuple(other.shape)} in the tuned model")
            delta = other.float() - layer.weight.float()
            if float(delta.abs().max()) > min_diff * max(float(layer.weight.abs().max()), 1e-12):
                deltas[base_names.file_name(name)] = delta
    if not deltas:
        raise FormatError("the two checkpoints have identical weights; nothing to extract")
    family = base_names.family
    meta = build_metadata(family=family, method="lora", rank=rank or 0, alpha=float(rank or 0),
                          output_name=output_name, resolution=DEFAULT_RESOLUTION[family])
    return _factorize(deltas, rank, energy, meta, "checkpoint difference")


# ---- inspect ----------------------------------------------------------------------------------------
def _family_from_metadata(metadata: Mapping[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version", "")
    for family, prefix in BASE_MODEL_VERSION.items():
        if version.startswith(prefix):
            return family
    return None


def summarize(file: AdapterFile | str | Path) -> dict[str, Any]:
    """Method, modules, ranks, dtypes and metadata of an adapter file (``lycotrain inspect``)."""
    if not isinstance(file, AdapterFile):
        file = read_adapter_file(file)
    groups: dict[str, int] = {}
    for name in file.modules:
        prefix = "lora_unet" if name.startswith("lora_unet_") else name.split("_text_model")[0]
        groups[prefix] = groups.get(prefix, 0) + 1
    ranks: dict[str, int] = {}
    for name in file.modules:
        rank = file.rank_of(name)
        key = "none" if rank is None else str(rank)
        ranks[key] = ranks.get(key, 0) + 1
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for m in file.modules.values() for k, t in m.items()
                     if k != "alpha"})
    metadata = {k: _decode(v) for k, v in file.metadata.items() if k != "modelspec.thumbnail"}
    return {"file": file.source, "methods": dict(file.methods()), "modules": len(file.modules), "groups": groups,
            "ranks": ranks, "dtypes": dtypes, "family": _family_from_metadata(file.metadata),
            "native": file.native_hyperparameters() is not None, "metadata": metadata}


def _decode(value: str) -> Any:
    if value.startswith("{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def summary_text(summary: Mapping[str, Any]) -> str:
    lines = [f"{summary['file']}",
             f"  methods : {', '.join(f'{m} x{n}' for m, n in summary['methods'].items())}"
             + ("  (lycotrain native file, for resuming)" if summary["native"] else ""),
             f"  modules : {summary['modules']} ({', '.join(f'{g} {n}' for g, n in summary['groups'].items())})",
             f"  ranks   : {', '.join(f'{r} x{n}' for r, n in summary['ranks'].items())}",
             f"  dtypes  : {', '.join(summary['dtypes'])}",
             f"  family  : {summary['family'] or 'unknown (no ss_base_model_version)'}"]
    if summary["metadata"]:
        lines.append("  metadata:")
        for key, value in sorted(summary["metadata"].items()):
            text = json.dumps(value) if not isinstance(value, str) else value
            lines.append(f"    {key} = {text if len(text) <= 100 else text[:97] + '...'}")
    return "\n".join(lines)

