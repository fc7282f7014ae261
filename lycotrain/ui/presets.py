"""Presets in the GUI: the project's ``presets/*.toml`` and the user's own, in the same TOML as the CLI.

The user's presets are saved under ``$LYCOTRAIN_HOME/presets`` (not in the project folder), and both places are
offered when loading. A preset's empty model or dataset path never clears what the form already holds: presets
carry training settings, the paths belong to the user's machine.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import tomli_w

from lycotrain.atomic import atomic_write_text
from lycotrain.engine.config import Config
from lycotrain.errors import ConfigError
from lycotrain.paths import lycotrain_home
from lycotrain.ui.datasets import sanitize_name

PROJECT_PRESETS = Path(__file__).resolve().parents[2] / "presets"


def user_presets_dir() -> Path:
    return lycotrain_home() / "presets"


def list_presets(task: str) -> list[tuple[str, str]]:
    """(label, path) of every readable preset of ``task``; the user's first, then the project's."""
    found: list[tuple[str, str]] = []
    for folder, origin in ((user_presets_dir(), "mine"), (PROJECT_PRESETS, "project")):
        for path in sorted(folder.glob("*.toml")) if folder.is_dir() else []:
            try:
                preset_task = tomllib.loads(path.read_text(encoding="utf-8")).get("task", "image")
            except (tomllib.TOMLDecodeError, OSError, UnicodeDecodeError):
                continue  # a broken file is reported when someone loads it with the CLI, not here
            if preset_task == task:
                found.append((f"{path.stem} ({origin})", str(path)))
    return found


def preset_path(name: str) -> Path:
    """Where the user's preset ``name`` is saved."""
    if not name.strip():
        raise ConfigError("preset name is empty; type a name for the preset")
    return user_presets_dir() / f"{sanitize_name(name.strip()).removesuffix('.toml')}.toml"


def save_preset(config: Config, name: str) -> Path:
    """Write the settings that differ from the defaults (no run folder) as ``<name>.toml``."""
    data = config.to_dict(only_changed=True)
    data.pop("run_dir", None)
    path = preset_path(name)
    atomic_write_text(path, tomli_w.dumps({"task": config.task, **data}))
    return path
