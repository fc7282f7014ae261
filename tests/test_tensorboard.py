"""save.tensorboard: TensorBoard records hold what events.jsonl holds (loss, learning rates, it/s, previews,
AdaLoRA's budget), a resumed run continues the same folder without duplicate points, a missing package stops the
run before training, a failing write only warns, and the option off writes nothing."""

import errno
import shutil
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from _image_runs import events, image_config
from text_helpers import tiny_model_dir

from lycotrain.engine.config import Config
from lycotrain.engine.loop import train
from lycotrain.engine.tensorboard import TENSORBOARD_DIR
from lycotrain.text.demo import write_demo_dataset

pytestmark = pytest.mark.usefixtures("isolated_home")


def read_back(run_dir):
    accumulator = EventAccumulator(str(run_dir / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator, tag):
    return [(point.step, point.value) for point in accumulator.Scalars(tag)]


def test_scalars_and_previews_match_the_events(tmp_path, image_assets):
    model, data = image_assets
    run_dir = tmp_path / "run"
    config = image_config(run_dir, model, data, network={"train_text_encoder": True},
                          training={"max_steps": 4, "text_encoder_lr": 5e-3},
                          sample={"every_n_steps": 2, "prompts": [{"prompt": "lyco", "steps": 2}]},
                          save={"tensorboard": True})
    seen = []  # the caller's listener (the CLI's progress bar) still gets every event
    assert train(config, listener=seen.append)["status"] == "finished"
    steps, board = events(run_dir, "step"), read_back(run_dir)
    assert [e for e in seen if e["type"] == "step"] == steps
    assert scalars(board, "loss") == [(e["step"], pytest.approx(e["loss"], rel=1e-6)) for e in steps]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert scalars(board, "lr/group_0") == [(e["step"], pytest.approx(1e-2)) for e in steps]  # the UNet's
    assert scalars(board, "lr/group_1") == [(e["step"], pytest.approx(5e-3)) for e in steps]  # the text encoder's
    assert scalars(board, "it_s") == [(e["step"], pytest.approx(e["it_s"], rel=1e-6)) for e in steps]
    images = board.Images("preview/0")
    assert [e["step"] for e in events(run_dir, "preview")] == [image.step for image in images] == [2, 4]
    assert all((image.width, image.height) == (32, 32) for image in images)


def test_resume_continues_the_folder_without_duplicate_steps(tmp_path, image_assets):
    model, data = image_assets
    run_dir = tmp_path / "run"
    config = image_config(run_dir, model, data, training={"max_steps": 4},
                          save={"tensorboard": True, "every_n_steps": 2, "keep_last": 0})
    assert train(config)["status"] == "finished"
    shutil.rmtree(run_dir / "checkpoints" / "step-4")  # as if it died after logging step 4, before saving it
    assert train(config, resume=True)["status"] == "finished"
    resumed = {e["step"]: e["loss"] for e in events(run_dir, "step")}  # later lines win: the resumed run's
    assert scalars(read_back(run_dir), "loss") == [(s, pytest.approx(resumed[s], rel=1e-6)) for s in (1, 2, 3, 4)]
    assert len(list((run_dir / TENSORBOARD_DIR).iterdir())) == 2  # one file per attempt, in the same folder


def test_missing_package_stops_before_training(tmp_path, image_assets, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    model, data = image_assets
    run_dir = tmp_path / "run"
    result = train(image_config(run_dir, model, data, save={"tensorboard": True}))
    assert result["status"] == "failed"
    assert "save.tensorboard" in result["message"] and "pip install tensorboard" in result["message"]
    assert events(run_dir, "step") == [] and not (run_dir / TENSORBOARD_DIR).exists()


def test_other_processes_write_nothing_but_need_the_package_too(tmp_path, monkeypatch):
    """accelerate launch: only the main process writes records; every process stops alike without the package."""
    from types import SimpleNamespace

    from lycotrain.engine.loop import Trainer, _SilentEvents
    from lycotrain.errors import ConfigError

    run_dir = tmp_path / "run"
    config = Config.from_dict({"run_dir": str(run_dir), "save": {"tensorboard": True}})
    trainer = Trainer(config, SimpleNamespace(is_main_process=False), _SilentEvents(run_dir), task=None)
    trainer._attach_tensorboard(resumed_step=None)
    assert trainer.events.listener is None and not (run_dir / TENSORBOARD_DIR).exists()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        trainer._attach_tensorboard(resumed_step=None)


def test_a_failing_write_warns_once_and_training_goes_on(tmp_path, image_assets, monkeypatch):
    from torch.utils.tensorboard import SummaryWriter

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(SummaryWriter, "add_scalar", disk_full)
    model, data = image_assets
    run_dir = tmp_path / "run"
    result = train(image_config(run_dir, model, data, training={"max_steps": 3}, save={"tensorboard": True}))
    assert result["status"] == "finished"
    assert [e["step"] for e in events(run_dir, "step")] == [1, 2, 3]
    warnings = [e["message"] for e in events(run_dir, "warning") if "TensorBoard" in e["message"]]
    assert len(warnings) == 1 and "No space left on device" in warnings[0]


def test_option_off_writes_no_folder(tmp_path, image_assets):
    model, data = image_assets
    run_dir = tmp_path / "run"
    assert train(image_config(run_dir, model, data, training={"max_steps": 1}))["status"] == "finished"
    assert not (run_dir / TENSORBOARD_DIR).exists()


def test_adalora_budget_from_a_text_run(tmp_path):
    network = {"method": "adalora", "target_modules": ["q_proj", "v_proj"], "init_r": 8, "target_r": 4,
               "tinit": 1, "tfinal": 1}
    config = Config.from_dict({"task": "text", "run_dir": str(tmp_path / "run"),
                               "model": {"path": str(tiny_model_dir("llama"))},
                               "dataset": {"path": str(write_demo_dataset(tmp_path / "data")), "max_length": 64},
                               "network": network, "training": {"max_steps": 4, "batch_size": 4, "lr": 1e-2},
                               "save": {"tensorboard": True}})
    assert train(config)["status"] == "finished"
    (ranks,) = events(tmp_path / "run", "ranks")  # the pattern is fixed at step 4 - tfinal
    assert scalars(read_back(tmp_path / "run"), "adalora/budget") == [(ranks["step"], ranks["budget"])]
