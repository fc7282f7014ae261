"""kohya/LyCORIS ``.safetensors`` adapter files, the format A1111, Forge and ComfyUI load
(specs/webui-formats.md §1-3, export checklist §0.1).

A file is one flat ``{"<module>.<suffix>": tensor}`` dict plus string metadata. ``<module>`` is a kohya name
without dots (see ``names.py``); ``<suffix>`` is a method key (``lora_up.weight``, ``hada_w1_a``, ``lokr_w1``,
``oft_blocks``, ``alpha``). Every module carries one 0-d ``alpha`` > 0; ``.scale`` and ``.bias`` are never
written (A1111 would honour them and ComfyUI would not).

Writing follows the portability rules of the spec: LoKr with both factors full gets its scale baked into
``lokr_w1`` and ``alpha = rank`` (every loader uses scale 1 there); ``lokr_w2_b`` is 2-D; HRA, which no WebUI
loads, is written as its exact LoRA against the base weights (optionally OFT too, for Forge); the SD2 text
encoder and SDXL's second one always get q, k, v and out of a layer together (A1111 drops the layer otherwise).
Reading accepts third-party files: PEFT ``lora_A``/``lora_B`` aliases, a missing alpha (scale 1), old
LyCORIS ``oft_diag`` rotations.
"""

from __future__ import annotations

import json
import re
import struct
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lycotrain.adapters import Adapter
from lycotrain.atomic import atomic_write
from lycotrain.errors import FormatError
from lycotrain.formats.lowrank import lora_from_delta
from lycotrain.formats.names import FAMILIES, LDMNameMap, ModelNames, UNetLayout, model_names

DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "fp32": torch.float32}

# every suffix a module of each method may carry (alpha included); what the WebUIs detect, per §4
METHOD_KEYS: dict[str, frozenset[str]] = {
    "lora": frozenset({"lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha"}),
    "loha": frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"}),
    "lokr": frozenset({"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
                       "alpha"}),
    "oft": frozenset({"oft_blocks", "rescale", "alpha"}),
    "oft_diag": frozenset({"oft_diag", "alpha"}),  # LyCORIS 2.0.x: the rotation R itself
    "hra": frozenset({"hra_u", "alpha"}),  # lycotrain's native file only; no WebUI loads it
}
# PEFT spellings that A1111 and ComfyUI also accept for LoRA
ALIASES = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
# TE modules that A1111 applies only as a complete q, k, v, out group (fused MultiheadAttention, §2.3)
_QKVO = ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj")
_QKVO_RE = re.compile(r"^(lora_te2?_text_model_encoder_layers_\d+)_(self_attn_(?:q|k|v|out)_proj)$")

Tensors = dict[str, torch.Tensor]


# ---- reading ----------------------------------------------------------------------------------------
@dataclass
class AdapterFile:
    """A kohya/LyCORIS file in memory: module name -> {suffix: tensor}, and the string metadata."""

    modules: dict[str, Tensors]
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<memory>"

    def method_of(self, name: str) -> str:
        native = self.native_hyperparameters()
        if native is not None and name in native:
            return native[name]["method"]
        return detect_method(name, self.modules[name], self.source)

    def methods(self) -> Counter[str]:
        return Counter(self.method_of(name) for name in self.modules)

    def rank_of(self, name: str) -> int | None:
        return module_rank(self.method_of(name), self.modules[name])

    def state_dict(self) -> Tensors:
        return {f"{name}.{key}": value for name, tensors in self.modules.items() for key, value in tensors.items()}

    def native_hyperparameters(self) -> dict[str, dict[str, Any]] | None:
        """name -> {"method", constructor arguments} for lycotrain's native files; None for WebUI files."""
        if self.metadata.get("lycotrain_format") != "native":
            return None
        try:
            return json.loads(self.metadata["lycotrain_modules"])
        except (KeyError, json.JSONDecodeError) as exc:
            raise FormatError(f"{self.source}: damaged lycotrain metadata ({exc}); re-export the adapter") from None


def detect_method(name: str, tensors: Mapping[str, torch.Tensor], source: str = "file") -> str:
    """The method a module's keys belong to, as the WebUIs detect it; FormatError for anything else."""
    keys = set(tensors)
    if {"lora_up.weight", "lora_down.weight"} <= keys:
        method = "lora"
    elif {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= keys:
        method = "loha"
    elif ("lokr_w1" in keys or {"lokr_w1_a", "lokr_w1_b"} <= keys) and \
            ("lokr_w2" in keys or {"lokr_w2_a", "lokr_w2_b"} <= keys):
        method = "lokr"
    elif "oft_blocks" in keys:
        if tensors["oft_blocks"].dim() != 3:
            raise FormatError(f"{source}: module {name} has a {tensors['oft_blocks'].dim()}-D oft_blocks "
                              "(BOFT); lycotrain reads diag-OFT (3-D oft_blocks) only")
        method = "oft"
    elif "oft_diag" in keys:
        method = "oft_diag"
    elif "hra_u" in keys:
        method = "hra"
    else:
        raise FormatError(f"{source}: module {name} has keys {sorted(keys)} that match no known method "
                          "(LoRA, LoHa, LoKr, OFT, HRA)")
    extra = keys - METHOD_KEYS[method]
    if extra:
        raise FormatError(f"{source}: module {name} ({method}) has unexpected keys {sorted(extra)}")
    return method


def module_rank(method: str, tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The rank the WebUIs divide alpha by (§4); None where there is none (LoKr both full, OFT)."""
    if method == "lora":
        return int(tensors["lora_down.weight"].shape[0])
    if method == "loha":
        return int(tensors["hada_w1_b"].shape[0])
    if method == "lokr":
        if "lokr_w2_b" in tensors:
            return int(tensors["lokr_w2_b"].shape[0])
        if "lokr_w1_b" in tensors:
            return int(tensors["lokr_w1_b"].shape[0])
        return None
    if method == "hra":
        return int(tensors["hra_u"].shape[-1])
    return None


def _check_header(path: Path) -> None:
    """Fail early, with a message a user understands, on files that are not safetensors at all."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        raise FormatError(f"{path}: file too short ({size} bytes) to be a .safetensors file")
    (header_len,) = struct.unpack("<Q", head[:8])
    if head[8:9] != b"{" or header_len + 8 > size:
        raise FormatError(f"{path}: not a .safetensors file (no valid header); was it truncated, or is it a "
                          ".ckpt/.pt pickle? Convert it to .safetensors first")


def _refuse_model_checkpoint(path: Path, keys: list[str]) -> None:
    """A file without a single adapter key is a model given where the adapter belongs (FILE and --model swapped)."""
    adapter_suffixes = tuple(frozenset().union(*METHOD_KEYS.values(), ALIASES) - {"alpha"})
    if keys and not any(key.startswith("lora_") or key.endswith(adapter_suffixes) for key in keys):
        raise FormatError(f"{path}: no LoRA/LyCORIS adapter weights (keys like {keys[0]!r}); this looks like a "
                          "model checkpoint: give it as --model, and the adapter file as FILE")


def read_adapter_file(path: str | Path) -> AdapterFile:
    """Read a kohya/LyCORIS file. Raises FormatError naming the file for unreadable or foreign content."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        raise FormatError(f"{path} is a folder; give the adapter .safetensors file (a run folder holds "
                          "NAME.safetensors)")
    if not path.is_file():
        raise FormatError(f"{path}: no such file")
    _check_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            _refuse_model_checkpoint(path, list(f.keys()))  # before reading gigabytes of weights
            flat = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise FormatError(f"{path}: cannot read the safetensors data ({exc}); the file is damaged or "
                          "truncated: download or export it again") from None
    modules: dict[str, Tensors] = {}
    for key, value in flat.items():
        name, dot, suffix = key.partition(".")
        if not dot:
            raise FormatError(f"{path}: key {key!r} is not '<module>.<param>'; this is not a kohya/LyCORIS "
                              "adapter file (a full checkpoint or a diffusers/PEFT file?)")
        modules.setdefault(name, {})[ALIASES.get(suffix, suffix)] = value
    if not modules:
        raise FormatError(f"{path}: the file holds no tensors")
    result = AdapterFile(modules, metadata, str(path))
    for name in modules:
        result.method_of(name)  # reject unknown methods now, naming the module
    return result


def load_webui_file(path: str | Path) -> tuple[dict[str, Tensors], dict[str, str]]:
    """``(modules, metadata)`` of a kohya/LyCORIS file; ``modules[name][suffix]`` are the stored tensors."""
    file = read_adapter_file(path)
    return file.modules, file.metadata


# ---- writing ----------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    path: Path
    native_path: Path | None = None  # lycotrain file with the native parameters (HRA / OFT written as LoRA)
    converted: dict[str, float] = field(default_factory=dict)  # module -> max |delta error| of the LoRA route
    padded: list[str] = field(default_factory=list)  # zero modules added to complete a q, k, v, out group
    baked: list[str] = field(default_factory=list)  # OFT modules whose constraint was baked into the blocks
    warnings: list[str] = field(default_factory=list)

    @property
    def max_conversion_error(self) -> float:
        return max(self.converted.values(), default=0.0)


def _positive_alpha(name: str, alpha: torch.Tensor | float, rank: int) -> torch.Tensor:
    value = float(alpha)
    if value < 0:
        raise FormatError(f"module {name}: alpha {value} is negative; WebUIs need alpha > 0")
    return torch.tensor(value if value > 0 else float(rank))


def _lora_route(adapter: Adapter, oft_as_lora: bool) -> tuple[Tensors, float] | None:
    """The exact LoRA of the adapter's delta against its own base weight (HRA always, OFT on request), with the
    max |delta error|; None for methods that are written as themselves."""
    if adapter.method == "hra":
        from lycotrain.adapters.hra import hra_to_lora_factors

        up, down = hra_to_lora_factors(adapter.base.weight, adapter.hra_u, adapter.apply_gs)
        rank = down.shape[0]
        tensors = {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(float(rank))}
        product = up.double().reshape(up.shape[0], rank) @ down.double().reshape(rank, -1)
        error = float((product.reshape(adapter.base.weight.shape) - adapter.delta_weight(1.0).double()).abs().max())
        return tensors, error
    if adapter.method == "oft" and oft_as_lora:  # rank <= out: exact by SVD at full rank
        low = lora_from_delta(adapter.delta_weight(1.0), rank=min(adapter.out_features,
                                                                  adapter.base.weight[0].numel()))
        return low.tensors(), low.max_abs_error
    return None


def _lokr_tensors(name: str, adapter: Adapter) -> Tensors:
    """LoKr keys as every loader reads them (our LoKr never makes ``lokr_t2``, which ComfyUI/Forge fail on)."""
    tensors = dict(adapter.adapter_state_dict())
    if "lokr_w2_b" in tensors:
        tensors["lokr_w2_b"] = tensors["lokr_w2_b"].reshape(tensors["lokr_w2_b"].shape[0], -1)
    both_full = "lokr_w1" in tensors and "lokr_w2" in tensors
    rank = int(adapter.hyperparameters().get("rank", 1))
    if both_full:
        # every loader uses scale 1 here and ignores alpha: bake our scale into w1, store alpha = rank
        tensors["lokr_w1"] = tensors["lokr_w1"].float() * float(adapter.scale)
        tensors["alpha"] = torch.tensor(float(rank))
    else:
        tensors["alpha"] = _positive_alpha(name, tensors["alpha"], rank)
    return tensors


def _oft_tensors(adapter: Adapter, tensors: Tensors) -> Tensors:
    """OFT with the constraint baked in: the loaders disagree on what alpha bounds (alpha*out in A1111, alpha in
    ComfyUI), but all of them agree on unconstrained blocks. Storing the clamped skew part Q/2 with alpha 0
    gives every loader the rotation we trained with."""
    bound = float(tensors["alpha"]) * adapter.out_features
    if bound > 0:
        blocks = tensors["oft_blocks"].double()
        skew = blocks - blocks.transpose(1, 2)
        norm = float(skew.norm())
        if norm > bound:
            skew = skew * (bound / norm)
        tensors["oft_blocks"] = (skew / 2).float()  # (Q/2) - (Q/2)^T = Q: unconstrained blocks, same rotation
    tensors["alpha"] = torch.tensor(0.0)
    return tensors


def cayley_blocks(rotation: torch.Tensor) -> torch.Tensor:
    """Blocks B with Cayley(B) = R: Q = (R - I)(R + I)^-1 is skew-symmetric and B = Q / 2 has B - B^T = Q."""
    rotation = rotation.double()
    eye = torch.eye(rotation.shape[-1], dtype=rotation.dtype).expand_as(rotation)
    skew = (rotation - eye) @ torch.linalg.inv(rotation + eye)
    return (skew / 2).float()


def _module_tensors(name: str, adapter: Adapter, oft_as_lora: bool) -> tuple[Tensors, float | None]:
    """(file tensors, max error of the LoRA route or None) for one adapter."""
    method = adapter.method
    route = _lora_route(adapter, oft_as_lora)
    if route is not None:
        return route
    if method == "lokr":
        return _lokr_tensors(name, adapter), None
    tensors = dict(adapter.adapter_state_dict())
    if method == "oft":
        return _oft_tensors(adapter, tensors), None
    if method not in METHOD_KEYS:
        raise FormatError(f"module {name}: method {method!r} has no WebUI file format")
    rank = module_rank(method, tensors) or 1
    tensors["alpha"] = _positive_alpha(name, tensors["alpha"], rank)
    return tensors, None


def _complete_qkvo(modules: dict[str, Tensors], adapters: Mapping[str, Adapter], family: str) -> list[str]:
    """Add zero LoRA modules so every SD2-TE / SDXL-TE2 attention has all of q, k, v, out (A1111 rule)."""
    prefix = {"sd2": "lora_te_", "sdxl": "lora_te2_"}.get(family)
    if prefix is None:
        return []
    groups: dict[str, int] = {}
    for name, adapter in adapters.items():
        match = _QKVO_RE.match(name)
        if match and name.startswith(prefix):
            groups[match.group(1)] = adapter.in_features
    padded = []
    for layer, width in sorted(groups.items()):
        for leaf in _QKVO:
            name = f"{layer}_{leaf}"
            if name not in modules:
                modules[name] = {"lora_up.weight": torch.zeros(width, 1), "lora_down.weight": torch.zeros(1, width),
                                 "alpha": torch.tensor(1.0)}
                padded.append(name)
    return padded


def file_names(adapters: Mapping[str, Adapter], family: str,
               unet_config: Mapping[str, Any] | None) -> dict[str, str]:
    """Internal (inject) name -> name written in the file: LDM names for the SDXL UNet, else unchanged."""
    family = family.removesuffix("-v")  # sd2-v names its layers like sd2
    if family not in FAMILIES:
        raise FormatError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")
    if family != "sdxl" or not any(n.startswith("lora_unet_") for n in adapters):
        return {name: name for name in adapters}
    if unet_config is None:
        raise FormatError("SDXL export needs the UNet config (unet.config) to map names to LDM blocks")
    sdxl = LDMNameMap(UNetLayout.from_config(unet_config))
    names = {}
    for name in adapters:
        ldm = sdxl.to_ldm(name) if name.startswith("lora_unet_") else name
        if ldm is None:
            raise FormatError(f"module {name} has no SDXL (LDM) name; it cannot be exported for WebUIs")
        names[name] = ldm
    return names


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """Atomic safetensors write; metadata values must be strings (safetensors and A1111 require it)."""
    from safetensors.torch import save_file

    bad = [k for k, v in metadata.items() if not isinstance(v, str)]
    if bad:
        raise FormatError(f"metadata values must be strings; not: {bad}")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(contiguous, str(tmp), metadata=dict(metadata)))


def native_path_for(path: str | Path) -> Path:
    """``NAME.safetensors`` -> ``NAME.lycotrain.safetensors`` (native parameters, for resuming)."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".safetensors") + ".lycotrain.safetensors")


def webui_tensors(adapters: Mapping[str, Adapter], *, family: str, unet_config: Mapping[str, Any] | None = None,
                  dtype: str = "fp16", oft_as_lora: bool = False) -> tuple[Tensors, ExportResult]:
    """The flat tensor dict of the WebUI file (arithmetic in fp32, stored in ``dtype``; alpha stays fp32)."""
    if dtype not in DTYPES:
        raise FormatError(f"unknown dtype {dtype!r}; choose fp16 or fp32")
    result = ExportResult(Path())
    names = file_names(adapters, family, unet_config)
    modules: dict[str, Tensors] = {}
    rescaled: list[str] = []
    with torch.no_grad():
        for name, adapter in adapters.items():
            if adapter.merged:
                raise FormatError(f"module {name} is merged into its base weight; unmerge before exporting")
            if "." in names[name]:
                raise FormatError(f"module name {names[name]!r} contains a dot; A1111 cannot match it")
            tensors, error = _module_tensors(name, adapter, oft_as_lora)
            modules[names[name]] = tensors
            if "rescale" in tensors:
                rescaled.append(names[name])
            if adapter.method == "oft" and float(adapter.adapter_state_dict()["alpha"]) > 0:
                result.baked.append(names[name])
            if error is not None:
                result.converted[names[name]] = error
        result.padded = _complete_qkvo(modules, adapters, family.removesuffix("-v"))
    if rescaled:
        result.warnings.append(f"{len(rescaled)} OFT module(s) with rescale (e.g. {rescaled[0]}): ComfyUI ignores "
                               "the rescale and Forge does not load OFT; train without rescale, or export with "
                               "oft_as_lora for identical results everywhere")
    flat = {f"{name}.{key}": (value.float() if key == "alpha" else value.float().to(DTYPES[dtype]))
            for name, tensors in modules.items() for key, value in tensors.items()}
    return flat, result


def save_webui_file(path: str | Path, adapters: Mapping[str, Adapter], *, family: str,
                    unet_config: Mapping[str, Any] | None = None, metadata: Mapping[str, str] | None = None,
                    dtype: str = "fp16", oft_as_lora: bool = False) -> ExportResult:
    """Write ``adapters`` (kohya name -> Adapter, e.g. an ``AdapterSet``) as a WebUI file at ``path``.

    ``family`` is ``sd1``/``sd2``/``sdxl``; SDXL needs ``unet_config`` (``unet.config``) to derive the LDM
    names. ``metadata`` comes from ``metadata.build_metadata``; ``sshs_model_hash`` is computed here.
    HRA modules (and OFT with ``oft_as_lora``) are written as their LoRA against the base weights, and an OFT
    constraint is baked into the blocks; then the native parameters also go to ``NAME.lycotrain.safetensors``
    (``native_path_for``) for resuming.
    """
    from lycotrain.formats.metadata import with_model_hash

    flat, result = webui_tensors(adapters, family=family, unet_config=unet_config, dtype=dtype,
                                 oft_as_lora=oft_as_lora)
    result.path = Path(path)
    write_safetensors(path, flat, with_model_hash(flat, metadata or {}))
    if result.converted or result.baked:  # the WebUI file alone would not resume the same adapters
        result.native_path = save_native_file(native_path_for(path), adapters, metadata=metadata or {})
    return result


def save_native_file(path: str | Path, adapters: Mapping[str, Adapter], *,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Every adapter's own parameters (internal names, fp32) plus their hyperparameters, for resuming."""
    flat = {f"{name}.{key}": value.float() for name, a in adapters.items()
            for key, value in a.adapter_state_dict().items()}
    hyper = {name: {"method": a.method, **a.hyperparameters()} for name, a in adapters.items()}
    meta = {**(metadata or {}), "lycotrain_format": "native", "lycotrain_modules": json.dumps(hyper)}
    write_safetensors(path, flat, meta)
    return Path(path)


# ---- import onto a model ----------------------------------------------------------------------------
def _alpha(tensors: Mapping[str, torch.Tensor], rank: int) -> float:
    """Missing alpha means scale 1 (alpha = rank), as in every loader."""
    return float(tensors["alpha"]) if "alpha" in tensors else float(rank)


def _lora_kwargs(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    rank = int(tensors["lora_down.weight"].shape[0])
    return {"rank": rank, "alpha": _alpha(tensors, rank), "use_tucker": "lora_mid.weight" in tensors}


def _loha_kwargs(tensors: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    rank = int(tensors["hada_w1_b"].shape[0])
    return {"rank": rank, "alpha": _alpha(tensors, rank), "use_tucker": "hada_t1" in tensors}


def _lokr_kwargs(tensors: Mapping[str, torch.Tensor], layer: nn.Linear | nn.Conv2d) -> dict[str, Any]:
    """Constructor arguments whose LyCORIS layout reproduces the stored shapes (factor searched among the
    values that can produce them)."""
    from lycotrain.adapters.lokr import lokr_layout

    out, inp = layer.weight.shape[0], layer.weight.shape[1]
    w1_shape = tensors["lokr_w1"].shape if "lokr_w1" in tensors else \
        (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1])
    a, c = int(w1_shape[0]), int(w1_shape[1])
    w1_full, w2_full = "lokr_w1" in tensors, "lokr_w2" in tensors
    rank = module_rank("lokr", tensors)
    if rank is None:  # both full: alpha is ignored by every loader, full_matrix keeps both full
        rank = max(1, int(float(tensors.get("alpha", 1.0))))
    wanted = (a, out // a, c, inp // c, w1_full, w2_full)
    for full_matrix in (False, True) if w1_full and w2_full else (False,):
        for factor in dict.fromkeys((-1, a, out // a, c, inp // c)):
            layout = lokr_layout(out, inp, rank, factor, decompose_both=not w1_full, full_matrix=full_matrix)
            if tuple(layout) == wanted:
                return {"rank": rank, "alpha": _alpha(tensors, rank), "factor": factor,
                        "decompose_both": not w1_full, "full_matrix": full_matrix}
    raise FormatError(f"LoKr factors W1 {tuple(w1_shape)} with rank {rank} on a {out}x{inp} layer follow no "
                      "LyCORIS layout lycotrain can rebuild")


def _oft_kwargs(tensors: Mapping[str, torch.Tensor], layer: nn.Linear | nn.Conv2d) -> dict[str, Any]:
    n, bs, _ = tensors["oft_blocks"].shape
    if bs > n:
        raise FormatError(f"OFT with {n} blocks of size {bs} (kohya layout) cannot be rebuilt; lycotrain uses "
                          "LyCORIS's geometry (block size <= block count)")
    return {"block_size": int(bs), "constraint": float(tensors.get("alpha", 0.0)), "rescaled": "rescale" in tensors}


def _oft_diag_blocks(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    """Old LyCORIS files store the rotation R itself; its Cayley inverse gives unconstrained blocks."""
    return {"oft_blocks": cayley_blocks(tensors["oft_diag"]), "alpha": torch.tensor(0.0)}


@dataclass(frozen=True)
class Importer:
    """How a stored method becomes a lycotrain adapter: its method, constructor arguments, tensors."""

    method: str
    kwargs: Callable[[Mapping[str, torch.Tensor], nn.Linear | nn.Conv2d], dict[str, Any]]
    tensors: Callable[[Mapping[str, torch.Tensor]], Tensors] = dict


IMPORTERS: dict[str, Importer] = {
    "lora": Importer("lora", lambda t, _: _lora_kwargs(t)),
    "loha": Importer("loha", lambda t, _: _loha_kwargs(t)),
    "lokr": Importer("lokr", _lokr_kwargs),
    "oft": Importer("oft", _oft_kwargs),
    "oft_diag": Importer("oft", lambda t, layer: _oft_kwargs(_oft_diag_blocks(t), layer), _oft_diag_blocks),
}


def _fit(name: str, key: str, value: torch.Tensor, target: torch.Tensor, source: str) -> torch.Tensor:
    """Reshape a stored tensor to the adapter's parameter shape (2-D vs 4-D layouts hold the same numbers)."""
    if value.shape == target.shape:
        return value
    if value.numel() == target.numel():
        return value.reshape(target.shape)
    raise FormatError(f"{source}: {name}.{key} has shape {tuple(value.shape)} but the model's layer needs "
                      f"{tuple(target.shape)}; the file was made for another model")


def _is_padding(tensors: Mapping[str, torch.Tensor]) -> bool:
    """A zero module added only to complete a q, k, v, out group: nothing to train or merge."""
    return all(not bool(v.any()) for k, v in tensors.items() if k != "alpha")


@dataclass
class ModulePlan:
    """What one file module becomes: an adapter of ``method`` built with ``kwargs`` holding ``tensors``."""

    method: str
    kwargs: dict[str, Any]
    tensors: Tensors


def plan_module(file: AdapterFile, name: str, layer: nn.Linear | nn.Conv2d) -> ModulePlan:
    """How module ``name`` of ``file`` is rebuilt on ``layer`` (native files carry their hyperparameters)."""
    tensors = file.modules[name]
    hyper = file.native_hyperparameters()
    if hyper is not None:
        params = dict(hyper[name])
        return ModulePlan(params.pop("method"), params, dict(tensors))
    method = file.method_of(name)
    if method not in IMPORTERS:
        raise FormatError(f"{file.source}: module {name}: importing {method} is not supported")
    importer = IMPORTERS[method]
    try:
        kwargs = importer.kwargs(tensors, layer)
    except FormatError as exc:
        raise FormatError(f"{file.source}: module {name}: {exc}") from None
    return ModulePlan(importer.method, kwargs, importer.tensors(tensors))


def load_module_tensors(adapter: Adapter, tensors: Mapping[str, torch.Tensor], *, name: str,
                        source: str = "file") -> None:
    """Copy a module's stored tensors into ``adapter`` (cast to its dtype, 2-D/4-D layouts reconciled)."""
    own = adapter.adapter_state_dict()
    tensors = dict(tensors)
    if "alpha" in own:
        tensors["alpha"] = torch.tensor(_alpha(tensors, module_rank(adapter.method, tensors) or 1))
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise FormatError(f"{source}: module {name} lacks {missing} / has unexpected {unexpected} for a "
                          f"{adapter.method} adapter built from its shapes")
    fitted = {k: _fit(name, k, v, own[k], source).to(own[k].dtype) for k, v in tensors.items()}
    adapter.load_state_dict(fitted, strict=False)


def adapter_from_tensors(file: AdapterFile, name: str, layer: nn.Linear | nn.Conv2d) -> Adapter:
    """A stand-alone adapter around ``layer`` holding module ``name`` of ``file``; the model is left as it was
    (the layer is not replaced and keeps its ``requires_grad`` flags)."""
    from lycotrain.adapters import build_adapter

    plan = plan_module(file, name, layer)
    flags = [(p, p.requires_grad) for p in layer.parameters()]
    adapter = build_adapter(plan.method, layer, **plan.kwargs)
    for param, flag in flags:
        param.requires_grad_(flag)
    load_module_tensors(adapter, plan.tensors, name=name, source=file.source)
    return adapter


def names_fitting_file(components: Mapping[str, nn.Module], file: AdapterFile) -> ModelNames:
    """The model's names, after checking that every module of ``file`` names one of its layers."""
    names = model_names(components)
    unknown = sorted(n for n in file.modules if n not in names.from_file)
    if unknown:
        raise FormatError(f"{file.source}: {len(unknown)} of {len(file.modules)} module(s) name no layer of this "
                          f"{names.family} model, e.g. {unknown[:5]}; the file was made for another architecture")
    return names


def apply_file(components: Mapping[str, nn.Module], file: AdapterFile | str | Path, *,
               multiplier: float = 1.0):
    """Inject the adapters stored in ``file`` into ``components`` (``unet``, ``text_encoder``[, ``_2``]) and
    load their tensors: to continue training, to merge, or to check. Returns the ``AdapterSet``.

    Works for WebUI files (ours or third-party) and native ``.lycotrain.safetensors`` files. Zero modules that
    only complete a q, k, v, out group are skipped. A file that does not fit the model raises a FormatError
    that names the modules and why.
    """
    from lycotrain.inject import AdapterSet, component_prefix, inject

    if not isinstance(file, AdapterFile):
        file = read_adapter_file(file)
    names = names_fitting_file(components, file)
    prefixes = {c: component_prefix(c, names.family) for c in components}
    plans: dict[tuple[str, str], dict[str, ModulePlan]] = {}
    for file_name, tensors in file.modules.items():
        if _is_padding(tensors):
            continue
        internal = names.from_file[file_name]
        plan = plan_module(file, file_name, names.layers[internal])
        component = next(c for c, p in prefixes.items() if internal.startswith(p))
        plans.setdefault((component, plan.method), {})[internal] = plan
    parts = []
    try:
        for (component, method), modules in plans.items():
            part = inject(components[component], prefix=prefixes[component], method=method,
                          params=next(iter(modules.values())).kwargs, preset="full",
                          include=[f"^{re.escape(n)}$" for n in modules],
                          overrides=[(f"^{re.escape(n)}$", p.kwargs) for n, p in modules.items()])
            parts.append(part)
            missing = sorted(set(modules) - set(part))
            if missing:
                raise FormatError(f"{file.source}: lycotrain cannot adapt {missing[:5]} ({len(missing)} layers "
                                  "outside its target presets)")
            for internal, plan in modules.items():
                load_module_tensors(part[internal], plan.tensors, name=names.file_name(internal),
                                    source=file.source)
    except Exception:
        for part in parts:
            part.remove()
        raise
    adapters = AdapterSet.join(parts)
    adapters.set_multiplier(multiplier)
    return adapters
