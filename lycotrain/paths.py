"""Where lycotrain keeps what it builds or caches, and the one way it builds such folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from lycotrain.atomic import publish_mode
from lycotrain.errors import ModelError

BUILTIN_PREFIX = "builtin:"


def lycotrain_home() -> Path:
    """Built-in models, caches and saved presets live here: ``$LYCOTRAIN_HOME`` or ``~/.cache/lycotrain``."""
    return Path(os.environ.get("LYCOTRAIN_HOME") or Path.home() / ".cache" / "lycotrain")


def build_folder_once(target: Path, marker: str, build: Callable[[Path], object]) -> Path:
    """Return ``target``, first running ``build(tmp)`` into a temporary sibling renamed into place.

    ``marker`` is a file the finished folder always contains. A crash or a concurrent build therefore never
    leaves a half-written folder that a later run would trust.
    """
    if (target / marker).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        publish_mode(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first (target exists and is not empty): use its copy
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def builtin_model_folder(name: str, archs: tuple[str, ...], marker: str, build: Callable[[Path, str], object],
                         version: int | None = None) -> Path:
    """Resolve ``builtin:tiny-<arch>`` to ``$LYCOTRAIN_HOME/models/tiny-<arch>``, building it on first use.

    With ``version`` the folder is ``tiny-<arch>-v<version>``: bumping it when a tiny architecture changes
    makes every cache built by an older lycotrain be ignored (a folder is only ever built once, never checked).
    """
    short = name.removeprefix(BUILTIN_PREFIX)
    arch = short.removeprefix("tiny-")
    if not short.startswith("tiny-") or arch not in archs:
        choices = ", ".join(f"{BUILTIN_PREFIX}tiny-{a}" for a in archs)
        raise ModelError(f"unknown built-in model {name!r}; choose one of {choices}")
    folder = short if version is None else f"{short}-v{version}"
    return build_folder_once(lycotrain_home() / "models" / folder, marker, lambda tmp: build(tmp, arch))
