"""Image adapter methods. Each lives in its own module; this registry names them for configs and files."""

from __future__ import annotations

import importlib
from typing import Any

from lycotrain.adapters.base import Adapter, BaseLayer
from lycotrain.errors import AdapterError

# method name -> (module, class); imported on first use so one method's import cost is never paid by another
_METHODS: dict[str, tuple[str, str]] = {
    "lora": ("lycotrain.adapters.lora", "LoRAAdapter"),
    "loha": ("lycotrain.adapters.loha", "LoHaAdapter"),
    "lokr": ("lycotrain.adapters.lokr", "LoKrAdapter"),
    "oft": ("lycotrain.adapters.oft", "OFTAdapter"),
    "hra": ("lycotrain.adapters.hra", "HRAAdapter"),
}
METHOD_NAMES: tuple[str, ...] = tuple(_METHODS)


def get_method(name: str) -> type[Adapter]:
    if name not in _METHODS:
        raise AdapterError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    module, cls = _METHODS[name]
    return getattr(importlib.import_module(module), cls)


def build_adapter(method: str, base: BaseLayer, **params: Any) -> Adapter:
    return get_method(method)(base, **params)


__all__ = ["Adapter", "BaseLayer", "METHOD_NAMES", "get_method", "build_adapter"]
