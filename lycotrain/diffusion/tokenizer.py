"""CLIP BPE vocabularies: the real one shipped with the package, and a small one generated for tiny models.

The real CLIP vocabulary follows from its merges (bytes, bytes + ``</w>``, one token per merge, two special
tokens), so only ``data/clip/merges.txt.gz`` ships (derived by ``tools/make_clip_bpe.py``); SD1.x, SD2.x and
both SDXL tokenizers use it. Nothing is downloaded at run time.

The tiny models need a real ``CLIPTokenizer`` (same pre-tokenizer, byte-level alphabet, ``</w>`` word ends,
special tokens) so every code path that tokenizes captions runs unchanged on them. Its vocabulary is the
256 byte symbols, the same with ``</w>``, a few hundred merges learned greedily from a fixed list of
caption words (so common words are one or two tokens, like with the real vocabulary), and the two
special tokens. Deterministic: the same code always yields the same files.
"""

from __future__ import annotations

import gzip
from collections import Counter
from functools import lru_cache
from importlib import resources
from typing import Any

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"

# Words that appear in training captions; BPE merges are learned from them so they tokenize compactly.
_CORPUS = (
    "a an the of and with in on at by photo picture painting drawing illustration portrait close up "
    "person man woman girl boy dog cat bird horse car house tree flower sky cloud sun moon mountain river "
    "sea beach forest city street room window door table chair red green blue yellow black white orange "
    "purple pink brown gray dark light bright background style art detailed high quality masterpiece "
    "best simple small large big old young standing sitting walking looking smiling wearing hair eyes "
    "shirt dress hat glasses face hand hands outdoors indoors night day morning evening sunset snow rain "
    "water grass stone wood metal glass circle square triangle stripe stripes pattern shape color colors "
    "sks ohwx token trigger landscape anime realistic digital watercolor oil sketch render"
).split()


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2/CLIP mapping of the 256 bytes to printable characters, in CLIP's vocabulary order (printable
    bytes keep their own character and come first; the others get 256, 257, ... in byte order)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    alphabet = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in alphabet]
    alphabet.update({b: chr(256 + i) for i, b in enumerate(others)})
    return alphabet


def _learn_merges(words: list[str], count: int) -> list[tuple[str, str]]:
    """Greedy BPE: repeatedly merge the most frequent adjacent pair (ties broken by the pair itself)."""
    alphabet = byte_alphabet()
    words_sym = Counter(tuple(alphabet[b] for b in w.encode("utf-8")[:-1]) +
                        (alphabet[w.encode("utf-8")[-1]] + END_OF_WORD,) for w in words)
    merges: list[tuple[str, str]] = []
    for _ in range(count):
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, freq in words_sym.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        words_sym = Counter({_apply_merge(s, best): f for s, f in words_sym.items()})
    return merges


def _apply_merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            out.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return tuple(out)


def _vocabulary(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary layout: bytes, bytes + ``</w>``, merged tokens in merge order, BOS, EOS."""
    alphabet = list(byte_alphabet().values())
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    unique = list(dict.fromkeys(tokens))  # two merges can spell the same token; keep ids dense
    return {tok: i for i, tok in enumerate(unique)}


@lru_cache(maxsize=1)
def tiny_vocabulary(num_merges: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` for ``CLIPTokenizer(vocab=..., merges=...)``; same layout as CLIP's files."""
    merges = _learn_merges(_CORPUS, num_merges)
    return _vocabulary(merges), merges


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The real CLIP ``(vocab, merges)`` (49,408 tokens) from the shipped merges file."""
    data = resources.files("lycotrain") / "data" / "clip" / "merges.txt.gz"
    lines = gzip.decompress(data.read_bytes()).decode("utf-8").splitlines()[1:]
    merges = [tuple(line.split(" ")) for line in lines if line]
    return _vocabulary(merges), merges  # type: ignore[arg-type]


def make_clip_tokenizer(vocabulary: tuple[dict[str, int], list[tuple[str, str]]], pad_token: str = EOS,
                        max_length: int = 77) -> Any:
    """A ``transformers.CLIPTokenizer`` over ``vocabulary``. SD pads with EOS; SDXL's second tokenizer with "!"."""
    from transformers import CLIPTokenizer

    vocab, merges = vocabulary
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), bos_token=BOS, eos_token=EOS, unk_token=EOS,
                         pad_token=pad_token, model_max_length=max_length)
