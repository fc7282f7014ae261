"""``lycotrain demo --task text [--method M] [--out DIR]``: the whole text pipeline on the tiny LM, offline.

Builds the tiny Llama into DIR/base and a small instruction dataset into DIR/dataset, trains the chosen
method into DIR/run (adapter folder DIR/run/adapter) with greedy previews, and prints where everything is
and the command that generates with the result. For X-LoRA two small LoRA experts are trained first
(DIR/experts/<name>), each on half of the dataset.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from lycotrain.engine.config import Config
from lycotrain.errors import ConfigError
from lycotrain.text.models import build_tiny_llama

# Short question/answer pairs the tiny model can memorise in a couple of hundred steps.
DEMO_RECORDS: list[dict[str, str]] = [
    {"instruction": "What color is the sky?", "output": "Blue."},
    {"instruction": "What color is grass?", "output": "Green."},
    {"instruction": "How many legs does a cat have?", "output": "Four."},
    {"instruction": "What is two plus two?", "output": "Four."},
    {"instruction": "Say hello.", "output": "Hello!"},
    {"instruction": "What do bees make?", "output": "Honey."},
    {"instruction": "Name a fruit.", "output": "An apple."},
    {"instruction": "What is ice made of?", "output": "Water."},
    {"instruction": "Reverse the word", "input": "abc", "output": "cba"},
    {"instruction": "Reverse the word", "input": "dog", "output": "god"},
    {"instruction": "Repeat", "input": "red", "output": "red red"},
    {"instruction": "Repeat", "input": "sun", "output": "sun sun"},
]
DEMO_PROMPTS = ("What color is the sky?", "Say hello.", "What do bees make?")
METHOD_SETTINGS: dict[str, dict[str, Any]] = {
    "lora": {"network": {"rank": 8, "alpha": 16.0, "target_modules": ["attention"]}, "training": {"lr": 5e-3}},
    "adalora": {"network": {"init_r": 12, "target_r": 4, "alpha": 16.0, "target_modules": ["attention"],
                            "delta_t": 5}, "training": {"lr": 5e-3}},  # + tinit/tfinal from the steps
    "llama_adapter": {"network": {"adapter_len": 8, "adapter_layers": 2}, "training": {"lr": 2e-2}},
    "xlora": {"network": {"xlora_temperature": 1.0}, "training": {"lr": 1e-2}},
}


def write_demo_dataset(folder: str | Path, records: list[dict[str, str]] | None = None) -> Path:
    """An alpaca JSONL file of the demo records at ``folder/train.jsonl``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (records or DEMO_RECORDS)), encoding="utf-8")
    return path


def demo_config(method: str, base: Path, dataset: Path, run_dir: Path, *, steps: int,
                experts: list[str] | None = None) -> Config:
    settings = METHOD_SETTINGS[method]
    if method == "adalora":  # the allocator's schedule in the same proportions at any --steps (150: 20 and 40)
        settings = {**settings, "network": {**settings["network"], "tinit": steps * 2 // 15,
                                            "tfinal": steps * 4 // 15}}
    data: dict[str, Any] = {
        "task": "text", "run_dir": str(run_dir), "seed": 0,
        "model": {"path": str(base)},
        "dataset": {"path": str(dataset), "max_length": 128},
        "network": {"method": method, **settings["network"], **({"experts": experts} if experts else {})},
        "training": {"max_steps": steps, "batch_size": 4, "optimizer": "adamw", "weight_decay": 0.0,
                     "max_grad_norm": 1.0, **settings["training"]},
        "sample": {"prompts": [{"prompt": p} for p in DEMO_PROMPTS], "every_n_steps": max(1, steps // 2),
                   "max_new_tokens": 16},
        "save": {"dtype": "fp32"},
    }
    return Config.from_dict(data)


def _train(config: Config) -> dict[str, Any]:
    from lycotrain.engine.loop import train

    def show(event: dict[str, Any]) -> None:
        if event["type"] == "step" and (event["step"] % 25 == 0 or event["step"] == event["total_steps"]):
            print(f"  step {event['step']}/{event['total_steps']}  loss {event['loss']:.4f}")
        elif event["type"] == "preview":
            for text in event.get("texts", []):
                print(f"  [{'final' if event.get('final') else 'step ' + str(event['step'])}] "
                      f"{text['prompt']!r} -> {text['output']!r}")
        elif event["type"] in ("warning", "error", "ranks"):
            print(f"  {event['type']}: {event.get('message') or event.get('ranks')}")

    return train(config, listener=show)


def run_demo(args: argparse.Namespace) -> int:
    method = getattr(args, "method", None) or "lora"
    out = Path(getattr(args, "out", None) or "demo-out/text")  # beside the image demo's demo-out/{base,run}
    if (out / "base" / "model_index.json").is_file():
        raise ConfigError(f"{out / 'base'} holds the image demo's model; give the text demo its own folder, "
                          f"e.g. --out {out / 'text'}")
    steps = int(getattr(args, "steps", 0) or 150)
    base = build_tiny_llama(out / "base") if not (out / "base" / "config.json").is_file() else out / "base"
    dataset = write_demo_dataset(out / "dataset")
    for product in ("run", "experts"):  # the demo's own outputs from an earlier demo: start afresh
        shutil.rmtree(out / product, ignore_errors=True)
    experts: list[str] = []
    if method == "xlora":
        half = len(DEMO_RECORDS) // 2
        for name, records in (("first", DEMO_RECORDS[:half]), ("second", DEMO_RECORDS[half:])):
            print(f"training LoRA expert {name!r} for X-LoRA")
            part = write_demo_dataset(out / "experts" / f"{name}-data", records)
            result = _train(demo_config("lora", base, part, out / "experts" / name, steps=steps))
            if result["status"] != "finished":
                print(f"error: expert training {result['status']}: {result['message']}")
                return 1
            experts.append(str(out / "experts" / name / "adapter"))
    print(f"training {method} on the tiny Llama ({base}) with {dataset}")
    result = _train(demo_config(method, base, dataset, out / "run", steps=steps, experts=experts))
    if result["status"] != "finished":
        print(f"error: training {result['status']}: {result['message']}")
        return 1
    adapter = out / "run" / "adapter"
    print(f"\nbase model: {base}\ndataset:    {dataset}\nrun:        {out / 'run'} (events.jsonl, checkpoints/)\n"
          f"adapter:    {adapter}\n\ntry: lycotrain generate --model {base} --adapter {adapter} "
          f"--prompt {DEMO_PROMPTS[0]!r}")
    return 0
