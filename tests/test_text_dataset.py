"""Text datasets: alpaca / chat / plain text, loss only on responses, truncation reported, malformed records
named by file, line and field."""

from __future__ import annotations

import json

import pytest
from text_helpers import tiny_model_dir

from lycotrain.errors import DatasetError
from lycotrain.text.dataset import IGNORE_INDEX, collate, load_text_dataset, make_dataloader


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir("llama"))


def _write_jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def _trained_text(tokenizer, example) -> str:
    return tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX])


def test_alpaca_loss_only_on_the_response(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Say hi", "input": "politely", "output": "Hello there"}])
    dataset, report = load_text_dataset(path, tokenizer)
    assert report.format == "alpaca" and report.examples == 1
    example = dataset[0]
    assert "Say hi" in tokenizer.decode(example["input_ids"]) and "politely" in tokenizer.decode(example["input_ids"])
    assert _trained_text(tokenizer, example) == "Hello there</s>\n"  # the answer and its end marker only
    everything, _ = load_text_dataset(path, tokenizer, train_on_prompt=True)
    assert all(label != IGNORE_INDEX for label in everything[0]["labels"])


def test_chat_uses_the_template_and_trains_every_assistant_turn(tmp_path, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
                {"role": "assistant", "content": "1"}, {"role": "user", "content": "Two?"},
                {"role": "assistant", "content": "2"}]
    path = tmp_path / "c.json"
    path.write_text(json.dumps([{"messages": messages}], indent=2), encoding="utf-8")
    dataset, report = load_text_dataset(path, tokenizer)
    assert report.format == "chat"
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert tokenizer.decode(dataset[0]["input_ids"]) == rendered
    assert _trained_text(tokenizer, dataset[0]) == "1</s>\n2</s>\n"


def test_plain_text_trains_on_everything(tmp_path, tokenizer):
    path = tmp_path / "t.txt"
    path.write_text("first document\nstill first\n\nsecond one\n", encoding="utf-8")
    dataset, report = load_text_dataset(path, tokenizer)
    assert report.format == "text" and len(dataset) == 2
    assert _trained_text(tokenizer, dataset[1]) == "second one</s>"


def test_truncation_is_counted_and_reported(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "long.jsonl", [{"text": "x" * 200}, {"text": "short"}])
    dataset, report = load_text_dataset(path, tokenizer, format="auto", max_length=32)
    assert report.truncated == 1 and report.longest > 32 and all(len(e["input_ids"]) <= 32 for e in dataset)
    assert any("truncated" in w for w in report.warnings)
    path2 = _write_jsonl(tmp_path / "alp.jsonl", [{"instruction": "y" * 100, "output": "z"},
                                                  {"instruction": "q", "output": "a"}])
    dataset, report = load_text_dataset(path2, tokenizer, max_length=32)
    assert report.dropped_no_response == 1 and len(dataset) == 1


@pytest.mark.parametrize("lines, message", [
    ([{"instruction": "a", "output": "b"}, {"instruction": "a"}], r"bad.jsonl:2: field 'output' is missing"),
    ([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 3}], r":2: field 'output' must be a string"),
    ([{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}],
     r":1: messages\[1\].role = 'bot'"),
    ([{"messages": [{"role": "user", "content": "x"}]}], r":1: field 'messages' has no assistant turn"),
])
def test_malformed_records_name_line_and_field(tmp_path, tokenizer, lines, message):
    path = _write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DatasetError, match=message):
        load_text_dataset(path, tokenizer)


def test_invalid_json_line_and_json_array_lines(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "oops"\n', encoding="utf-8")
    with pytest.raises(DatasetError, match=r"broken.jsonl:3: not valid JSON"):
        load_text_dataset(path, tokenizer)
    array = tmp_path / "arr.json"
    array.write_text('[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "a",\n   "output": null}\n]',
                     encoding="utf-8")
    with pytest.raises(DatasetError, match=r"arr.json:3: field 'output' must be a string"):
        load_text_dataset(array, tokenizer)


def test_collate_pads_without_loss_and_order_depends_on_seed_and_epoch(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": "a" * (i + 1)} for i in range(6)])
    dataset, _ = load_text_dataset(path, tokenizer)
    batch = collate([dataset[0], dataset[5]], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    order = lambda seed, epoch: [list(b) for b in make_dataloader(dataset, 2, 0, seed, epoch).batch_sampler]  # noqa: E731
    assert order(1, 0) == order(1, 0) and order(1, 0) != order(1, 1)
