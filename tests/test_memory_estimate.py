"""The memory estimate: its activation count matches a real training step, it responds to the settings the way
memory does, it reaches the pre-flight report (event, JSON, CLI text), and it runs on real-size architectures."""

from __future__ import annotations

import json
import time
from importlib import resources
from pathlib import Path

import pytest
import torch

from _dataset_images import write_images
from _image_runs import events, image_config
from lycotrain.cli import main
from lycotrain.diffusion.memory import estimate_memory, spec_from_path
from lycotrain.diffusion.task import DiffusionTask
from lycotrain.engine import memory as engine_memory
from lycotrain.engine.config import Config
from lycotrain.engine.loop import train
from lycotrain.engine.memory import MetaTrainingMode, SavedTensorMeter, optimizer_state_bytes

SD_CONFIGS = resources.files("lycotrain") / "data" / "configs"  # the published configs: architecture, no weights
TINY_GPU = {"name": "Tiny GPU", "total_bytes": 1024**2, "free_bytes": 1024**2}


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny SD1 model and 4 same-size images: one 32x32 bucket, so every batch is the estimated one."""
    from lycotrain.diffusion.models import build_tiny_pipeline

    root = tmp_path_factory.mktemp("memory")
    write_images(root / "data", 4, size=(64, 64))
    return build_tiny_pipeline(root / "model", arch="sd1"), root / "data"

pytestmark = pytest.mark.usefixtures("isolated_home")


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one mixed-precision setting per process; the bf16 run changes it, then restores it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


class MeteredTask(DiffusionTask):
    """The real task; its training step runs under the same meter the estimate uses (model weights excluded)."""

    def training_step(self, batch, step):
        weights = [t for m in (self.pipeline.unet, *self.text_encoders) for t in (*m.parameters(), *m.buffers())]
        with SavedTensorMeter(exclude=weights) as meter:
            loss = super().training_step(batch, step)
        self.measured = (meter.total, tuple(batch["latents"].shape))
        return loss


def _tiny_config(**tables) -> Config:
    return Config.from_dict({"model": {"path": "builtin:tiny-sd1"}, "network": {"method": "lora", "rank": 4},
                             **tables})


def _estimate(spec, config: Config, batch_size: int = 2, size: int = 64, dtype=torch.float32):
    return estimate_memory(spec, config, batch_size=batch_size, width=size, height=size, weight_dtype=dtype,
                           device_type="cpu")


# ---- the estimate against a real training step -----------------------------------------------------------------
@pytest.mark.parametrize("settings", [
    {},
    {"training": {"mixed_precision": "bf16"}},  # CPU autocast: the emulation against the real thing
    {"training": {"gradient_checkpointing": True}},
    {"network": {"train_text_encoder": True, "method": "loha"}},
], ids=["fp32", "bf16-autocast", "checkpointing", "te-loha"])
def test_estimated_activations_match_a_real_training_step(tmp_path, assets, monkeypatch, fresh_accelerate,
                                                         settings):
    """Real CPU step vs the meta-device estimate in the run's own preflight event: within 1 % (measured: 0.3 %).

    With gradient checkpointing the real meter sees only what torch's checkpoint keeps outside its segments
    (the checkpoint hides the rest from outer hooks), which is the estimate's ``outside_checkpoints`` part."""
    monkeypatch.setattr(engine_memory, "visible_gpu", lambda device=None: TINY_GPU)
    model, data = assets
    tables = {key: {**{"max_steps": 1}, **value} if key == "training" else value for key, value in settings.items()}
    tables.setdefault("training", {"max_steps": 1})
    config = image_config(tmp_path / "run", model, data, **tables)
    task = MeteredTask()
    assert train(config, task=task)["status"] == "finished"

    estimate = events(tmp_path / "run", "preflight")[0]["report"]["memory"]
    assert estimate["estimate"] and (estimate["batch_size"], estimate["width"], estimate["height"]) == (2, 32, 32)
    real, shape = task.measured
    assert shape == (2, 4, 4, 4)
    activations = next(i for i in estimate["items"] if i["name"] == "activations")
    predicted = activations["parts"]["outside_checkpoints"] if config.training.gradient_checkpointing \
        else activations["bytes"]
    assert predicted == pytest.approx(real, rel=0.01), (predicted, real)
    # the CPU run gets the CPU rules (no CUDA runtime), and the too-small "GPU" gets its warning event
    assert estimate["device_type"] == "cpu" and estimate["gpu"] == TINY_GPU
    assert any("exceeds the 0.0 GiB of Tiny GPU" in w["message"] for w in events(tmp_path / "run", "warning"))


# ---- how it responds to the settings ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_spec(assets):
    return spec_from_path(str(assets[0]))


def test_checkpointing_lowers_and_batch_size_scales_the_activations(tiny_spec):
    plain = _estimate(tiny_spec, _tiny_config(), batch_size=1).item("activations")
    four = _estimate(tiny_spec, _tiny_config(), batch_size=4).item("activations")
    assert 3.8 < four.bytes / plain.bytes <= 4.0  # all but the constant casts scale with the batch
    bigger = _estimate(tiny_spec, _tiny_config(), batch_size=1, size=128).item("activations")
    assert bigger.bytes > 3.5 * plain.bytes  # 4x the pixels (fused attention: no quadratic term)
    checkpointed = _estimate(tiny_spec, _tiny_config(training={"gradient_checkpointing": True}),
                             batch_size=4).item("activations")
    assert checkpointed.bytes < 0.8 * four.bytes
    assert checkpointed.bytes == sum(checkpointed.parts.values()) and checkpointed.parts["largest_segment"] > 0


def test_precision_optimizer_and_trained_parts_change_what_they_should(tiny_spec):
    base = _estimate(tiny_spec, _tiny_config())
    half = _estimate(tiny_spec, _tiny_config(training={"mixed_precision": "fp16"}), dtype=torch.float16)
    assert half.item("UNet weights").bytes * 2 == base.item("UNet weights").bytes
    assert half.item("VAE weights").bytes == base.item("VAE weights").bytes  # the VAE stays fp32
    assert half.item("activations").bytes < 0.75 * base.item("activations").bytes
    assert half.item("adapter parameters").bytes == base.item("adapter parameters").bytes  # adapters stay fp32
    adafactor = _estimate(tiny_spec, _tiny_config(training={"optimizer": "adafactor"}))
    assert adafactor.item("optimizer state").bytes < base.item("optimizer state").bytes / 4
    with_te = _estimate(tiny_spec, _tiny_config(network={"method": "lora", "rank": 4, "train_text_encoder": True}))
    assert with_te.item("adapter parameters").bytes > base.item("adapter parameters").bytes
    assert with_te.item("activations").bytes > base.item("activations").bytes
    assert base.total_bytes == sum(item.bytes for item in base.items)


@pytest.mark.parametrize("method", ["loha", "lokr", "oft", "hra"])
def test_every_method_runs_on_the_meta_device(tiny_spec, method):
    estimate = _estimate(tiny_spec, _tiny_config(network={"method": method, "rank": 4, "block_size": 4,
                                                          "preset": "full"}))
    assert estimate.item("activations").bytes > 0 and estimate.item("adapter parameters").bytes > 0


def test_tiny_sdxl_with_trained_text_encoders(tmp_path):
    from lycotrain.diffusion.models import build_tiny_pipeline

    spec = spec_from_path(str(build_tiny_pipeline(tmp_path / "sdxl", arch="sdxl")))
    frozen = _estimate(spec, _tiny_config(), dtype=torch.bfloat16)
    trained = _estimate(spec, _tiny_config(network={"method": "lora", "train_text_encoder": True},
                                           training={"gradient_checkpointing": True}), dtype=torch.bfloat16)
    assert spec.family == "sdxl" and trained.item("adapter parameters").bytes > frozen.item("adapter parameters").bytes


def test_cuda_autocast_emulation_follows_pytorch_op_table():
    """CUDA autocast (no GPU here): norms run in fp32, convolutions in the low precision, and upsampling, on
    neither list, in whatever dtype it gets."""
    import torch.nn.functional as F


    x = torch.empty(1, 4, 8, 8, device="meta", dtype=torch.bfloat16)
    with MetaTrainingMode(torch.bfloat16, "cuda"):
        assert F.group_norm(x, 2).dtype == torch.float32
        assert F.conv2d(x.float(), torch.empty(4, 4, 1, 1, device="meta")).dtype == torch.bfloat16
        assert F.interpolate(x, scale_factor=2.0).dtype == torch.bfloat16


def test_optimizer_state_matches_what_the_optimizers_allocate():
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(8, 300), (300, 8), (4, 6, 3, 3), (7,)]]
    from transformers.optimization import Adafactor

    for name, optimizer in [("adamw", torch.optim.AdamW(params)),
                            ("adafactor", Adafactor(params, lr=1e-3, scale_parameter=False, relative_step=False))]:
        for p in params:
            p.grad = torch.randn_like(p)
        optimizer.step()
        allocated = sum(t.numel() * t.element_size() for state in optimizer.state.values()
                        for t in state.values() if isinstance(t, torch.Tensor) and t.dim() > 0)
        assert optimizer_state_bytes(name, [p.shape for p in params]) == allocated, name
    assert optimizer_state_bytes("adamw8bit", [(4096,), (10,)]) == 2 * (4096 + 4 * 16) + 8 * 10
    assert optimizer_state_bytes("prodigy", [(10,)]) == 160


def test_single_file_model_gives_the_folder_spec_and_a_wrong_family_is_refused(tmp_path, assets, tiny_spec):
    """A one-file checkpoint is read like loading reads it: same architecture, and a model.family that does not
    match the file is an error (an estimate of another model would mislead), not an SDXL estimate of an SD1 file."""
    from lycotrain.diffusion.models import load_pipeline
    from lycotrain.diffusion.single_file import save_single_file
    from lycotrain.errors import ModelError

    path = save_single_file(load_pipeline(str(assets[0])).pipeline, tmp_path / "tiny.safetensors", family="sd1")
    spec = spec_from_path(str(path))
    assert (spec.family, spec.unet["block_out_channels"]) == ("sd1", tiny_spec.unet["block_out_channels"])
    with pytest.raises(ModelError, match="holds a sd1 model, not 'sdxl'"):
        spec_from_path(str(path), "sdxl")


# ---- in the report -------------------------------------------------------------------------------------------
def test_lint_report_json_and_text_carry_the_estimate(assets, capsys, monkeypatch):
    monkeypatch.setattr(engine_memory, "visible_gpu", lambda device=None: None)
    model, data = assets
    args = ["lint", str(data), "--resolution", "32", "--min-bucket", "32", "--max-bucket", "64", "--bucket-step",
            "8", "--batch-size", "2"]
    assert main(args + ["--model", str(model), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    estimate = report["memory"]
    assert estimate["estimate"] and estimate["device_type"] == "cuda"  # lint estimates for a CUDA GPU
    assert estimate["total_bytes"] == sum(item["bytes"] for item in estimate["items"])
    assert {"UNet weights", "activations", "optimizer state", "CUDA runtime"} <= {i["name"] for i in estimate["items"]}

    monkeypatch.setattr(engine_memory, "visible_gpu", lambda device=None: TINY_GPU)
    assert main(args + ["--model", str(model)]) == 0
    text = capsys.readouterr().out
    assert "Memory estimate (an estimate, per training process; batch 2 at 32x32, fp32" in text
    assert "  total: about 0.5" in text and "WARNING: the estimated memory need" in text
    assert "set training.gradient_checkpointing = true" in text

    assert main(args) == 0  # no model: the report says why there is no estimate
    assert "Memory estimate: not available (no model.path given" in capsys.readouterr().out
    assert main(args + ["--model", str(model.parent / "missing")]) == 0  # a bad path costs the estimate only
    assert "Memory estimate: not available (ModelError:" in capsys.readouterr().out


# ---- real size -------------------------------------------------------------------------------------------------
def test_sd15_size_estimate_on_the_meta_device():
    """The real SD1.5 architecture at 512 px, fp16: exact weights, plausible activations, seconds not minutes."""
    spec = spec_from_path(str(SD_CONFIGS / "sd1"))
    config = Config.from_dict({"model": {"path": "sd15"}, "network": {"method": "lora", "rank": 16},
                               "training": {"mixed_precision": "fp16"}})
    started = time.perf_counter()
    plain = estimate_memory(spec, config, batch_size=1, width=512, height=512, weight_dtype=torch.float16)
    seconds = time.perf_counter() - started
    checkpointed = estimate_memory(spec, config.replace(["training.gradient_checkpointing=true"]), batch_size=1,
                                   width=512, height=512, weight_dtype=torch.float16)
    assert plain.item("UNet weights").bytes == 2 * 859_520_964  # SD1.5's UNet parameter count, in fp16
    assert plain.item("text encoder weights").bytes == 2 * 123_060_480 + 8 * 77  # CLIP-L (+ position_ids buffer)
    assert 0.5 * 1024**3 < plain.item("activations").bytes < 4 * 1024**3
    assert checkpointed.item("activations").bytes < plain.item("activations").bytes / 2
    assert 3 * 1024**3 < plain.total_bytes < 8 * 1024**3
    assert seconds < 60  # a few seconds on an idle machine; generous for a shared CI box


def test_only_the_main_process_estimates(tmp_path, image_assets, monkeypatch, as_other_rank):
    """The others would only wait for it: under accelerate launch each rank once ran the whole estimate."""
    from lycotrain.diffusion import lint

    class SecondRank(DiffusionTask):
        def setup(self, config, accelerator, events):
            super().setup(config, as_other_rank(accelerator), events)

    monkeypatch.setattr(lint, "add_memory_estimate", lambda *a, **k: pytest.fail("estimated on a non-main rank"))
    config = image_config(tmp_path / "run", *image_assets, training={"max_steps": 1})
    assert train(config, task=SecondRank())["status"] == "finished"
