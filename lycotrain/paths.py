"""Where lycotrain keeps what it builds or caches, and the one way it builds such folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


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
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first (target exists and is not empty): use its copy
            if not (target / marker).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
