"""Where adapters go: target presets, include/exclude patterns, per-module overrides, wrap and unwrap.

Targets follow kohya sd-scripts (specs/webui-formats.md §2.4) so the exported names are the ones every WebUI
maps:

* ``attn``: q, k, v and out of every attention (diffusers ``Attention``, transformers ``CLIPAttention``).
* ``attn-mlp`` (kohya's default, "LoRA-LierLa"): every Linear and 1x1 Conv2d inside the UNet's
  ``Transformer2DModel`` blocks (proj_in/out, attention, feed-forward) and the text encoder's attention and MLP.
* ``full`` (kohya "LoRA-C3Lier"): ``attn-mlp`` plus every layer of ``ResnetBlock2D``, ``Downsample2D`` and
  ``Upsample2D``. kxk convolutions get ``conv_params``; Linear layers (``time_emb_proj``) and 1x1 convolutions
  (``conv_shortcut``) get ``params``. For text encoders ``full`` equals ``attn-mlp``.

A module is adapted when the preset targets it, it matches one of the ``include`` patterns (when any are given)
and none of the ``exclude`` patterns; patterns are regular expressions searched in the kohya name. Overrides
``(pattern, {"rank": 4, ...})`` update the parameters of the modules whose name matches, later ones winning.

Names are kohya names: ``prefix + module path`` with ``.`` -> ``_``. transformers 5 dropped the ``text_model``
level of CLIP text models; it is re-inserted so names stay ``lora_te_text_model_encoder_layers_...``, the only
spelling WebUIs map. SDXL UNet names stay diffusers-style here (formats maps them to LDM names).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lycotrain.adapters import Adapter, build_adapter
from lycotrain.errors import AdapterError, ConfigError, FormatError

PRESETS = ("attn", "attn-mlp", "full")

# container classes (matched by class name anywhere in the MRO) whose Linear/Conv2d layers each preset adapts
_ATTENTION = ("Attention", "CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2")
_MLP = ("Transformer2DModel", "CLIPMLP")
_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
_CONTAINERS: dict[str, tuple[str, ...]] = {
    "attn": _ATTENTION,
    "attn-mlp": _ATTENTION + _MLP,
    "full": _ATTENTION + _MLP + _CONV_BLOCKS,
}

# diffusers component name -> kohya prefix, per family
_PREFIXES: dict[str, dict[str, str]] = {
    "sd": {"unet": "lora_unet_", "text_encoder": "lora_te_"},
    "sdxl": {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"},
}


def layer_type(layer: nn.Module) -> str:
    """``Linear``, ``Conv2d1x1``, ``Conv2d3x3`` ...: the kind of layer, as counted and as the fixture names it."""
    if isinstance(layer, nn.Conv2d):
        kh, kw = layer.kernel_size
        return f"Conv2d{kh}x{kw}"
    return type(layer).__name__


def kohya_name(model: nn.Module, prefix: str, path: str) -> str:
    """``prefix + path`` with dots as underscores; re-inserts CLIP's ``text_model`` level under transformers 5."""
    if type(model).__name__.startswith("CLIPText") and not path.startswith("text_model."):
        path = "text_model." + path
    return prefix + path.replace(".", "_")


def component_prefix(component: str, family: str) -> str:
    """kohya prefix of a diffusers pipeline component (``unet``, ``text_encoder``, ``text_encoder_2``)."""
    table = _PREFIXES["sdxl" if family == "sdxl" else "sd"]
    if component not in table:
        raise AdapterError(f"no adapters for component {component!r} of a {family} model; "
                           f"choose among {', '.join(table)}")
    return table[component]


def _class_names(module: nn.Module) -> set[str]:
    return {cls.__name__ for cls in type(module).__mro__}


def _targets(model: nn.Module, preset: str) -> Iterator[tuple[str, nn.Linear | nn.Conv2d]]:
    """(path, layer) of every Linear/Conv2d the preset targets, in model order, each once."""
    containers = set(_CONTAINERS[preset])
    seen: set[str] = set()
    for path, module in model.named_modules():
        if not containers & _class_names(module):
            continue
        for sub, layer in module.named_modules(prefix=path):
            if sub in seen or not isinstance(layer, (nn.Linear, nn.Conv2d)):
                continue
            # Transformer blocks (kohya LierLa) and attentions take only Linear and 1x1 conv layers
            if isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1) and \
                    not set(_CONV_BLOCKS) & _class_names(module):
                continue
            seen.add(sub)
            yield sub, layer


def _compile(patterns: Iterable[str], what: str) -> list[re.Pattern[str]]:
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as exc:
            raise ConfigError(f"{what} pattern {pattern!r} is not a valid regular expression: {exc}") from None
    return compiled


@dataclass
class _Slot:
    """Where an adapter sits: the parent module, the attribute name, the original layer's grad flags."""

    parent: nn.Module
    attr: str
    requires_grad: dict[str, bool]


class AdapterSet(Mapping[str, Adapter]):
    """The adapters injected into one or more models, by kohya name. Removing them restores the models."""

    def __init__(self) -> None:
        self._adapters: dict[str, Adapter] = {}
        self._slots: dict[str, _Slot] = {}
        self._unmerged_weights: dict[str, torch.Tensor] = {}  # base weights as they were before merge()

    # ---- mapping ---------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Adapter:
        return self._adapters[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._adapters)

    def __len__(self) -> int:
        return len(self._adapters)

    def _add(self, name: str, adapter: Adapter, slot: _Slot) -> None:
        if name in self._adapters:
            raise AdapterError(f"two adapters would share the name {name!r}; use distinct prefixes")
        self._adapters[name] = adapter
        self._slots[name] = slot

    @classmethod
    def join(cls, sets: Iterable["AdapterSet"]) -> "AdapterSet":
        """One set over several models (UNet + text encoders), e.g. for export."""
        joined = cls()
        for part in sets:
            for name in part:
                joined._add(name, part._adapters[name], part._slots[name])
                if name in part._unmerged_weights:
                    joined._unmerged_weights[name] = part._unmerged_weights[name]
        return joined

    # ---- training --------------------------------------------------------------------------------
    def parameters(self, prefix: str = "") -> list[nn.Parameter]:
        """Trainable parameters of the adapters whose name starts with ``prefix`` (e.g. ``lora_te`` for a
        separate text-encoder learning rate)."""
        return [p for name, a in self._adapters.items() if name.startswith(prefix) for p in a.adapter_parameters()]

    def counts(self) -> dict[str, int]:
        """Number of adapted layers by layer type (``Linear``, ``Conv2d1x1``, ``Conv2d3x3`` ...)."""
        return dict(Counter(layer_type(a.base) for a in self._adapters.values()))

    def layout(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """name -> (layer type, base weight shape)."""
        return {n: (layer_type(a.base), tuple(a.base.weight.shape)) for n, a in self._adapters.items()}

    def set_multiplier(self, multiplier: float) -> None:
        if any(a.merged for a in self._adapters.values()):
            raise AdapterError("cannot change the multiplier of merged adapters; unmerge them first")
        for adapter in self._adapters.values():
            adapter.multiplier = float(multiplier)

    def extra_loss(self) -> torch.Tensor | None:
        """Sum of the adapters' regularisers (HRA orthogonality), or None when no method has one."""
        terms = [t for a in self._adapters.values() if (t := a.extra_loss()) is not None]
        return torch.stack([t.float() for t in terms]).sum() if terms else None

    def merge(self) -> None:
        """Fold every adapter into its base weight, keeping a copy of the weight so unmerge is exact."""
        for name, adapter in self._adapters.items():
            if not adapter.merged:
                self._unmerged_weights[name] = adapter.base.weight.detach().clone()
                adapter.merge()

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` bit for bit (subtracting the delta again would leave rounding residue)."""
        for name, adapter in self._adapters.items():
            original = self._unmerged_weights.pop(name, None)
            if original is None or not adapter.merged:
                adapter.unmerge()
                continue
            adapter.base.weight.copy_(original)
            adapter.merged = False

    # ---- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """``"<name>.<key>"`` -> tensor, the keys of a kohya/LyCORIS file (before format conversion)."""
        return {f"{name}.{key}": value for name, a in self._adapters.items()
                for key, value in a.adapter_state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load tensors saved by :meth:`state_dict`; every key must be present and shaped alike."""
        own = self.state_dict()
        missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
        if missing or unexpected:
            raise FormatError(f"adapter state does not match the injected adapters: missing {missing[:5]} "
                              f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}); "
                              "inject with the same method, preset and ranks as when it was saved")
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise FormatError(f"adapter tensor {key}: shape {tuple(value.shape)} saved, "
                                  f"{tuple(own[key].shape)} expected; check rank/factor settings")
        for name, adapter in self._adapters.items():
            sub = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            adapter.load_state_dict(sub, strict=False)

    def remove(self) -> None:
        """Unmerge, put every original layer back and restore its grad flags: the model is bit for bit as
        before injection (an adapter merged on its own, not through :meth:`merge`, unmerges up to rounding)."""
        self.unmerge()
        for name, adapter in self._adapters.items():
            slot = self._slots[name]
            setattr(slot.parent, slot.attr, adapter.base)
            for pname, param in adapter.base.named_parameters():
                param.requires_grad_(slot.requires_grad[pname])
        self._adapters.clear()
        self._slots.clear()


def inject(model: nn.Module, *, prefix: str, method: str, params: Mapping[str, Any],
           preset: str = "attn-mlp", conv_params: Mapping[str, Any] | None = None,
           include: Sequence[str] = (), exclude: Sequence[str] = (),
           overrides: Sequence[tuple[str, Mapping[str, Any]]] = ()) -> AdapterSet:
    """Wrap the targeted layers of ``model`` with ``method`` adapters; returns the :class:`AdapterSet`.

    ``params`` go to ``build_adapter`` for Linear and 1x1 layers, ``conv_params`` (default: ``params``) for
    kxk convolutions. Adapter parameters are created on the base layer's device, in fp32.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown target preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if any(isinstance(m, Adapter) for m in model.modules()):
        raise AdapterError("this model already holds adapters; remove them before injecting again")
    includes, excludes = _compile(include, "include"), _compile(exclude, "exclude")
    rules = [(regex, dict(update)) for regex, update in zip(_compile([p for p, _ in overrides], "override"),
                                                               (u for _, u in overrides))]
    chosen = [(kohya_name(model, prefix, path), path, layer) for path, layer in _targets(model, preset)]
    chosen = [c for c in chosen if (not includes or any(r.search(c[0]) for r in includes))
              and not any(r.search(c[0]) for r in excludes)]
    if not chosen:
        raise AdapterError(f"no layer of {type(model).__name__} matches preset {preset!r} with include "
                           f"{list(include)} and exclude {list(exclude)}")
    for regex, _ in rules:
        if not any(regex.search(name) for name, _, _ in chosen):
            raise ConfigError(f"override pattern {regex.pattern!r} matches no adapted module")

    adapters = AdapterSet()
    for name, path, layer in chosen:
        kxk = isinstance(layer, nn.Conv2d) and layer.kernel_size != (1, 1)
        layer_params = dict(conv_params if kxk and conv_params is not None else params)
        for regex, update in rules:
            if regex.search(name):
                layer_params.update(update)
        grads = {n: p.requires_grad for n, p in layer.named_parameters()}
        with torch.device(layer.weight.device):
            adapter = build_adapter(method, layer, **layer_params)
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        setattr(parent, attr, adapter)
        adapters._add(name, adapter, _Slot(parent, attr, grads))
    return adapters


def inject_pipeline(components: Mapping[str, nn.Module], family: str, **options: Any) -> AdapterSet:
    """Inject the same method into several pipeline components (``unet``, ``text_encoder``[, ``_2``]) with
    their kohya prefixes; ``options`` are :func:`inject`'s keywords. Returns one joined set."""
    return AdapterSet.join(inject(model, prefix=component_prefix(name, family), **options)
                           for name, model in components.items())
