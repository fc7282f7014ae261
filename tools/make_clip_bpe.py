"""Derive the CLIP BPE merges shipped as ``lycotrain/data/clip/merges.txt.gz`` (for offline single-file loading).

Source: ``open_clip/bpe_simple_vocab_16e6.txt.gz`` from the ``open_clip_torch`` wheel on PyPI, the BPE file
OpenAI's CLIP and OpenCLIP tokenizers use (SD1.x CLIP-L, SD2.x OpenCLIP-H and both SDXL encoders share it).
CLIP keeps its first 48,894 merges (``merges[1:49152 - 256 - 2 + 1]``); the vocabulary is not stored
because it follows from the merges (``lycotrain.diffusion.tokenizer.clip_vocabulary``).

Run once from the repository root: ``python tools/make_clip_bpe.py`` (needs pip and PyPI).
"""

from __future__ import annotations

import gzip
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "open_clip_torch==3.3.0"
MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary size 49408 = 256 bytes * 2 + merges + 2 special tokens
OUT = Path(__file__).resolve().parents[1] / "lycotrain" / "data" / "clip" / "merges.txt.gz"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "-q", "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            lines = gzip.decompress(zf.read(MEMBER)).decode("utf-8").split("\n")
    merges = lines[1:NUM_MERGES + 1]  # line 0 is a header
    assert all(len(m.split(" ")) == 2 for m in merges), "unexpected BPE file layout"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    # mtime=0: the same input always gives the same bytes
    OUT.write_bytes(gzip.compress(("#version: 0.2\n" + "\n".join(merges) + "\n").encode("utf-8"), mtime=0))
    print(f"{len(merges)} merges -> {OUT} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
