"""The text CLI: every text preset validates and trains through ``lycotrain train``; ``lycotrain generate``
prints the greedy continuation with an adapter; ``lycotrain demo --task text`` lays out base, dataset, run."""

from __future__ import annotations

from pathlib import Path

import pytest
from text_helpers import load_model, tiny_model_dir

from lycotrain.cli import main
from lycotrain.engine.config import load_config
from lycotrain.text.adapter_set import load_adapter
from lycotrain.text.demo import write_demo_dataset
from lycotrain.text.generate import generate_text

PRESETS = sorted((Path(__file__).parents[1] / "presets").glob("text-*.toml"))


def test_every_text_method_has_a_preset():
    methods = {load_config(p).network.method for p in PRESETS}
    assert methods == {"lora", "adalora", "llama_adapter", "xlora"}


@pytest.mark.parametrize("preset", [p for p in PRESETS if "xlora" not in p.name], ids=lambda p: p.stem)
def test_preset_trains_and_generate_prints_its_continuation(tmp_path, capsys, preset):
    data = write_demo_dataset(tmp_path / "data")
    run = tmp_path / "run"
    overrides = [f"model.path={tiny_model_dir('llama')}", f"dataset.path={data}", f"run_dir={run}",
                 "training.max_steps=4", "training.warmup_steps=0", "dataset.max_length=64", "sample.every_n_steps=0"]
    if "adalora" in preset.name:  # a budgeting phase that fits in 4 steps
        overrides += ["network.tinit=1", "network.tfinal=1", "network.delta_t=1"]
    args = ["train", str(preset), "--no-progress"] + [a for o in overrides for a in ("--set", o)]
    assert main(args) == 0
    assert (run / "adapter" / "adapter_config.json").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_model_dir("llama")), "--adapter", str(run), "--prompt", "Say hello.",
                 "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.rstrip("\n")
    model = load_model()
    adapters = load_adapter(model, run / "adapter")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    assert printed == generate_text(adapters.runner, tokenizer, "Say hello.", 6)


def test_generate_missing_adapter_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tiny_model_dir("llama")), "--adapter", str(tmp_path), "--prompt",
                 "x"]) == 2
    assert "adapter_config.json" in capsys.readouterr().err


def test_text_demo_lays_out_base_dataset_and_run(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--task", "text", "--method", "llama_adapter", "--out", str(out), "--steps", "4"]) == 0
    assert (out / "base" / "config.json").is_file() and (out / "dataset" / "train.jsonl").is_file()
    assert (out / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_text_demo_xlora_trains_two_experts_first(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--task", "text", "--method", "xlora", "--out", str(out), "--steps", "6"]) == 0
    assert (out / "experts" / "first" / "adapter").is_dir() and (out / "experts" / "second" / "adapter").is_dir()
    assert (out / "run" / "adapter" / "experts" / "1" / "adapter_config.json").is_file()


def test_generation_gives_every_module_its_own_mode_back():
    """A wrapper in train mode around a frozen base in eval mode (X-LoRA's runner): a preview must not leave
    the base in train mode, where its dropout would act in the training steps that follow."""
    from torch import nn
    from transformers import AutoTokenizer

    model = load_model().eval()
    runner = nn.ModuleDict({"model": model})
    runner.forward = model.forward  # the wrapper only needs to run the model
    runner.train()
    model.eval()
    generate_text(runner, AutoTokenizer.from_pretrained(tiny_model_dir("llama")), "Say hello.", 2)
    assert runner.training and not any(module.training for module in model.modules())
