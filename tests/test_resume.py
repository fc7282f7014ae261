"""Resume on the image task: N steps + stop + resume + N steps equals 2N uninterrupted; a run killed mid-way
resumes from its last complete checkpoint; nothing half-written survives."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _image_runs import build_assets, events, image_config
from lycotrain.engine import checkpoint as ckpt
from lycotrain.engine.config import load_config
from lycotrain.engine.loop import STOP_FILE, train


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_assets(tmp_path_factory.mktemp("assets"), images=3)

pytestmark = pytest.mark.usefixtures("isolated_home")


def resume_config(run_dir, assets, **training):
    model, data = assets
    # batch 2 over 3 images: 2 batches per epoch, so the stop falls mid-epoch; flips and caption dropout
    # come from the data order's seeds, the noise from the global RNG: all must be restored
    return image_config(run_dir, model, data, network={"method": "loha"},
                        dataset={"flip": True, "caption_dropout": 0.3},
                        training={"max_steps": 6, "lr": 1e-2, "scheduler": "cosine", "warmup_steps": 2, **training},
                        save={"every_n_steps": 2})


def final_adapters(run_dir):
    state = ckpt.load_training_state(ckpt.latest_checkpoint(run_dir))
    return state["task"]["adapters"]


def test_stop_and_resume_equals_uninterrupted(tmp_path, assets):
    train(resume_config(tmp_path / "a", assets))
    run_dir = tmp_path / "b"

    def stop_at_3(event):
        if event["type"] == "step" and event["step"] == 3:
            (run_dir / STOP_FILE).touch()

    assert train(resume_config(run_dir, assets), listener=stop_at_3)["status"] == "stopped"
    assert ckpt.latest_checkpoint(run_dir).name == "step-3"
    assert train(resume_config(run_dir, assets), resume=True)["status"] == "finished"
    reference, resumed = final_adapters(tmp_path / "a"), final_adapters(run_dir)
    assert reference.keys() == resumed.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6)
    assert [e["loss"] for e in events(run_dir, "step")] == pytest.approx([e["loss"] for e in events(tmp_path / "a", "step")])


def test_killed_run_resumes_from_its_last_checkpoint(tmp_path, assets):
    run_dir = tmp_path / "run"
    config = resume_config(run_dir, assets, max_steps=500)
    config.save.keep_last = 2
    config_path = tmp_path / "config.toml"
    config.write_toml(config_path)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    child = subprocess.Popen([sys.executable, "-m", "lycotrain.cli", "train", str(config_path), "--no-progress"],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not [e for e in _events(run_dir, "checkpoint") if e["step"] >= 6]:
            time.sleep(0.2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    checkpoints = ckpt.checkpoints(run_dir)
    assert checkpoints and checkpoints[-1][0] >= 6
    for _, folder in checkpoints:  # every visible checkpoint is complete and readable
        ckpt.load_training_state(folder)
        for file in folder.glob("*.safetensors"):
            load_file(str(file))
    last = checkpoints[-1][0]

    config = load_config(run_dir / "config.toml", [f"training.max_steps={last + 2}"])
    result = train(config, resume=True)
    assert result["status"] == "finished" and result["step"] == last + 2
    assert events(run_dir, "start")[-1]["resumed_from"] == last
    hidden = [p for p in run_dir.rglob(".*") if p.name != STOP_FILE]
    assert hidden == []


def _events(run_dir, kind):
    return events(run_dir, kind) if (run_dir / "events.jsonl").exists() else []
