"""The form speaks the config schema: widgets from its metadata, values validated by Config.from_dict, and a
preset saved from the form loads back into the same form values."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pytest

from lycotrain.engine.config import load_config
from lycotrain.errors import ConfigError, DatasetError, LycotrainError
from lycotrain.ui import forms, presets
from lycotrain.ui.image_tab import METHOD_PARAMS


def _values(**changes) -> dict:
    values = {"model.path": "builtin:tiny-sd1", "dataset.path": "/data", "network.method": "oft",
              "network.rank": 4, "network.block_size": 16, "training.max_steps": 10, "training.lr": 1e-3,
              "sample.prompts": "a red circle\na blue square", "sample.negative_prompt": "blurry",
              "sample.prompt_steps": 8, "sample.cfg": 5.0, "sample.size": 64, "sample.prompt_seed": 3}
    values.update(changes)
    return values


def test_widgets_follow_the_schema() -> None:
    with gr.Blocks():
        method = forms.widget("network.method")
        rank = forms.widget("network.rank")
        flip = forms.widget("dataset.flip")
    assert isinstance(method, gr.Dropdown) and ("loha", "loha") in method.choices
    assert isinstance(rank, gr.Number) and rank.precision == 0 and rank.value == 8
    assert isinstance(flip, gr.Checkbox)


def test_values_become_a_validated_config_with_only_the_method_params() -> None:
    values = forms.keep_method_params(_values(), METHOD_PARAMS)
    assert "network.rank" not in values and values["network.block_size"] == 16
    config = forms.values_to_config("image", values, {"run_dir": "/runs/x"})
    assert config.network.block_size == 16 and config.network.rank == 8  # rank left at its default
    assert [p.prompt for p in config.sample.prompts] == ["a red circle", "a blue square"]
    assert config.sample.prompts[1].negative_prompt == "blurry" and config.sample.prompts[0].width == 64


@pytest.mark.parametrize("changes, field", [({"network.method": "lora", "network.rank": 0}, "network.rank"),
                                            ({"training.lr": None}, "training.lr"),
                                            ({"sample.size": 60}, "sample.prompts[0].width")])
def test_bad_values_name_the_field(changes: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        forms.values_to_config("image", forms.keep_method_params(_values(**changes), METHOD_PARAMS))


def test_a_saved_preset_loads_back_into_the_same_form(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LYCOTRAIN_HOME", str(tmp_path))
    values = forms.keep_method_params(_values(), METHOD_PARAMS)
    config = forms.values_to_config("image", dict(values))
    path = presets.save_preset(config, "my/oft preset")
    assert path.parent == tmp_path / "presets" and path.name == "oft preset.toml"
    assert ("oft preset (mine)", str(path)) in presets.list_presets("image")
    assert str(path) not in [p for _, p in presets.list_presets("text")]
    loaded = forms.config_to_values(load_config(path), list(values))
    assert loaded == {k: v for k, v in values.items()}


def test_image_tab_shows_the_model_family_and_loads_it_from_a_preset(tmp_path: Path) -> None:
    from lycotrain.jobs import JobManager
    from lycotrain.ui.image_tab import ImageTab

    with gr.Blocks():
        tab = ImageTab(JobManager(tmp_path))
    family = tab.form["model.family"]
    assert isinstance(family, gr.Dropdown) and ("sd2-v", "sd2-v") in family.choices
    data = {component: component.value for component in tab.form.values()}
    data[tab.form["model.path"]], data[family] = "/models/v2.safetensors", "sd2-v"
    assert tab.config(data).model.family == "sd2-v"
    assert forms.config_to_values(tab.config(data), ["model.family"]) == {"model.family": "sd2-v"}


def test_the_preflight_check_leaves_no_config_behind(tmp_path: Path, monkeypatch) -> None:
    from lycotrain.jobs import JobManager
    from lycotrain.ui import image_tab
    from lycotrain.ui.runner import CliResult

    seen: list[Path] = []

    def fake_lint(args: list[str], timeout_s: float = 0) -> CliResult:
        config_path = Path(args[args.index("--config") + 1])
        assert load_config(config_path).dataset.path == str(tmp_path)  # the child gets the form's config
        seen.append(config_path)
        return CliResult(args, 0, "10 images", "")

    monkeypatch.setattr(image_tab, "run_cli", fake_lint)
    with gr.Blocks():
        tab = image_tab.ImageTab(JobManager(tmp_path / "runs"))
    data = {component: component.value for component in tab.form.values()}
    data[tab.form["model.path"]], data[tab.form["dataset.path"]] = "builtin:tiny-sd1", str(tmp_path)
    for _ in range(2):
        assert "10 images" in tab.lint(data)[tab.report]
    assert len(seen) == 2 and not any(p.exists() or p.parent.exists() for p in seen)
    assert not (tmp_path / "runs" / "_lint").exists()


@pytest.mark.parametrize("tab_name", ["image", "text"])
def test_both_tabs_offer_tensorboard_logging(tmp_path: Path, tab_name: str) -> None:
    from lycotrain.jobs import JobManager
    from lycotrain.ui.image_tab import ImageTab
    from lycotrain.ui.text_tab import TextTab

    with gr.Blocks():
        tab = (ImageTab if tab_name == "image" else TextTab)(JobManager(tmp_path))
    box = tab.form["save.tensorboard"]
    assert isinstance(box, gr.Checkbox) and box.value is False
    data = {component: component.value for component in tab.form.values()}
    data[tab.form["model.path"]], data[box] = "builtin:tiny-llama" if tab_name == "text" else "builtin:tiny-sd1", True
    data[tab.form["dataset.path"]] = str(tmp_path)
    assert tab.config(data).save.tensorboard is True


def test_saving_over_a_preset_asks_first_and_a_new_page_lists_presets_saved_since_start(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    """Save preset replaced an existing preset of the same name without a word, and the picker only ever listed
    the presets that existed when the app started."""
    from lycotrain.jobs import JobManager
    from lycotrain.ui.app import build_app
    from lycotrain.ui.image_tab import ImageTab

    monkeypatch.setenv("LYCOTRAIN_HOME", str(tmp_path))
    manager = JobManager(tmp_path / "runs")
    app = build_app(manager)
    with gr.Blocks():
        tab = ImageTab(manager)
    data = {component: component.value for component in tab.form.values()}
    data.update({tab.preset_name: "mine", tab.preset_replace: "", tab.form["network.rank"]: 4})
    first = tab.save_preset(data)
    path = tmp_path / "presets" / "mine.toml"
    assert "Saved preset" in first[tab.message] and "rank = 4" in path.read_text()
    data[tab.form["network.rank"]] = 16
    warned = tab.save_preset(data)
    assert "already exists" in warned[tab.message] and "rank = 4" in path.read_text()  # not replaced yet
    data[tab.preset_replace] = warned[tab.preset_replace]
    assert "Saved preset" in tab.save_preset(data)[tab.message] and "rank = 16" in path.read_text()
    on_load = {f.fn.__self__.task: f.fn for f in app.fns.values() if any(event == "load" for _, event in f.targets)}
    assert ("mine (mine)", str(path)) in on_load["image"]()["choices"]
    assert str(path) not in [value for _, value in on_load["text"]()["choices"]]


def test_the_cli_command_shown_names_a_run_folder(tmp_path: Path) -> None:
    """The command lacked run_dir, and `lycotrain train` refused it: "run_dir is empty"."""
    import shlex

    from lycotrain.jobs import JobManager
    from lycotrain.ui.image_tab import ImageTab

    with gr.Blocks():
        tab = ImageTab(JobManager(tmp_path / "runs"))
    data = {component: component.value for component in tab.form.values()}
    data.update({tab.form["model.path"]: "builtin:tiny-sd1", tab.form["dataset.path"]: "/data/my set",
                 tab.form["save.output_name"]: "mön lora 1"})
    words = shlex.split(tab.show_cli(data)[tab.cli_command])
    assert words[:2] == ["lycotrain", "train"] and words[2::2] == ["--set"] * (len(words) // 2 - 1)
    config = load_config(None, words[3::2])
    assert config.run_dir == "runs/mön lora 1" and config.save.output_name == "mön lora 1"


def test_preflight_runs_without_a_model_and_a_failed_check_clears_the_old_report(tmp_path: Path,
                                                                                 monkeypatch) -> None:
    """The pre-flight button refused an empty model field, though only the memory estimate needs a model; and a
    failed check left the previous dataset's report under its error as if it were this one's."""
    from lycotrain.jobs import JobManager
    from lycotrain.ui import image_tab
    from lycotrain.ui.runner import CliResult

    answers = iter([CliResult([], 1, "Pre-flight report: 10 images", ""),
                    CliResult(["lint"], 2, "", "error: No images found in /etc")])
    monkeypatch.setattr(image_tab, "run_cli", lambda args, timeout_s=0: next(answers))
    with gr.Blocks() as app:
        tab = image_tab.ImageTab(JobManager(tmp_path / "runs"))
    lint = next(f.fn for f in app.fns.values() if (tab.lint_button._id, "click") in f.targets)
    data = {component: component.value for component in tab.form.values()}
    data[tab.form["dataset.path"]] = str(tmp_path)
    assert "10 images" in lint(data)[tab.report]
    failed = lint(data)
    assert "No images found" in failed[tab.message] and failed[tab.report] == ""
    (tmp_path / "notes.txt").write_text("")
    data[tab.form["dataset.path"]] = str(tmp_path / "notes.txt")
    with pytest.raises(DatasetError, match="is a file; enter the folder"):
        image_tab.check_paths(tab.config({**data, tab.form["model.path"]: "builtin:tiny-sd1"}))


def test_start_pressed_twice_queues_one_run(tmp_path: Path) -> None:
    """A double click on Start queued the same training twice."""
    import sys

    from lycotrain.jobs import JobManager
    from lycotrain.ui.text_tab import TextTab

    manager = JobManager(tmp_path / "runs", command=lambda config: [sys.executable, "-c", "import time; "
                                                                    "time.sleep(60)"])
    with gr.Blocks():
        tab = TextTab(manager)
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    data = {component: component.value for component in tab.form.values()}
    data.update({tab.form["model.path"]: "builtin:tiny-llama", tab.form["dataset.path"]: str(tmp_path / "data.jsonl")})
    try:
        assert "started" in tab.start(data)[tab.message]
        with pytest.raises(LycotrainError, match="the same run, lora-data, is already running"):
            tab.start(data)
        data[tab.form["training.lr"]] = 2e-4  # another setting: another run, queued
        assert "queued" in tab.start(data)[tab.message]
        assert len(manager.list("text")) == 2
    finally:
        for record in manager.list("text"):
            manager.stop(record.id)
