"""What a new user meets when following the README: the documented commands work as written, and the
obvious mistakes end in a message naming the file or field and the fix (exit status 2), never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from _image_runs import events, image_config
from lycotrain.engine.config import Config
from lycotrain.engine.loop import train

PREVIEW = {"prompts": [{"prompt": "lyco, red circle", "seed": 1, "steps": 2, "cfg": 2.0}], "at_start": True}


@pytest.fixture
def fresh_accelerate():
    """accelerate keeps one mixed-precision setting per process; these tests change it, then restore it."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_run_renders_previews(tmp_path, isolated_home, image_assets, fresh_accelerate):
    """The SDXL presets train in bf16 with previews: the fp32 adapters on bf16 weights must render too."""
    config = image_config(tmp_path / "run", *image_assets, training={"max_steps": 1, "mixed_precision": "bf16"},
                          sample=PREVIEW)
    result = train(config)
    assert result["status"] == "finished", result["message"]
    assert len(events(tmp_path / "run", "preview")) == 1


def test_fp16_on_the_cpu_trains_in_fp32_with_a_warning(tmp_path, isolated_home, image_assets, fresh_accelerate):
    """The SD1.5 presets say fp16, which the CPU cannot autocast: the run says so and trains in fp32."""
    config = image_config(tmp_path / "run", *image_assets, training={"max_steps": 1, "mixed_precision": "fp16"},
                          sample=PREVIEW)
    result = train(config)
    assert result["status"] == "finished", result["message"]
    assert any("training.mixed_precision" in w["message"] for w in events(tmp_path / "run", "warning"))


def test_previews_decode_with_the_fp32_vae_under_autocast(image_assets):
    """Under a bf16/fp16 run the VAE still decodes in fp32 (low-precision VAEs overflow to black images)."""
    import numpy as np
    import torch

    from lycotrain.diffusion.models import load_pipeline
    from lycotrain.diffusion.sampling import decode_latents

    pipeline = load_pipeline(image_assets[0]).pipeline
    latents = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)).bfloat16().float()
    reference = np.asarray(decode_latents(pipeline, latents))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert np.array_equal(np.asarray(decode_latents(pipeline, latents.bfloat16())), reference)


@pytest.fixture(scope="module")
def sd2_files(tmp_path_factory, image_assets) -> tuple[Path, Path]:
    """(an SD2-layout single file with lycotrain's metadata, the same weights without any metadata)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from lycotrain.diffusion.models import load_pipeline
    from lycotrain.diffusion.single_file import save_single_file

    root = tmp_path_factory.mktemp("sd2")
    tagged = save_single_file(load_pipeline(image_assets[0]).pipeline, root / "sd2.safetensors", "sd2")
    with safe_open(str(tagged), "pt") as f:
        save_file({key: f.get_tensor(key) for key in f.keys()}, str(root / "bare-sd2.safetensors"))
    return tagged, root / "bare-sd2.safetensors"


def test_model_family_sets_sd2_v_prediction(tmp_path, isolated_home, image_assets, sd2_files):
    """The README's `model.family = "sd2-v"` exists and reaches the model loader."""
    from lycotrain.formats.kohya import read_adapter_file

    config = image_config(tmp_path / "run", sd2_files[0], image_assets[1], training={"max_steps": 1})
    config = Config.from_dict({**config.to_dict(), "model": {"path": str(sd2_files[0]), "family": "sd2-v"}})
    result = train(config)
    assert result["status"] == "finished", result["message"]
    assert read_adapter_file(result["outputs"]["adapter"]).metadata["ss_base_model_version"] == "sd_v2_v"


def test_bare_sd2_file_names_the_setting_that_fixes_it(tmp_path, sd2_files, capsys):
    from lycotrain.cli import main

    bare = str(sd2_files[1])
    assert main(["extract", "--base", bare, "--tuned", bare, "--rank", "1", "--out", str(tmp_path / "x")]) == 2
    assert "model.family" in capsys.readouterr().err


def test_family_option_reaches_the_loader(tmp_path, image_assets, capsys):
    from lycotrain.cli import main

    model = str(image_assets[0])
    assert main(["extract", "--base", model, "--tuned", model, "--family", "sdxl", "--rank", "1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "not 'sdxl'" in capsys.readouterr().err


def test_text_demo_keeps_out_of_the_image_demo_folder(tmp_path, isolated_home, monkeypatch, capsys):
    """`make demo`, then `lycotrain demo --task text` (the README's order): the text demo has its own folder
    and leaves the image demo's model and run alone; an explicit shared --out is refused, both ways."""
    from lycotrain.cli import main

    monkeypatch.chdir(tmp_path)
    image_base = tmp_path / "demo-out" / "base"
    image_base.mkdir(parents=True)
    (image_base / "model_index.json").write_text("{}")
    assert main(["demo", "--task", "text", "--steps", "2"]) == 0
    assert (tmp_path / "demo-out" / "text" / "run" / "adapter" / "adapter_config.json").is_file()
    assert sorted(p.name for p in image_base.iterdir()) == ["model_index.json"]

    assert main(["demo", "--task", "text", "--out", "demo-out", "--steps", "2"]) == 2
    assert "holds the image demo's model" in capsys.readouterr().err
    assert main(["demo", "--out", "demo-out/text", "--steps", "2"]) == 2
    assert "holds the text demo's model" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["inspect", "check"])
def test_a_model_or_a_folder_given_as_the_adapter_file(tmp_path, sd2_files, command, capsys):
    """Swapping FILE and --model, or naming the run folder: a short message that says what to give instead."""
    from lycotrain.cli import main

    extra = ["--model", "builtin:tiny-sd1"] if command == "check" else []
    assert main([command, str(sd2_files[0]), *extra]) == 2
    message = capsys.readouterr().err
    assert "model checkpoint" in message and "--model" in message and len(message) < 400
    assert main([command, str(tmp_path), *extra]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_app_on_a_busy_port_says_so(capsys):
    """A second `lycotrain app` on the default port: a message naming the port and --port, no traceback."""
    import socket

    from lycotrain.cli import main

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["app", "--port", str(port), "--runs", "unused-runs"]) == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def test_written_files_and_folders_are_readable_by_others(tmp_path):
    """Adapter files, sidecars, checkpoints and built models get the umask's mode (e.g. 0644/0755), not the
    private 0600/0700 of temporary files: a WebUI running as another user must be able to load them."""
    import os
    import stat

    from lycotrain.atomic import atomic_write_text
    from lycotrain.engine.checkpoint import write_checkpoint
    from lycotrain.paths import build_folder_once

    umask = os.umask(0o022)
    os.umask(umask)

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    atomic_write_text(tmp_path / "a.json", "{}")
    assert mode(tmp_path / "a.json") == 0o666 & ~umask
    built = build_folder_once(tmp_path / "model", "done", lambda tmp: (tmp / "done").write_text("x"))
    assert mode(built) == 0o777 & ~umask
    folder = write_checkpoint(tmp_path / "run", 1, lambda tmp: (tmp / "state").write_text("x"), keep_last=0)
    assert mode(folder) == 0o777 & ~umask


def test_top_level_help_says_what_lycotrain_does(capsys):
    from lycotrain.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "Train adapters" in out and "lycotrain/commands" not in out


def test_output_into_a_closed_pipe_is_not_a_traceback(tmp_path):
    """`lycotrain lint DATA --json | head -1`: the reader leaves early; no traceback, no 'Exception ignored'."""
    import os
    import subprocess
    import sys

    from lycotrain.diffusion.demo_data import make_demo_dataset

    data = make_demo_dataset(tmp_path / "data", count=2)
    env = {**os.environ, "LYCOTRAIN_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen([sys.executable, "-m", "lycotrain.cli", "lint", str(data), "--json"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # before the child writes anything
    stderr = child.stderr.read().decode()
    child.wait(timeout=120)
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr


def test_build_tiny_refuses_an_occupied_out(tmp_path, capsys):
    """A second model into the same folder would mix two models' files; a file as --out was a traceback."""
    from lycotrain.cli import main

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("x")
    for out in ("model", "notes.txt"):
        assert main(["build-tiny", "--arch", "llama", "--out", str(tmp_path / out)]) == 2
        assert "not an empty folder" in capsys.readouterr().err


def test_adalora_text_demo_takes_any_steps(tmp_path, isolated_home):
    """`lycotrain demo --task text --method adalora --steps 10` failed: tinit/tfinal were fixed for 150 steps."""
    from lycotrain.cli import main
    from lycotrain.text.demo import demo_config

    assert main(["demo", "--task", "text", "--method", "adalora", "--steps", "10", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
    network = demo_config("adalora", tmp_path, tmp_path, tmp_path, steps=150).network
    assert (network.tinit, network.tfinal) == (20, 40)  # the default demo is unchanged


def test_a_failed_run_reports_its_error_once_on_stderr(tmp_path, isolated_home, capsys, image_assets):
    from lycotrain.cli import main

    assert main(["train", "--set", f"model.path={str(tmp_path / 'missing.safetensors')!r}",
                 "--set", f"dataset.path={str(image_assets[1])!r}", "--set", f"run_dir={str(tmp_path / 'run')!r}"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("missing.safetensors does not exist") == 1, captured.err
    assert "does not exist" not in captured.out


def test_resume_of_a_folder_without_a_run(tmp_path, capsys):
    from lycotrain.cli import main

    assert main(["train", "--resume", str(tmp_path / "runs" / "typo")]) == 2
    assert "no run there" in capsys.readouterr().err
