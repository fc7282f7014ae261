"""Caption processing: trigger word, keep-first-N tag shuffle, tag dropout and caption dropout.

A caption is a comma-separated list of tags or a sentence. The trigger word is put in front after all the
random operations, so it is never shuffled away or dropped (only caption dropout, which trains the
unconditional case, empties everything). Randomness comes from the ``random.Random`` the caller passes, so a
given seed, epoch and sample position always give the same text (exact resume).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

TAG_SEPARATOR = ","


@dataclass(frozen=True)
class CaptionOptions:
    shuffle: bool = False
    keep_tokens: int = 0  # tags at the front that shuffle and tag dropout leave in place
    caption_dropout: float = 0.0  # probability that the whole caption becomes ""
    tag_dropout: float = 0.0  # probability that each tag (after the kept ones) is dropped
    trigger_word: str = ""  # put in front of every caption

    @property
    def randomised(self) -> bool:
        """True when one caption file can give many texts; the text-encoder cache then cannot be used.

        Caption dropout alone does not count: it only adds the empty caption, which is cached too.
        """
        return self.shuffle or self.tag_dropout > 0


def read_caption(path: Path) -> str:
    """The caption text of a file: lines joined by spaces, outer whitespace removed."""
    text = path.read_text(encoding="utf-8-sig", errors="replace")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def split_tags(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(TAG_SEPARATOR) if tag.strip()]


def with_trigger(text: str, trigger_word: str) -> str:
    """``trigger_word, text`` unless the text already starts with the trigger word."""
    trigger = trigger_word.strip()
    if not trigger:
        return text
    if not text:
        return trigger
    tags = split_tags(text)
    if tags and tags[0] == trigger:
        return text
    return f"{trigger}{TAG_SEPARATOR} {text}"


def process_caption(text: str, options: CaptionOptions, rng: random.Random) -> str:
    """The training text for one sample. Draws from ``rng`` in a fixed order, so seeds reproduce texts."""
    if options.caption_dropout > 0 and rng.random() < options.caption_dropout:
        return ""
    if options.randomised:
        tags = split_tags(text)
        kept, rest = tags[: options.keep_tokens], tags[options.keep_tokens:]
        if options.tag_dropout > 0:
            rest = [tag for tag in rest if rng.random() >= options.tag_dropout]
        if options.shuffle:
            rng.shuffle(rest)
        text = f"{TAG_SEPARATOR} ".join(kept + rest)
    return with_trigger(text, options.trigger_word)


def fixed_texts(text: str, options: CaptionOptions) -> list[str]:
    """Every text ``process_caption`` can return for ``text`` when the options are not randomised."""
    if options.randomised:
        raise ValueError("captions are shuffled or tag-dropped; their texts are not fixed")
    texts = [with_trigger(text, options.trigger_word)]
    return texts + [""] if options.caption_dropout > 0 else texts
