"""PEFT folders: ``adapter_config.json`` + ``adapter_model.safetensors``, read and written without peft.

Key names (specs/peft-methods.md §0): ``base_model.model.<module path>.<tensor>`` with the adapter name
removed, e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (LoRA),
``….q_proj.lora_E`` (AdaLoRA, no ``.weight``), ``….self_attn.adaption_prompt`` (Llama-Adapter). The JSON
holds only what PEFT needs (``peft_type`` plus the fields that shape the tensors); PEFT fills in the rest.

This module knows tensors and names only; which module of which model they belong to is the text task's job.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lycotrain.atomic import atomic_write, atomic_write_text
from lycotrain.errors import FormatError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."
PEFT_VERSION = "0.21.2"  # the PEFT release the folders are checked against

# tensor suffixes per method, in the order they are written
LORA_TENSORS = ("lora_A.weight", "lora_B.weight")
ADALORA_TENSORS = ("lora_A", "lora_E", "lora_B")
ADAPTION_TENSORS = ("adaption_prompt", "adaption_gate")
PEFT_TYPES = {"lora": "LORA", "adalora": "ADALORA", "llama_adapter": "ADAPTION_PROMPT", "xlora": "XLORA"}
METHOD_OF_PEFT_TYPE = {v: k for k, v in PEFT_TYPES.items()}
SUFFIXES = {"LORA": LORA_TENSORS, "ADALORA": ADALORA_TENSORS, "ADAPTION_PROMPT": ADAPTION_TENSORS}


# ---- keys -------------------------------------------------------------------------------------------
def peft_key(module_path: str, tensor: str) -> str:
    return f"{KEY_PREFIX}{module_path}.{tensor}"


def group_by_module(tensors: dict[str, torch.Tensor], suffixes: tuple[str, ...], source: str | Path
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {tensor name: tensor}}`` from PEFT keys; unknown keys raise FormatError."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        suffix = next((s for s in suffixes if key.endswith("." + s)), None)
        if not key.startswith(KEY_PREFIX) or suffix is None:
            raise FormatError(f"{source}: unexpected tensor {key!r}; expected base_model.model.<module>."
                              f"{{{', '.join(suffixes)}}}")
        modules.setdefault(key[len(KEY_PREFIX): -len(suffix) - 1], {})[suffix] = value
    for path, parts in modules.items():
        missing = [s for s in suffixes if s not in parts]
        if missing:
            raise FormatError(f"{source}: module {path} lacks {', '.join(missing)}")
    return modules


# ---- config JSON ------------------------------------------------------------------------------------
def lora_config(*, rank: int, alpha: float, target_modules: list[str], dropout: float = 0.0,
                fan_in_fan_out: bool = False, base_model: str | None = None) -> dict[str, Any]:
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": int(rank), "lora_alpha": float(alpha),
            "lora_dropout": float(dropout), "target_modules": sorted(target_modules), "bias": "none",
            "fan_in_fan_out": fan_in_fan_out, "base_model_name_or_path": base_model, "peft_version": PEFT_VERSION}


def adalora_config(*, init_r: int, target_r: int, alpha: float, target_modules: list[str], total_step: int,
                   tinit: int, tfinal: int, delta_t: int, beta1: float, beta2: float, orth_reg_weight: float,
                   rank_pattern: dict[str, list[bool]] | None, dropout: float = 0.0, fan_in_fan_out: bool = False,
                   base_model: str | None = None) -> dict[str, Any]:
    """``rank_pattern`` keys are module paths; PEFT wants them as ``<path>.lora_E``."""
    pattern = None if rank_pattern is None else {f"{p}.lora_E": list(v) for p, v in sorted(rank_pattern.items())}
    # no "r": PEFT ignores it for AdaLoRA and warns when it is not its default
    return {"peft_type": "ADALORA", "task_type": "CAUSAL_LM", "init_r": int(init_r),
            "target_r": int(target_r), "lora_alpha": float(alpha), "lora_dropout": float(dropout),
            "target_modules": sorted(target_modules), "bias": "none", "fan_in_fan_out": fan_in_fan_out,
            "total_step": int(total_step), "tinit": int(tinit), "tfinal": int(tfinal), "deltaT": int(delta_t),
            "beta1": float(beta1), "beta2": float(beta2), "orth_reg_weight": float(orth_reg_weight),
            "rank_pattern": pattern, "base_model_name_or_path": base_model, "peft_version": PEFT_VERSION}


def adaption_prompt_config(*, adapter_len: int, adapter_layers: int, target_module: str,
                           base_model: str | None = None) -> dict[str, Any]:
    return {"peft_type": "ADAPTION_PROMPT", "task_type": "CAUSAL_LM", "adapter_len": int(adapter_len),
            "adapter_layers": int(adapter_layers), "target_modules": target_module,
            "base_model_name_or_path": base_model, "peft_version": PEFT_VERSION}


def rank_pattern_from_config(config: dict[str, Any]) -> dict[str, list[bool]] | None:
    """AdaLoRA ``rank_pattern`` with module-path keys (``.lora_E`` and any adapter name stripped)."""
    pattern = config.get("rank_pattern")
    if not pattern:
        return None
    out = {}
    for key, kept in pattern.items():
        path = key.removesuffix(".default").removesuffix(".lora_E")
        out[path] = [bool(k) for k in kept]
    return out


# ---- files ------------------------------------------------------------------------------------------
def write_peft_folder(folder: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                      dtype: torch.dtype | None = None) -> Path:
    """Write the two files atomically (each one whole or not at all). ``dtype`` casts floating tensors."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ready = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().clone()
             for k, v in tensors.items()}
    atomic_write(folder / WEIGHTS_FILE, lambda p: save_file(ready, str(p), metadata={"format": "pt"}))
    atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True))
    return folder


def read_peft_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FormatError(f"{folder}: no {CONFIG_FILE}; give a PEFT adapter folder (adapter_config.json + "
                          f"{WEIGHTS_FILE})")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise FormatError(f"{path}: no peft_type field; is this a PEFT adapter folder?")
    return config


def read_peft_folder(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config, tensors) of a PEFT folder; only the safetensors weights file is read (never pickle)."""
    config = read_peft_config(folder)
    weights = Path(folder) / WEIGHTS_FILE
    if not weights.is_file():
        raise FormatError(f"{folder}: no {WEIGHTS_FILE} (a .bin file is not read: re-save it as safetensors)")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as exc:
        raise FormatError(f"{weights}: cannot read ({exc})") from None
    return config, tensors
