"""The text runs' memory estimate: its activation count matches a real training forward of the tiny Llama
(LoRA, AdaLoRA, Llama-Adapter, X-LoRA; fp32 and bf16 autocast; with and without gradient checkpointing), it
scales with batch and length, checkpointing lowers it, and it reaches the run's preflight event."""

from __future__ import annotations

import pytest
import torch
from text_helpers import load_model, tiny_model_dir, token_batch

from lycotrain.engine.config import Config
from lycotrain.engine.events import iter_events
from lycotrain.engine.loop import train
from lycotrain.engine.memory import SavedTensorMeter
from lycotrain.text import memory
from lycotrain.text.adapter_set import attach_lora
from lycotrain.text.demo import write_demo_dataset
from lycotrain.text.memory import estimate_text_memory
from lycotrain.text.task import build_adapters, enable_gradient_checkpointing, training_loss

TINY_GPU = {"name": "Tiny GPU", "total_bytes": 1024**2, "free_bytes": 1024**2}


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("experts")
    return [str(attach_lora(load_model(), target_modules=targets, rank=4).save(root / f"expert{index}"))
            for index, targets in enumerate((["q_proj", "v_proj"], ["v_proj", "o_proj"]))]


def _config(method: str, experts: list[str], **training) -> Config:
    networks = {"lora": {"target_modules": ["all-linear"], "rank": 4},
                "adalora": {"target_modules": ["q_proj", "v_proj"], "init_r": 6, "target_r": 2},
                "llama_adapter": {"adapter_len": 4, "adapter_layers": 2},
                "xlora": {"experts": experts, "xlora_depth": 2, "xlora_size": 16}}
    return Config.from_dict({"task": "text", "model": {"path": str(tiny_model_dir("llama"))},
                             "network": {"method": method, **networks[method]}, "training": training})


def _real_saved_bytes(config: Config, batch_size: int, length: int, autocast: bool) -> int:
    """A real CPU training forward as the task runs it (right-padded batch), metered like the estimate."""
    model = load_model()
    enable_gradient_checkpointing(model, config)
    adapters = build_adapters(model, config)
    ids, mask = token_batch(batch_size, length), torch.ones(batch_size, length, dtype=torch.long)
    labels = ids.clone()
    if batch_size > 1:  # a shorter second example, padded
        mask[1, -3:], labels[1, -3:] = 0, -100
    held = [*model.parameters(), *model.buffers(), *adapters.trainable_parameters()]
    with SavedTensorMeter(exclude=held) as meter, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        training_loss(adapters, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    return meter.total


@pytest.mark.parametrize("method,batch_size,precision,checkpointing", [
    ("lora", 2, "no", False),
    ("lora", 1, "bf16", True),
    ("adalora", 2, "no", True),
    ("llama_adapter", 2, "bf16", False),
    ("llama_adapter", 1, "no", True),
    ("xlora", 2, "no", False),
    ("xlora", 2, "bf16", False),
])
def test_estimated_activations_match_a_real_forward(experts, method, batch_size, precision, checkpointing):
    """Within 1 % of the real forward (measured: equal to the byte). With checkpointing, the real meter sees
    only what lives outside the checkpointed layers: the estimate's ``outside_checkpoints`` part."""
    config = _config(method, experts, mixed_precision=precision, gradient_checkpointing=checkpointing)
    autocast = precision == "bf16"
    real = _real_saved_bytes(config, batch_size, 24, autocast)
    estimate = estimate_text_memory(config, batch_size=batch_size, length=24, device_type="cpu",
                                    autocast_dtype=torch.bfloat16 if autocast else None)
    activations = estimate.item("activations")
    predicted = activations.parts["outside_checkpoints"] if checkpointing else activations.bytes
    assert predicted == pytest.approx(real, rel=0.01), (predicted, real)
    assert activations.bytes == sum(activations.parts.values())
    if checkpointing:  # the task really checkpoints (the frozen base model is in eval mode)
        assert real < 0.5 * _real_saved_bytes(config.replace(["training.gradient_checkpointing=false"]),
                                              batch_size, 24, autocast)


def test_batch_length_checkpointing_and_method_move_the_estimate(experts):
    def activations(config: Config, batch_size: int = 2, length: int = 32) -> int:
        return estimate_text_memory(config, batch_size=batch_size, length=length, autocast_dtype=None,
                                    device_type="cpu").item("activations").bytes

    lora = _config("lora", experts)
    base = activations(lora)
    assert 1.9 < activations(lora, batch_size=4) / base <= 2.0
    assert 1.9 < activations(lora, length=64) / base < 2.2  # the padding mask adds a quadratic sliver
    assert activations(_config("lora", experts, gradient_checkpointing=True)) < 0.8 * base
    estimate = estimate_text_memory(_config("adalora", experts, optimizer="adafactor"), batch_size=2, length=32,
                                    autocast_dtype=torch.bfloat16)
    adapter = estimate.item("adapter parameters").bytes
    assert estimate.item("AdaLoRA importance").bytes == 2 * adapter
    assert estimate.item("logits gradients").bytes == 2 * 4 * 2 * 32 * 320  # tiny vocabulary: 320
    weights = 4 * sum(p.numel() for p in load_model().parameters())  # fp32, as the task loads the model
    assert weights <= estimate.item("model weights").bytes < weights + 256  # + rotary and AdaLoRA buffers
    assert estimate.precision == "bf16" and "CUDA runtime" in {i.name for i in estimate.items}
    xlora = estimate_text_memory(_config("xlora", experts), batch_size=2, length=32, autocast_dtype=None)
    assert "gradient_checkpointing" not in (xlora.fit_warning() or "")  # X-LoRA cannot use it: never advised


def test_preflight_event_carries_the_estimate_and_warns(tmp_path, isolated_home, monkeypatch):
    monkeypatch.setattr(memory, "visible_gpu", lambda device=None: TINY_GPU)
    config = Config.from_dict({
        "task": "text", "run_dir": str(tmp_path / "run"), "model": {"path": str(tiny_model_dir("llama"))},
        "dataset": {"path": str(write_demo_dataset(tmp_path / "data")), "max_length": 512},
        "network": {"method": "lora", "rank": 4}, "training": {"max_steps": 1, "batch_size": 3}})
    assert train(config)["status"] == "finished"
    events = list(iter_events(tmp_path / "run"))
    report = next(e for e in events if e["type"] == "preflight")["report"]
    estimate = report["memory"]
    assert estimate["estimate"] and report["memory_unavailable"] == ""
    # the longest batch: 3 rows of the longest tokenized example (shorter than max_length)
    assert (estimate["batch_size"], estimate["length"]) == (3, report["longest"]) and report["longest"] < 512
    assert estimate["device_type"] == "cpu" and estimate["gpu"] == TINY_GPU
    assert estimate["total_bytes"] == sum(item["bytes"] for item in estimate["items"])
    assert any(e["type"] == "warning" and "exceeds the 0.0 GiB of Tiny GPU" in e["message"]
               and "lower dataset.max_length" in e["message"] for e in events)


def test_only_the_main_process_estimates(tmp_path, isolated_home, monkeypatch, as_other_rank):
    from lycotrain.text import task as text_task

    class SecondRank(text_task.TextTask):
        def setup(self, config, accelerator, events):
            super().setup(config, as_other_rank(accelerator), events)

    monkeypatch.setattr(text_task, "estimate_for_run", lambda *a, **k: pytest.fail("estimated on a non-main rank"))
    config = Config.from_dict({
        "task": "text", "run_dir": str(tmp_path / "run"), "model": {"path": str(tiny_model_dir("llama"))},
        "dataset": {"path": str(write_demo_dataset(tmp_path / "data"))}, "network": {"method": "lora", "rank": 4},
        "training": {"max_steps": 1}})
    assert train(config, task=SecondRank())["status"] == "finished"
