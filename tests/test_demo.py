"""``lycotrain demo`` end to end: a short run in the default suite, the full demo as a slow test."""

import json

import pytest

from lycotrain.cli import main

pytestmark = pytest.mark.usefixtures("isolated_home")


def check_demo_outputs(out, method):
    run = out / "run"
    assert (out / "base" / "model_index.json").is_file() and list((out / "dataset").glob("*.txt"))
    assert (run / f"demo-{method}.safetensors").is_file()
    assert (run / f"demo-{method}.json").is_file() and (run / f"demo-{method}.preview.png").is_file()
    compat = json.loads((run / f"demo-{method}.compat.json").read_text())
    # Forge has no OFT loader (webui-formats.md §3.4): the report must say so; every other case loads everywhere
    rejected = {name for name, loader in compat["loaders"].items() if loader["rejected"]}
    assert rejected == ({"forge"} if method == "oft" else set())
    kinds = [json.loads(line)["type"] for line in (run / "events.jsonl").read_text().splitlines()]
    assert kinds[0] == "preflight" and kinds[-1] == "end" and "preview" in kinds
    assert list((run / "previews").glob("final-*.png"))


def test_quick_demo(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "4"]) == 0
    check_demo_outputs(tmp_path / "demo", "loha")
    printed = capsys.readouterr().out
    assert "demo-loha.safetensors" in printed and "previews" in printed


def test_text_method_needs_the_text_task(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--method", "adalora"]) == 2
    assert "--task text" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["loha", "lora", "lokr", "oft", "hra"])
def test_full_demo(tmp_path, method):
    assert main(["demo", "--out", str(tmp_path / "demo"), "--method", method]) == 0
    check_demo_outputs(tmp_path / "demo", method)
    losses = [e["loss"] for e in map(json.loads, (tmp_path / "demo" / "run" / "events.jsonl").read_text()
                                     .splitlines()) if e["type"] == "step"]
    assert sum(losses[-20:]) < 0.8 * sum(losses[:20])
