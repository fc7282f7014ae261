"""Two CPU processes through ``accelerate launch --multi_gpu`` with ACCELERATE_USE_CPU (torchrun + gloo): the run trains and both ranks end with identical
adapters (the loop averages the adapter gradients across processes)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _image_runs import build_assets, events, image_config
from lycotrain.engine import checkpoint as ckpt


@pytest.mark.slow  # ~35 s: two processes each load torch, diffusers and the model
def test_two_processes_train_identical_adapters(tmp_path):
    model, data = build_assets(tmp_path, images=4)
    config = image_config(tmp_path / "run", model, data, network={"method": "loha"},
                          training={"max_steps": 6, "batch_size": 1, "lr": 1e-2}, save={"every_n_steps": 3})
    config.write_toml(tmp_path / "config.toml")
    out = tmp_path / "out"
    out.mkdir()
    here = Path(__file__).parent
    env = {**os.environ, "LYCOTRAIN_HOME": str(tmp_path / "home"), "PYTHONPATH": str(here),
           "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "0", str(here / "_distributed_run.py"), str(tmp_path / "config.toml"), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(out / f"rank{i}.pt", weights_only=True) for i in range(2)]
    assert [r["world"] for r in ranks] == [2, 2] and [r["status"] for r in ranks] == ["finished"] * 2
    for key, value in ranks[0]["adapters"].items():
        torch.testing.assert_close(ranks[1]["adapters"][key], value, rtol=0, atol=0)
    assert any(v.abs().sum() > 0 for k, v in ranks[0]["adapters"].items() if "w2_a" in k)  # it trained
    assert len(ckpt.load_training_state(ckpt.latest_checkpoint(tmp_path / "run"))["rng"]) == 2
    # 4 images, batch 1, 2 processes: 2 steps per epoch, as the pre-flight report says
    assert events(tmp_path / "run", "start")[0]["steps_per_epoch"] == 2
    assert events(tmp_path / "run", "preflight")[0]["report"]["steps"]["steps_per_epoch"] == 2
