"""``lycotrain train``: a run from --set fields, then --resume --add-steps through the CLI."""

import shlex

import pytest

from _image_runs import build_assets, events, image_config
from lycotrain.cli import main
from lycotrain.engine.config import config_to_cli, load_config


def test_train_from_the_cli_command_then_extend(tmp_path, isolated_home, capsys):
    model, data = build_assets(tmp_path)
    config = image_config(tmp_path / "run", model, data, training={"max_steps": 2})
    words = shlex.split(config_to_cli(config))
    assert words[:2] == ["lycotrain", "train"]
    assert main(words[1:] + ["--no-progress"]) == 0
    assert "finished at step 2" in capsys.readouterr().out
    assert main(["train", "--resume", str(tmp_path / "run"), "--add-steps", "2", "--no-progress"]) == 0
    assert [e["step"] for e in events(tmp_path / "run", "step")] == [1, 2, 3, 4]
    assert load_config(tmp_path / "run" / "config.toml").training.max_steps == 4


@pytest.mark.parametrize("argv, message", [
    (["train", "--add-steps", "3", "--no-progress"], "--add-steps needs --resume"),
    (["train", "--set", "network.method=dora"], "network.method"),
])
def test_cli_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
