"""Caption processing: keep-first-N shuffle, tag and caption dropout, trigger word, determinism."""

from __future__ import annotations

import random

import pytest

from lycotrain.diffusion.captions import CaptionOptions, fixed_texts, process_caption, split_tags

CAPTION = "sks, portrait, red hair, smiling, outdoors, blue sky, tree, bokeh"


def _many(options: CaptionOptions, text: str = CAPTION, count: int = 200) -> list[str]:
    return [process_caption(text, options, random.Random(seed)) for seed in range(count)]


def test_shuffle_keeps_the_first_n_tags_in_place():
    texts = _many(CaptionOptions(shuffle=True, keep_tokens=2))
    tags = split_tags(CAPTION)
    for text in texts:
        out = split_tags(text)
        assert out[:2] == tags[:2]
        assert sorted(out) == sorted(tags)
    assert len({tuple(split_tags(t)[2:]) for t in texts}) > 50  # the rest really is shuffled


def test_shuffle_without_keep_moves_the_first_tag():
    assert {split_tags(t)[0] for t in _many(CaptionOptions(shuffle=True))} != {"sks"}


def test_tag_dropout_never_drops_kept_tags():
    texts = _many(CaptionOptions(tag_dropout=0.5, keep_tokens=1))
    assert all(split_tags(t)[0] == "sks" for t in texts)
    dropped = sum(8 - len(split_tags(t)) for t in texts) / (7 * len(texts))
    assert 0.4 < dropped < 0.6
    assert all(split_tags(t) == [x for x in split_tags(CAPTION) if x in split_tags(t)] for t in texts)  # order kept


def test_caption_dropout_empties_the_whole_caption_trigger_included():
    texts = _many(CaptionOptions(caption_dropout=0.3, trigger_word="lyco"))
    empty = texts.count("")
    assert 0.2 * len(texts) < empty < 0.4 * len(texts)
    assert all(t == f"lyco, {CAPTION}" for t in texts if t)
    assert set(_many(CaptionOptions(caption_dropout=1.0))) == {""}


def test_trigger_word_goes_first_after_shuffle_and_is_not_duplicated():
    for text in _many(CaptionOptions(shuffle=True, trigger_word="lyco"), count=30):
        assert split_tags(text)[0] == "lyco" and split_tags(text).count("lyco") == 1
    assert process_caption("lyco, a cat", CaptionOptions(trigger_word="lyco"), random.Random(0)) == "lyco, a cat"
    assert process_caption("", CaptionOptions(trigger_word="lyco"), random.Random(0)) == "lyco"


def test_plain_sentences_pass_through_unchanged():
    sentence = "A photo of a cat sitting on a mat,  at dusk"
    assert process_caption(sentence, CaptionOptions(), random.Random(0)) == sentence


def test_same_seed_same_text():
    options = CaptionOptions(shuffle=True, keep_tokens=1, tag_dropout=0.2, caption_dropout=0.1)
    assert _many(options, count=20) == _many(options, count=20)


def test_fixed_texts_for_the_text_encoder_cache():
    assert fixed_texts("a cat", CaptionOptions(trigger_word="lyco")) == ["lyco, a cat"]
    assert fixed_texts("a cat", CaptionOptions(caption_dropout=0.1)) == ["a cat", ""]
    assert not CaptionOptions(caption_dropout=0.5).randomised
    with pytest.raises(ValueError):
        fixed_texts("a, b", CaptionOptions(shuffle=True))
