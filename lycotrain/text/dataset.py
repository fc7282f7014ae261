"""Text datasets: alpaca records, chat ``messages`` and plain text, tokenised with loss masks.

Files: ``.jsonl`` (one JSON object per line), ``.json`` (an array of objects), ``.txt`` (plain text,
documents separated by blank lines). Formats (``dataset.format``, "auto" detects it from the first record):

* alpaca: ``instruction`` (str), optional ``input`` (str), ``output`` (str);
* chat: ``messages`` = [{"role": "system" | "user" | "assistant", "content": str}, ...] with at least one
  assistant turn, rendered with the tokenizer's chat template when it has one;
* text: ``text`` (str) in JSON(L), or the documents of a ``.txt`` file.

Only response tokens (alpaca ``output`` + EOS, chat assistant turns with their end marker) carry a loss unless
``train_on_prompt``; plain text is trained on every token. Labels come from character offsets of the one
tokenisation of the whole string, so they agree with how the model sees the text at inference.
Records longer than ``max_length`` tokens are truncated (counted in the report); a record with no trainable
token left is dropped (counted too). Every malformed record raises DatasetError naming file, line and field.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from lycotrain.errors import DatasetError

FORMATS = ("alpaca", "chat", "text")
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100
# Used when the tokenizer has no chat template (the classic Alpaca prompt).
ALPACA_PROMPT = "### Instruction:\n{prompt}\n\n### Response:\n"


@dataclass
class Record:
    """One raw record: where it came from and its JSON object (or plain-text document)."""

    line: int
    data: Any


@dataclass
class DatasetReport:
    path: str
    format: str
    records: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_response: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    max_length: int = 0
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- reading files -------------------------------------------------------------------------------------
def _line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def read_records(path: str | Path) -> list[Record]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset.path {path}: file not found; give a .jsonl, .json or .txt file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({exc}); save the file as UTF-8") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _text_documents(text)
    if suffix == ".jsonl":
        return _jsonl_records(path, text)
    if suffix == ".json":
        return _json_array_records(path, text)
    raise DatasetError(f"dataset.path {path}: unknown file type {suffix!r}; use .jsonl, .json or .txt")


def _text_documents(text: str) -> list[Record]:
    records, lines, start = [], [], 1
    for number, line in enumerate(text.splitlines() + [""], start=1):
        if line.strip():
            if not lines:
                start = number
            lines.append(line)
        elif lines:
            records.append(Record(start, "\n".join(lines)))
            lines = []
    return records


def _jsonl_records(path: Path, text: str) -> list[Record]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(Record(number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); each line must "
                               "be one JSON object") from None
    return records


def _json_array_records(path: Path, text: str) -> list[Record]:
    """Decode a JSON array element by element so every record keeps the line it starts on."""
    decoder = json.JSONDecoder()
    index = len(text) - len(text.lstrip())
    if not text.startswith("[", index):
        raise DatasetError(f"{path}:{_line_of(text, index)}: expected a JSON array of records ([{{...}}, ...]); "
                           "for one object per line use a .jsonl file")
    index += 1
    records = []
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text):
            raise DatasetError(f"{path}: the JSON array is not closed with ]")
        if text[index] == "]":
            return records
        try:
            value, end = decoder.raw_decode(text, index)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        records.append(Record(_line_of(text, index), value))
        index = end


# ---- validation -----------------------------------------------------------------------------------------
def detect_format(path: Path, records: list[Record]) -> str:
    if not records:
        raise DatasetError(f"{path}: no records; the dataset is empty")
    first = records[0].data
    if isinstance(first, str):
        return "text"
    if isinstance(first, dict):
        for key, fmt in (("messages", "chat"), ("instruction", "alpaca"), ("text", "text")):
            if key in first:
                return fmt
    raise DatasetError(f"{path}:{records[0].line}: cannot tell the format; records need \"instruction\"/\"output\" "
                       "(alpaca), \"messages\" (chat) or \"text\"; or set dataset.format")


def _string(path: Path, record: Record, key: str, required: bool = True) -> str:
    data = record.data
    if not isinstance(data, dict):
        raise DatasetError(f"{path}:{record.line}: expected a JSON object, got {type(data).__name__}")
    if key not in data:
        if required:
            raise DatasetError(f"{path}:{record.line}: field {key!r} is missing")
        return ""
    value = data[key]
    if not isinstance(value, str):
        raise DatasetError(f"{path}:{record.line}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _messages(path: Path, record: Record) -> list[dict[str, str]]:
    data = record.data
    if not isinstance(data, dict) or not isinstance(data.get("messages"), list) or not data["messages"]:
        raise DatasetError(f"{path}:{record.line}: field 'messages' must be a non-empty list of "
                           "{\"role\", \"content\"} objects")
    messages = []
    for index, message in enumerate(data["messages"]):
        where = f"{path}:{record.line}: messages[{index}]"
        if not isinstance(message, dict):
            raise DatasetError(f"{where} must be an object with \"role\" and \"content\"")
        if message.get("role") not in ROLES:
            raise DatasetError(f"{where}.role = {message.get('role')!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str):
            raise DatasetError(f"{where}.content must be a string")
        messages.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{path}:{record.line}: field 'messages' has no assistant turn, so nothing to learn")
    return messages


# ---- prompts and segments -------------------------------------------------------------------------------
def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def format_prompt(tokenizer: Any, user_text: str) -> str:
    """The text the model sees before its answer: the chat template's user turn, or the Alpaca prompt.

    Training (alpaca records) and generation both use it, so a prompt is framed the same way in both."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
    return ALPACA_PROMPT.format(prompt=user_text)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _fallback_chat(messages: list[dict[str, str]], eos: str) -> list[tuple[str, bool]]:
    segments = []
    for m in messages:
        segments.append((f"<|{m['role']}|>\n", False))
        segments.append((m["content"] + eos + "\n", m["role"] == "assistant"))
    return segments


def chat_segments(tokenizer: Any, messages: list[dict[str, str]], where: str) -> list[tuple[str, bool]]:
    """(text, trainable) pieces whose concatenation is the rendered conversation."""
    if not has_chat_template(tokenizer):
        return _fallback_chat(messages, tokenizer.eos_token or "")
    full = _render(tokenizer, messages, False)
    segments, done = [], 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_render(tokenizer, messages[:index], True)) if index else 0
        end = len(_render(tokenizer, messages[: index + 1], False))
        if not (done <= start <= end <= len(full)):
            raise DatasetError(f"{where}: the tokenizer's chat template does not render conversations "
                               "incrementally, so assistant turns cannot be located; use format \"text\"")
        segments += [(full[done:start], False), (full[start:end], True)]
        done = end
    segments.append((full[done:], False))
    return [s for s in segments if s[0]]


def record_segments(tokenizer: Any, fmt: str, path: Path, record: Record) -> list[tuple[str, bool]]:
    where = f"{path}:{record.line}"
    if fmt == "text":
        text = record.data if isinstance(record.data, str) else _string(path, record, "text")
        return [(text + (tokenizer.eos_token or ""), True)]
    if fmt == "alpaca":
        instruction, extra = _string(path, record, "instruction"), _string(path, record, "input", required=False)
        output = _string(path, record, "output")
        prompt = instruction + (f"\n\n{extra}" if extra else "")
        if has_chat_template(tokenizer):
            return chat_segments(tokenizer, [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": output}], where)
        return [(format_prompt(tokenizer, prompt), False), (output + (tokenizer.eos_token or ""), True)]
    return chat_segments(tokenizer, _messages(path, record), where)


def tokenize_segments(tokenizer: Any, segments: list[tuple[str, bool]], train_on_prompt: bool,
                      add_special_tokens: bool) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE_INDEX where no loss) from one tokenisation of the joined text."""
    text = "".join(s for s, _ in segments)
    encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    trainable_chars = torch.zeros(len(text) + 1, dtype=torch.bool)
    position = 0
    for piece, trainable in segments:
        trainable_chars[position: position + len(piece)] = trainable or train_on_prompt
        position += len(piece)
    labels = []
    for token, (start, end) in zip(ids, encoded["offset_mapping"]):
        inside = end > start and bool(trainable_chars[start])
        labels.append(token if inside else IGNORE_INDEX)
    return ids, labels


# ---- the dataset ----------------------------------------------------------------------------------------
class TextDataset(Dataset):
    """Tokenised examples: dicts with ``input_ids`` and ``labels`` (lists of ints)."""

    def __init__(self, examples: list[dict[str, list[int]]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict[str, list[int]]:
        return self.examples[index]


def load_text_dataset(path: str | Path, tokenizer: Any, *, format: str = "auto", max_length: int = 512,
                      train_on_prompt: bool = False) -> tuple[TextDataset, DatasetReport]:
    path = Path(path)
    records = read_records(path)
    fmt = detect_format(path, records) if format == "auto" else format
    if fmt not in FORMATS:
        raise DatasetError(f"dataset.format = {format!r}; choose auto or one of {', '.join(FORMATS)}")
    report = DatasetReport(path=str(path), format=fmt, records=len(records), max_length=max_length)
    # a chat template writes its own special tokens; otherwise let the tokenizer add BOS as it does at inference
    add_special = fmt == "text" or not has_chat_template(tokenizer)
    examples = []
    for record in records:
        ids, labels = tokenize_segments(tokenizer, record_segments(tokenizer, fmt, path, record), train_on_prompt,
                                        add_special)
        report.longest = max(report.longest, len(ids))
        if len(ids) > max_length:
            report.truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
        trained = sum(label != IGNORE_INDEX for label in labels[1:])  # label 0 is never predicted
        if trained == 0:
            report.dropped_no_response += 1
            continue
        report.tokens += len(ids)
        report.trained_tokens += trained
        examples.append({"input_ids": ids, "labels": labels})
    report.examples = len(examples)
    if report.truncated:
        report.warnings.append(f"{report.truncated} of {report.records} records were longer than dataset.max_length "
                               f"= {max_length} tokens and were truncated (longest: {report.longest})")
    if report.dropped_no_response:
        report.warnings.append(f"{report.dropped_no_response} records had no response token left after truncation "
                               "and were skipped; raise dataset.max_length")
    if not examples:
        raise DatasetError(f"{path}: no usable example (every record lost its response to truncation); raise "
                           f"dataset.max_length (now {max_length})")
    return TextDataset(examples), report


def collate(batch: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding has attention 0 and no loss."""
    length = max(len(item["input_ids"]) for item in batch)
    ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        ids[row, :n] = torch.tensor(item["input_ids"])
        labels[row, :n] = torch.tensor(item["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_dataloader(dataset: TextDataset, batch_size: int, pad_id: int, seed: int, epoch: int) -> DataLoader:
    """Shuffled batches whose order depends only on (seed, epoch), never on the global RNG."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    sampler = BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=False)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=partial(collate, pad_id=pad_id))
