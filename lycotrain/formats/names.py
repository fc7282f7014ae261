"""Module names in WebUI files (specs/webui-formats.md §2).

A kohya module name is ``prefix + module_path.replace(".", "_")``:

* prefixes ``lora_unet_``, ``lora_te_`` (SD1/SD2), ``lora_te1_`` / ``lora_te2_`` (SDXL);
* text encoders always carry the ``text_model`` level (transformers 5 dropped it from ``CLIPTextModel``; no
  WebUI maps ``lora_te_encoder_layers_...``);
* SD1/SD2 UNet paths are diffusers paths; SDXL UNet paths are LDM/SGM paths (``input_blocks.4.1...``).

The diffusers -> LDM map is derived from the UNet's architecture (block count, layers per block, which blocks
have attention), not hard-coded for one model, so the tiny test UNets and the real SDXL get the same rules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from lycotrain.adapters.base import Adapter

UNET_PREFIX = "lora_unet_"
TE_PREFIXES: dict[str, str] = {"text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}
SDXL_TE_PREFIXES: dict[str, str] = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
FAMILIES = ("sd1", "sd2", "sdxl")

# diffusers ResnetBlock2D child -> LDM ResBlock child
_RESNET_LEAVES = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_TOP_LEVEL = {
    "conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0", "conv_out": "out.2",
}


@dataclass(frozen=True)
class UNetLayout:
    """What the LDM numbering depends on: resnets per block and which blocks have attention."""

    down_layers: tuple[int, ...]
    down_attention: tuple[bool, ...]
    up_attention: tuple[bool, ...]

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetLayout:
        down_types = tuple(config["down_block_types"])
        up_types = tuple(config["up_block_types"])
        layers = config.get("layers_per_block", 2)
        down_layers = tuple(layers) if isinstance(layers, (list, tuple)) else (int(layers),) * len(down_types)
        return cls(down_layers, tuple("CrossAttn" in t for t in down_types), tuple("CrossAttn" in t for t in up_types))

    def block_map(self) -> dict[str, str]:
        """diffusers block path -> LDM block path (resnets, attentions, samplers)."""
        mapping: dict[str, str] = {}
        index = 1  # input_blocks.0 is conv_in
        n = len(self.down_layers)
        for i, layers in enumerate(self.down_layers):
            for j in range(layers):
                mapping[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
                if self.down_attention[i]:
                    mapping[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
                index += 1
            if i < n - 1:
                mapping[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
                index += 1
        mapping["mid_block.resnets.0"] = "middle_block.0"
        mapping["mid_block.attentions.0"] = "middle_block.1"
        mapping["mid_block.resnets.1"] = "middle_block.2"
        index = 0
        for i, layers in enumerate(reversed(self.down_layers)):
            for j in range(layers + 1):
                mapping[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
                if self.up_attention[i]:
                    mapping[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
                if j == layers and i < n - 1:
                    slot = 2 if self.up_attention[i] else 1
                    mapping[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{index}.{slot}.conv"
                index += 1
        return mapping


class LDMNameMap:
    """kohya UNet names, diffusers-style <-> LDM-style, working on the names alone (no model needed).

    Files use LDM names for SDXL only; the compatibility check also needs them for SD1/SD2 (what A1111's
    LDM model and ComfyUI's key map call each layer).

    Underscored names are ambiguous in general, but every block prefix is known from the layout, so
    ``lora_unet_<block>_<rest>`` is split at the longest known block prefix.
    """

    def __init__(self, layout: UNetLayout) -> None:
        def under(path: str) -> str:
            return path.replace(".", "_")

        blocks = layout.block_map()
        self._blocks = sorted(((under(d), under(l), ".resnets." in d) for d, l in blocks.items()),
                              key=lambda t: -len(t[0]))
        self._top = {under(d): under(l) for d, l in _TOP_LEVEL.items()}
        self._leaves = {under(d): under(l) for d, l in _RESNET_LEAVES.items()}
        self._ldm_blocks = sorted(((l, d, r) for d, l, r in self._blocks), key=lambda t: -len(t[0]))
        self._ldm_top = {l: d for d, l in self._top.items()}
        self._ldm_leaves = {l: d for d, l in self._leaves.items()}

    @staticmethod
    def _convert(body: str, top: dict[str, str], blocks: list[tuple[str, str, bool]],
                 leaves: dict[str, str]) -> str | None:
        if body in top:
            return top[body]
        for head, target, is_resnet in blocks:
            if body == head:
                return target
            if body.startswith(head + "_"):
                rest = body[len(head) + 1:]
                if is_resnet:
                    if rest not in leaves:
                        return None
                    rest = leaves[rest]
                return f"{target}_{rest}"
        return None

    def to_ldm(self, name: str) -> str | None:
        """``lora_unet_down_blocks_1_attentions_0_...`` -> ``lora_unet_input_blocks_4_1_...`` (None: no match)."""
        if not name.startswith(UNET_PREFIX):
            return None
        body = self._convert(name[len(UNET_PREFIX):], self._top, self._blocks, self._leaves)
        return None if body is None else UNET_PREFIX + body

    def to_diffusers(self, name: str) -> str | None:
        if not name.startswith(UNET_PREFIX):
            return None
        body = self._convert(name[len(UNET_PREFIX):], self._ldm_top, self._ldm_blocks, self._ldm_leaves)
        return None if body is None else UNET_PREFIX + body


def kohya_name(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


def text_encoder_path(path: str) -> str:
    """Re-insert the ``text_model`` level that transformers 5 removed from ``CLIPTextModel``."""
    return path if path.startswith("text_model.") else f"text_model.{path}"


def adaptable_layers(model: nn.Module) -> Iterator[tuple[str, nn.Linear | nn.Conv2d]]:
    """Every Linear/Conv2d by module path; an injected adapter counts as the layer it wraps."""
    inside: str | None = None
    for path, module in model.named_modules():
        if inside is not None and path.startswith(inside):
            continue
        if isinstance(module, Adapter):
            inside = path + "."
            yield path, module.base
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            yield path, module


@dataclass
class ModelNames:
    """Every Linear/Conv2d layer of a pipeline's UNet and text encoders under its kohya names.

    ``layers`` maps the *internal* name (diffusers-style, as ``inject`` names adapters) to the layer;
    ``to_file`` maps internal names to the names written in files (LDM names for the SDXL UNet);
    ``from_file`` is the reverse and also accepts diffusers-style SDXL names written by other tools.
    """

    family: str
    layers: dict[str, nn.Linear | nn.Conv2d]
    to_file: dict[str, str]
    from_file: dict[str, str]

    def file_name(self, name: str) -> str:
        return self.to_file.get(name, name)


def family_of(components: Mapping[str, nn.Module]) -> str:
    """sd1 / sd2 / sdxl from the components: a second text encoder means SDXL; 1024-wide context means SD2."""
    if components.get("text_encoder_2") is not None:
        return "sdxl"
    unet = components.get("unet")
    context = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    if context is None and components.get("text_encoder") is not None:
        context = components["text_encoder"].config.hidden_size
    return "sd2" if context == 1024 else "sd1"


def model_names(components: Mapping[str, nn.Module], family: str | None = None) -> ModelNames:
    """Name every adaptable layer of ``components`` (keys ``unet``, ``text_encoder``, ``text_encoder_2``)."""
    family = family or family_of(components)
    layers: dict[str, nn.Linear | nn.Conv2d] = {}
    to_file: dict[str, str] = {}
    from_file: dict[str, str] = {}
    te_prefixes = SDXL_TE_PREFIXES if family == "sdxl" else TE_PREFIXES
    for key, prefix in te_prefixes.items():
        if components.get(key) is None:
            continue
        for path, layer in adaptable_layers(components[key]):
            name = kohya_name(prefix, text_encoder_path(path))
            layers[name] = layer
            from_file[name] = name
    unet = components.get("unet")
    if unet is not None:
        sdxl = LDMNameMap(UNetLayout.from_config(unet.config)) if family == "sdxl" else None
        for path, layer in adaptable_layers(unet):
            name = kohya_name(UNET_PREFIX, path)
            layers[name] = layer
            from_file[name] = name
            ldm = sdxl.to_ldm(name) if sdxl is not None else None
            if ldm is not None:
                to_file[name] = ldm
                from_file[ldm] = name
    return ModelNames(family, layers, to_file, from_file)
