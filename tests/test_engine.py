"""The shared training loop on a toy task: learning, events, checkpoints, exact resume, stop, +N steps,
NaN and error handling, optimizers."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _engine_toy import ToyTask  # noqa: E402

from lycotrain.engine import checkpoint as ckpt  # noqa: E402
from lycotrain.engine.config import Config  # noqa: E402
from lycotrain.engine.events import iter_events  # noqa: E402
from lycotrain.engine.loop import STOP_FILE, train  # noqa: E402
from lycotrain.engine.optim import build_optimizer, build_scheduler  # noqa: E402
from lycotrain.errors import ConfigError  # noqa: E402


def toy_config(run_dir, **training):
    data = {"run_dir": str(run_dir), "seed": 3,
            "training": {"max_steps": 20, "batch_size": 4, "lr": 0.1, **training},
            "sample": {"prompts": [{"prompt": "p"}]}, "save": {"keep_last": 2}}
    return Config.from_dict(data)


def events_of(run_dir, kind):
    return [e for e in iter_events(run_dir) if e["type"] == kind]


def test_trains_and_reports(tmp_path):
    task = ToyTask()
    result = train(toy_config(tmp_path / "run", scheduler="cosine", warmup_steps=2), task=task)
    assert result["status"] == "finished" and result["step"] == 20
    losses = [e["loss"] for e in events_of(tmp_path / "run", "step")]
    assert len(losses) == 20 and losses[-1] < 0.5 * losses[0]
    kinds = [e["type"] for e in iter_events(tmp_path / "run")]
    assert kinds[:2] == ["preflight", "start"] and kinds[-1] == "end"
    assert task.after_steps[0] == (1, 20) and task.after_steps[-1] == (20, 20)
    assert task.previews == [(20, True)]  # the final preview, from the exported file
    end = events_of(tmp_path / "run", "end")[0]
    assert (tmp_path / "run" / end["outputs"]["adapter"]).is_file()
    assert (tmp_path / "run" / end["outputs"]["checkpoint"] / ckpt.STATE_FILE).is_file()
    assert (tmp_path / "run" / "config.toml").is_file()


def test_epochs_accumulation_previews_and_keep_last(tmp_path):
    config = toy_config(tmp_path / "run", max_steps=0, epochs=3, grad_accum=2)  # 24 items / 4 = 6 micro -> 3 steps
    config.save.every_n_steps, config.sample.every_n_steps, config.sample.at_start = 2, 4, True
    task = ToyTask()
    assert train(config, task=task)["status"] == "finished"
    assert [e["step"] for e in events_of(tmp_path / "run", "step")] == list(range(1, 10))
    assert task.previews == [(0, False), (4, False), (8, False), (9, True)]
    assert [step for step, _ in ckpt.checkpoints(tmp_path / "run")] == [8, 9]  # keep_last = 2
    assert not list((tmp_path / "run" / ckpt.CHECKPOINTS).glob(".*"))


@pytest.mark.parametrize("training", [{"grad_accum": 1}, {"grad_accum": 2, "scheduler": "linear", "warmup_steps": 3}])
def test_stop_and_resume_equals_uninterrupted(tmp_path, training):
    reference = ToyTask()
    train(toy_config(tmp_path / "a", **training), task=reference)

    run_dir = tmp_path / "b"

    def stop_at_7(event):  # a stop request mid-epoch (6 micro-batches per epoch)
        if event["type"] == "step" and event["step"] == 7:
            (run_dir / STOP_FILE).touch()

    first = train(toy_config(run_dir, **training), task=ToyTask(), listener=stop_at_7)
    assert first["status"] == "stopped" and first["step"] == 7
    assert events_of(run_dir, "end")[-1]["outputs"]["checkpoint"] == "checkpoints/step-7"
    resumed = ToyTask()
    second = train(toy_config(run_dir, **training), task=resumed, resume=True)
    assert second["status"] == "finished" and second["step"] == 20
    for key, value in reference.weights().items():
        torch.testing.assert_close(resumed.weights()[key], value, rtol=0, atol=0)
    lrs_a = [e["lr"] for e in events_of(tmp_path / "a", "step")]
    lrs_b = [e["lr"] for e in events_of(run_dir, "step")]
    assert lrs_b == lrs_a


@pytest.mark.filterwarnings("ignore:Detected call of")
def test_add_steps_rebuilds_the_schedule_coherently(tmp_path):
    run_dir = tmp_path / "run"
    train(toy_config(run_dir, scheduler="cosine", max_steps=10), task=ToyTask())
    more = train(toy_config(run_dir, scheduler="cosine", max_steps=10), task=ToyTask(), resume=True, add_steps=10)
    assert more["status"] == "finished" and more["step"] == 20
    lrs = [e["lr"] for e in events_of(run_dir, "step")][10:]
    planned = build_scheduler(toy_config(run_dir, scheduler="cosine", max_steps=20).training,
                              torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), 20)
    expected = []
    for _ in range(20):
        planned.step()
        expected.append(planned.get_last_lr()[0])
    assert lrs == pytest.approx(expected[10:])
    assert "max_steps = 20" in (run_dir / "config.toml").read_text()
    assert events_of(run_dir, "start")[-1]["resumed_from"] == 10


def test_fresh_start_refuses_an_existing_run(tmp_path):
    train(toy_config(tmp_path / "run", max_steps=2), task=ToyTask())
    result = train(toy_config(tmp_path / "run", max_steps=2), task=ToyTask())
    assert result["status"] == "failed" and "--resume" in result["message"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    config = toy_config(tmp_path / "run")
    config.save.every_n_steps = 3
    result = train(config, task=ToyTask(nan_at_step=7))
    assert result["status"] == "failed" and "nan" in result["message"] and "step-6" in result["message"]
    assert [s for s, _ in ckpt.checkpoints(tmp_path / "run")] == [3, 6]
    assert events_of(tmp_path / "run", "error")[0]["message"] == result["message"]
    assert events_of(tmp_path / "run", "end")[0]["status"] == "failed"


def test_unexpected_error_becomes_an_event_and_error_log(tmp_path):
    result = train(toy_config(tmp_path / "run"), task=ToyTask(fail_at_step=2))
    assert result["status"] == "failed" and "RuntimeError: boom" in result["message"]
    assert "Traceback" in (tmp_path / "run" / "error.log").read_text()
    assert [e["type"] for e in iter_events(tmp_path / "run")][-2:] == ["error", "end"]


def test_half_written_checkpoint_is_ignored_and_removed(tmp_path):
    run_dir = tmp_path / "run"
    config = toy_config(run_dir, max_steps=4)
    config.save.every_n_steps = 2
    train(config, task=ToyTask())
    partial = run_dir / ckpt.CHECKPOINTS / ".step-9.abc"
    partial.mkdir()
    (partial / "toy.safetensors").write_bytes(b"half")
    assert ckpt.latest_checkpoint(run_dir).name == "step-4"
    train(config, task=ToyTask(), resume=True, add_steps=1)
    assert not partial.exists()


def test_optimizers(tmp_path, monkeypatch):
    result = train(toy_config(tmp_path / "run", optimizer="adafactor", scheduler="polynomial"), task=ToyTask())
    assert result["status"] == "finished"
    losses = [e["loss"] for e in events_of(tmp_path / "run", "step")]
    assert losses[-1] < losses[0]
    import importlib

    real_import = importlib.import_module

    def no_prodigy(name, *args):
        if name == "prodigyopt":
            raise ImportError("No module named 'prodigyopt'")
        return real_import(name, *args)

    monkeypatch.setattr(importlib, "import_module", no_prodigy)
    with pytest.raises(ConfigError, match="pip install prodigyopt"):
        build_optimizer(toy_config(tmp_path, optimizer="prodigy").training, [{"params": [torch.zeros(1, requires_grad=True)]}])


def test_events_are_json_lines(tmp_path):
    train(toy_config(tmp_path / "run", max_steps=3), task=ToyTask())
    for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines():
        assert "type" in json.loads(line)


def test_a_warmup_longer_than_the_epochs_gives_a_warning(tmp_path):
    config = toy_config(tmp_path / "run", max_steps=0, epochs=1, scheduler="cosine", warmup_steps=50)  # 6 steps
    assert train(config, task=ToyTask())["status"] == "finished"
    warnings = [e["message"] for e in events_of(tmp_path / "run", "warning")]
    assert any("training.warmup_steps (50) covers the whole run of 6 steps" in w for w in warnings)
