"""The text task through the shared loop: every method learns on the tiny LM, AdaLoRA's allocator runs by
itself with the total steps from the data and reports its final ranks, previews are greedy generations in the
events, the saved folder reloads, and a stopped run resumes exactly."""

from __future__ import annotations

import json

import pytest
import torch
from text_helpers import tiny_model_dir

from lycotrain.engine.config import Config
from lycotrain.engine.events import iter_events
from lycotrain.engine.loop import STOP_FILE, train
from lycotrain.formats.peft import read_peft_config
from lycotrain.text.demo import DEMO_RECORDS, write_demo_dataset

NETWORKS = {
    "lora": ({"target_modules": ["all-linear"], "rank": 8, "alpha": 16.0}, 1e-2),
    "adalora": ({"target_modules": ["all-linear"], "init_r": 8, "target_r": 4, "alpha": 16.0, "tinit": 4,
                 "tfinal": 6, "delta_t": 2}, 1e-2),
    "llama_adapter": ({"adapter_len": 8, "adapter_layers": 2}, 3e-2),
}


def text_config(tmp_path, method, network, lr, *, steps=None, epochs=0, name="run", **extra) -> Config:
    data = {"task": "text", "run_dir": str(tmp_path / name), "seed": 0,
            "model": {"path": str(tiny_model_dir("llama"))},
            "dataset": {"path": str(write_demo_dataset(tmp_path / "data")), "max_length": 64},
            "network": {"method": method, **network},
            "training": {"max_steps": steps or 0, "epochs": epochs, "batch_size": 4, "lr": lr, "weight_decay": 0.0},
            "save": {"dtype": "fp32"}, **extra}
    return Config.from_dict(data)


def losses(run_dir) -> list[float]:
    return [e["loss"] for e in iter_events(run_dir) if e["type"] == "step"]


def _falls(values: list[float], ratio: float) -> bool:
    return sum(values[-5:]) / 5 < ratio * sum(values[:5]) / 5


@pytest.mark.parametrize("method", list(NETWORKS))
def test_method_learns(tmp_path, method):
    network, lr = NETWORKS[method]
    result = train(text_config(tmp_path, method, network, lr, steps=36))
    assert result["status"] == "finished", result["message"]
    assert _falls(losses(tmp_path / "run"), 0.8), losses(tmp_path / "run")
    assert read_peft_config(tmp_path / "run" / "adapter")["peft_type"] in ("LORA", "ADALORA", "ADAPTION_PROMPT")


def test_xlora_learns_over_two_lora_experts(tmp_path):
    experts = []
    half = len(DEMO_RECORDS) // 2
    for index, records in enumerate((DEMO_RECORDS[:half], DEMO_RECORDS[half:])):
        network, lr = NETWORKS["lora"]
        data = write_demo_dataset(tmp_path / f"part{index}", records)
        config = text_config(tmp_path, "lora", network, lr, steps=30, name=f"expert{index}")
        config.dataset.path = str(data)
        assert train(config)["status"] == "finished"
        experts.append(str(tmp_path / f"expert{index}"))  # a lycotrain run folder is accepted as an expert
    config = text_config(tmp_path, "xlora", {"experts": experts, "xlora_layerwise": True}, 3e-2, steps=30)
    assert train(config)["status"] == "finished"
    assert _falls(losses(tmp_path / "run"), 0.9), losses(tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["adapters"] == {"0": "experts/0", "1": "experts/1"}


def test_adalora_allocator_runs_by_itself_with_total_from_the_data(tmp_path):
    # 12 records, batch 4 -> 3 steps per epoch; 8 epochs -> 24 steps: the total comes from the data
    network, lr = NETWORKS["adalora"]
    config = text_config(tmp_path, "adalora", network, lr, epochs=8)
    assert train(config)["status"] == "finished"
    ranks = [e for e in iter_events(tmp_path / "run") if e["type"] == "ranks"]
    assert len(ranks) == 1 and ranks[0]["step"] == 24 - network["tfinal"]
    assert ranks[0]["budget"] == network["target_r"] * len(ranks[0]["ranks"]) == sum(ranks[0]["ranks"].values())
    saved = read_peft_config(tmp_path / "run" / "adapter")
    assert saved["total_step"] == 24
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in saved["rank_pattern"].items()} == ranks[0]["ranks"]


def test_previews_are_greedy_generations_in_the_events(tmp_path):
    network, lr = NETWORKS["lora"]
    config = text_config(tmp_path, "lora", network, lr, steps=6,
                         sample={"prompts": [{"prompt": "Say hello."}], "every_n_steps": 3, "max_new_tokens": 5})
    assert train(config)["status"] == "finished"
    previews = [e for e in iter_events(tmp_path / "run") if e["type"] == "preview"]
    assert [(p["step"], p["final"]) for p in previews] == [(3, False), (6, True)]
    assert all(p["texts"][0]["prompt"] == "Say hello." and isinstance(p["texts"][0]["output"], str) for p in previews)


def test_stop_and_resume_continues_exactly(tmp_path):
    network, lr = NETWORKS["adalora"]
    assert train(text_config(tmp_path, "adalora", network, lr, steps=12, name="full"))["status"] == "finished"
    config = text_config(tmp_path, "adalora", network, lr, steps=12, name="stopped")

    def stop_at_5(event):  # a user pressing Stop: the loop checkpoints and ends after this step
        if event["type"] == "step" and event["step"] == 5:
            (tmp_path / "stopped" / STOP_FILE).touch()

    assert train(config, listener=stop_at_5)["status"] == "stopped"
    assert train(config, resume=True)["status"] == "finished"
    resumed, full = losses(tmp_path / "stopped"), losses(tmp_path / "full")
    assert len(resumed) == 12
    torch.testing.assert_close(resumed, full, atol=1e-5, rtol=0)  # allocator state included
