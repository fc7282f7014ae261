"""The app stays light (no torch in its process), warns when exposed without a login, and its live view renders
a run from its events, re-rendering only what changed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import gradio as gr
import pytest

from lycotrain.engine.events import EventWriter
from lycotrain.errors import ConfigError
from lycotrain.jobs import JobManager, JobRecord
from lycotrain.ui import app as ui_app
from lycotrain.ui import live

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "safetensors.torch")


def test_building_the_app_never_imports_heavy_libraries(tmp_path: Path) -> None:
    code = ("import sys; from lycotrain.jobs import JobManager; from lycotrain.ui.app import build_app; "
            f"build_app(JobManager({str(tmp_path)!r})); "
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_exposure_warning_and_auth() -> None:
    assert ui_app.is_loopback("127.0.0.1") and ui_app.is_loopback("localhost") and ui_app.is_loopback("::1")
    assert not ui_app.is_loopback("0.0.0.0")
    assert ui_app.exposure_warning("127.0.0.1", None) is None
    assert "--auth" in ui_app.exposure_warning("0.0.0.0", None)
    assert ui_app.exposure_warning("0.0.0.0", ("a", "b")) is None
    assert ui_app.parse_auth("alice:s3:cret") == ("alice", "s3:cret")
    assert ui_app.parse_auth(None) is None
    with pytest.raises(ConfigError, match="--auth"):
        ui_app.parse_auth("alice")


def _fake_run(manager: JobManager, state: str = "running") -> JobRecord:
    run_dir = manager.new_run_dir("loha-demo")
    record = JobRecord(id=run_dir.name, run_dir=str(run_dir), task="image", name="loha-demo", state=state)
    (run_dir / "job.json").write_text(json.dumps(record.__dict__))
    events = EventWriter(run_dir)
    events.emit("start", run_dir=str(run_dir), task="image", method="loha", total_steps=10, config={})
    for step in (1, 2, 3):
        events.emit("step", step=step, total_steps=10, epoch=0, loss=0.5 / step, lr=1e-4, it_s=2.5, eta_s=2.8)
    (run_dir / "previews").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(run_dir / "previews" / "p.png")
    events.emit("preview", step=3, images=["previews/p.png"])
    events.emit("warning", message="2 images have no caption <b>")
    return record


def test_live_view_renders_and_skips_what_did_not_change(tmp_path: Path) -> None:
    manager = JobManager(tmp_path / "runs")
    record = _fake_run(manager)
    with gr.Blocks():
        view = live.LiveView(manager, "image")
    job, rendered, picker, progress, messages, plot, previews, details, downloads = view.refresh(None, {})
    assert job == record.id  # a fresh page attaches to the running job
    assert "step 3 / 10" in progress and "2.50 it/s" in progress and "ETA 0:03" in progress
    assert list(plot["step"]) == [1, 2, 3]
    assert previews == [(str(Path(record.run_dir) / "previews/p.png"), "step 3")]
    assert "&lt;b&gt;" in messages  # escaped, shown
    again = view.refresh(job, rendered)
    assert again[5] is not None and isinstance(again[5], type(gr.skip()))  # plot unchanged: skipped
    EventWriter(record.run_dir).emit("step", step=4, total_steps=10, epoch=0, loss=0.1, lr=1e-4, it_s=2, eta_s=3)
    assert list(view.refresh(job, again[1])[5]["step"]) == [1, 2, 3, 4]


def test_downloads_list_files_of_output_folders(tmp_path: Path) -> None:
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"x")
    (tmp_path / "a.safetensors").write_bytes(b"x")
    view = live.RunView(outputs={"adapter": str(tmp_path / "adapter"), "file": str(tmp_path / "a.safetensors"),
                                 "gone": str(tmp_path / "missing")})
    assert live.download_files(view) == [str(tmp_path / "adapter" / "adapter_model.safetensors"),
                                         str(tmp_path / "a.safetensors")]
    assert live.format_duration(3725) == "1:02:05" and live.format_duration(None) == "—"


def test_adalora_rank_allocation_is_shown(tmp_path: Path) -> None:
    view = live.RunView()
    view.apply({"type": "ranks", "step": 7, "budget": 12, "ranks": {"layers.0.q_proj": 5, "layers.0.v_proj": 7}},
               tmp_path)
    text = live.details_markdown(view)
    assert "fixed at step 7" in text and "total rank 12" in text and "| `layers.0.q_proj` | 5 |" in text


@pytest.fixture
def tools(tmp_path: Path, monkeypatch) -> tuple[Any, Path, list[list[str]]]:
    """A tools tab whose commands are recorded instead of run, an (empty) adapter file, and the recorded calls."""
    from lycotrain.ui import tools_tab
    from lycotrain.ui.runner import CliResult

    calls: list[list[str]] = []
    monkeypatch.setattr(tools_tab, "run_cli", lambda args, timeout_s=0: calls.append(args) or
                        CliResult(args, 0, "ok", ""))
    adapter = tmp_path / "a.safetensors"
    adapter.write_bytes(b"")
    with gr.Blocks():
        tab = tools_tab.ToolsTab(JobManager(tmp_path / "runs"))
    return tab, adapter, calls


def test_tools_tab_passes_the_model_family_to_check_merge_and_extract(tools) -> None:
    tab, adapter, calls = tools
    assert isinstance(tab.family, gr.Dropdown) and tab.family.value == "auto"
    data = {tab.upload: None, tab.path: str(adapter), tab.model: "/models/v2.safetensors", tab.family: "sd2-v",
            tab.merge_multiplier: 1.0, tab.extract_rank: 4}
    tab.inspect(data), tab.merge(data), tab.extract(data)
    assert [args[0] for args in calls] == ["inspect", "check", "merge", "extract"]
    for args in calls[1:]:
        assert args[args.index("--family") + 1] == "sd2-v"


def test_tools_tab_merges_at_multiplier_zero(tools) -> None:
    """0 is a multiplier like any other (the form once replaced it with the default 1.0)."""
    tab, adapter, calls = tools
    data = {tab.upload: None, tab.path: str(adapter), tab.model: "builtin:tiny-sd1", tab.family: "auto"}
    tab.merge({**data, tab.merge_multiplier: 0.0})
    tab.merge({**data, tab.merge_multiplier: None})  # an emptied field: the default
    assert [args[args.index("--multiplier") + 1] for args in calls] == ["0.0", "1.0"]


def _handler(app: gr.Blocks, component: gr.components.Component, event: str):
    """The function the page calls for ``event`` on ``component``."""
    return next(f.fn for f in app.fns.values() if (component._id, event) in f.targets)


def test_a_failed_upload_empties_the_upload_box(tmp_path: Path, monkeypatch) -> None:
    """The refused file stayed in the box, and every later upload sent it again and failed with it."""
    from lycotrain.ui import datasets
    from lycotrain.ui.image_tab import ImageTab
    from lycotrain.ui.text_tab import TextTab

    manager = JobManager(tmp_path / "runs")
    with gr.Blocks() as app:
        image, text = ImageTab(manager), TextTab(manager)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"instruction": "x",}]')
    out = _handler(app, text.upload, "upload")(str(bad_json))
    assert "bad.json: not valid JSON" in out[text.message] and out[text.upload] is None
    assert not (manager.runs_root / "_uploads").exists()  # refused before anything was copied
    (tmp_path / "cat.png").write_bytes(b"")
    (tmp_path / "broken.zip").write_bytes(b"PK not a zip")
    out = _handler(app, image.upload, "upload")([str(tmp_path / "broken.zip")])
    assert "Imported 0 image(s)" in out[image.message] and "rejected `broken.zip`" in out[image.message]
    assert image.form["dataset.path"] not in out and not any((manager.runs_root / "_uploads").iterdir())
    monkeypatch.setattr(datasets, "MAX_UPLOAD_FILES", 0)
    out = _handler(app, image.upload, "upload")([str(tmp_path / "cat.png")])
    assert "at most 0 per upload" in out[image.message] and out[image.upload] is None


def test_caption_editor_never_drops_an_edit_that_was_not_saved(tmp_path: Path) -> None:
    """Clicking another image or reloading the gallery threw the typed caption away; after a reload, Save wrote
    the emptied box over the previously selected image's caption."""
    from PIL import Image

    from lycotrain.ui.image_tab import ImageTab

    folder = tmp_path / "data"
    folder.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (8, 8)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"caption {name}")
    with gr.Blocks():
        tab = ImageTab(JobManager(tmp_path / "runs"))
    paths = [str(folder / "a.png"), str(folder / "b.png")]
    out = tab.select_caption(paths, ".txt", paths[0], "edited a", gr.SelectData(None, {"index": 1, "value": None}))
    assert (folder / "a.txt").read_text() == "edited a\n" and "Saved your edit of a.txt" in out[tab.message]
    assert out[tab.caption_selected] == paths[1] and out[tab.caption_text] == "caption b"
    out = tab.load_captions(str(folder), ".txt", paths[1], "edited b")
    assert (folder / "b.txt").read_text() == "edited b\n" and out[tab.caption_selected] is None
    out = tab.bulk_replace(str(folder), ".txt", "edited", "new", paths[0], "edited a, again")
    assert (folder / "a.txt").read_text() == "new a, again\n" and out[tab.caption_text] == "new a, again"
    untouched = tab.select_caption(paths, ".txt", paths[1], "new b", gr.SelectData(None, {"index": 0, "value": None}))
    assert untouched[tab.message] == ""  # nothing typed: nothing saved, no message


def test_the_live_view_shows_the_dataset_problems_of_the_pre_flight(tmp_path: Path) -> None:
    """A run whose images all lacked captions (wrong caption extension) trained without a word in the page: the
    pre-flight event listed them, but the live view never read it."""
    manager = JobManager(tmp_path / "runs")
    record = _fake_run(manager)
    with gr.Blocks():
        view = live.LiveView(manager, "image")
    first = view.refresh(None, {})
    assert "pre-flight" not in first[4]
    EventWriter(record.run_dir).emit("preflight", report={"missing_captions": [{"image": "a.png"}] * 10,
                                                          "duplicates": [], "problem_count": 10})
    messages = view.refresh(first[0], first[1])[4]  # a poll re-renders the messages when the report arrives
    assert "10 image(s) without a caption file" in messages and "identical" not in messages


def test_out_of_range_numbers_get_a_message_naming_the_field(tmp_path: Path) -> None:
    """With the widgets' own minimum, rank 0 only showed "Error" in the outputs, over the previous results."""
    from lycotrain.ui.text_tab import TextTab
    from lycotrain.ui.tools_tab import ToolsTab

    manager = JobManager(tmp_path / "runs")
    with gr.Blocks() as app:
        tools, text = ToolsTab(manager), TextTab(manager)
    adapter = tmp_path / "a.safetensors"
    adapter.write_bytes(b"")
    data = {tools.upload: None, tools.path: str(adapter), tools.model: "builtin:tiny-sd1", tools.family: "auto"}
    for button, field, key in ((tools.extract_button, tools.extract_rank, "LoRA rank"),
                               (tools.resize_button, tools.resize_rank, "new rank")):
        assert field.minimum is None
        out = _handler(app, button, "click")({**data, field: 0})
        assert f"{key} = 0 is out of range" in out[tools.message]
        assert out[tools.output] == "" and out[tools.files] is None
    record = _fake_run(manager, state="finished")
    generate = _handler(app, text.gen_button, "click")
    for tokens in (0, 4096):
        out = generate({text.gen_prompt: "hi", text.gen_tokens: tokens, text.live.job_id: record.id})
        assert f"max new tokens = {tokens} is out of range; allowed: 1..2048" in out[text.message]
        assert out[text.gen_base] == "" and out[text.gen_adapted] == ""
    running = _fake_run(manager, state="running")
    out = generate({text.gen_prompt: "hi", text.gen_tokens: 8, text.live.job_id: running.id})
    assert "is running; its adapter exists once it has finished" in out[text.message]


def test_runs_of_the_same_name_can_be_told_apart_in_the_picker(tmp_path: Path) -> None:
    manager = JobManager(tmp_path / "runs")
    first, second = _fake_run(manager, state="finished"), _fake_run(manager, state="finished")
    assert first.name == second.name
    with gr.Blocks():
        view = live.LiveView(manager, "image")
    labels = [label for label, _ in view.refresh(None, {})[2]["choices"]]
    assert len(set(labels)) == 2 and all(label.startswith("loha-demo — ") for label in labels)
    assert re.search(r" · \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", labels[0])
    assert live.run_label(first) == f"loha-demo — finished · {first.id[:4]}-{first.id[4:6]}-{first.id[6:8]} " \
                                    f"{first.id[9:11]}:{first.id[11:13]}:{first.id[13:15]}"
