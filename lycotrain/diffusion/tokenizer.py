"""A small CLIP-style BPE vocabulary that the project generates itself (no download).

The tiny models need a real ``CLIPTokenizer`` (same pre-tokenizer, byte-level alphabet, ``</w>`` word ends,
special tokens) so every code path that tokenizes captions runs unchanged on them. Its vocabulary is the
256 byte symbols, the same with ``</w>``, a few hundred merges learned greedily from a fixed list of
caption words (so common words are one or two tokens, like with the real vocabulary), and the two
special tokens. Deterministic: the same code always yields the same files.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

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
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2/CLIP mapping of the 256 bytes to printable unicode characters, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars: dict[int, int] = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + extra
            extra += 1
    return tuple(chr(chars[b]) for b in range(256))


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


@lru_cache(maxsize=1)
def tiny_vocabulary(num_merges: int = 400) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` for ``CLIPTokenizer(vocab=..., merges=...)``; same layout as CLIP's files."""
    alphabet = list(byte_alphabet())
    merges = _learn_merges(_CORPUS, num_merges)
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    unique = list(dict.fromkeys(tokens))  # two merges can spell the same token; keep ids dense
    return {tok: i for i, tok in enumerate(unique)}, merges
