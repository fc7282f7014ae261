"""The one call the training engine makes at every export: the WebUI file, its sidecars and its compatibility
report, side by side::

    NAME.safetensors            kohya/LyCORIS file (A1111, Forge, ComfyUI)
    NAME.lycotrain.safetensors  native parameters, only when the WebUI file alone cannot resume (HRA, OFT)
    NAME.preview.png            card image, when a preview exists
    NAME.json                   A1111 user metadata (activation text, preferred weight, description)
    NAME.compat.json / .txt     what each WebUI will do with the file (formats/compat.py)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lycotrain.adapters import Adapter
from lycotrain.formats.compat import CompatReport, write_compat_report
from lycotrain.formats.kohya import ExportResult, save_webui_file
from lycotrain.formats.metadata import write_sidecars
from lycotrain.formats.names import family_of


@dataclass
class WebUIExport:
    result: ExportResult
    sidecars: list[Path]
    compat: CompatReport


def export_webui(path: str | Path, adapters: Mapping[str, Adapter], components: Mapping[str, nn.Module], *,
                 metadata: Mapping[str, str], dtype: str = "fp16", oft_as_lora: bool = False,
                 preview: str | Path | None = None, activation_text: str = "", preferred_weight: float = 1.0,
                 description: str = "") -> WebUIExport:
    """Write ``adapters`` (injected into ``components``) for WebUIs, with sidecars and the compat report.

    ``metadata`` comes from ``metadata.build_metadata``. The compat check runs on the same components: the
    adapters are wrappers, so the layers' own weights are the base weights the WebUIs will patch.
    """
    family = family_of(components)
    unet = components.get("unet")
    result = save_webui_file(path, adapters, family=family, unet_config=unet.config if unet is not None else None,
                             metadata=metadata, dtype=dtype, oft_as_lora=oft_as_lora)
    sidecars = write_sidecars(path, family=family, preview=preview, activation_text=activation_text,
                              preferred_weight=preferred_weight, description=description)
    return WebUIExport(result, sidecars, write_compat_report(path, components))
