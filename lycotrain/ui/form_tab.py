"""What the image and text tabs share: a form built from the config schema, presets, the CLI command and Start.

A subclass builds its layout in ``build`` (setting the widgets named below), says which task and which network
fields each method shows, and checks its own inputs before a run is queued.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import gradio as gr

from lycotrain.engine.config import Config, config_to_cli, load_config
from lycotrain.errors import DatasetError, LycotrainError
from lycotrain.jobs import JobManager, JobRecord
from lycotrain.ui.datasets import display_name, sanitize_name
from lycotrain.ui.forms import Form, config_to_values, keep_method_params, values_to_config
from lycotrain.ui.live import LiveView
from lycotrain.ui.messages import guarded, notice_html, success_html
from lycotrain.ui.presets import list_presets, preset_path, save_preset


class FormTab:
    task: ClassVar[str]
    method_params: ClassVar[dict[str, tuple[str, ...]]]
    # widgets every subclass's ``build`` creates
    message: gr.HTML
    live: LiveView
    cli_button: gr.Button
    cli_command: gr.Textbox
    preset_picker: gr.Dropdown
    preset_load: gr.Button
    preset_name: gr.Textbox
    preset_save: gr.Button
    start_button: gr.Button

    def __init__(self, manager: JobManager) -> None:
        self.manager = manager
        self.uploads = manager.runs_root / "_uploads"
        self.form: Form = {}
        self.build()

    def build(self) -> None:
        raise NotImplementedError

    def check_inputs(self, config: Config) -> None:
        """Catch the usual path mistakes before a job is queued (the engine would fail on them a minute later)."""

    def wire_form(self) -> None:
        """Events of the shared buttons: CLI command, presets, Start."""
        f, msg = self.form, self.message
        inputs = set(f.values())
        self.cli_button.click(guarded(msg)(self.show_cli), inputs, {msg, self.cli_command})
        self.preset_load.click(guarded(msg)(self.load_preset), inputs | {self.preset_picker}, {msg, *f.values()})
        self.preset_replace = gr.State("")  # the preset file the user was warned about: a second press replaces it
        self.preset_save.click(guarded(msg)(self.save_preset), inputs | {self.preset_name, self.preset_replace},
                               {msg, self.preset_picker, self.preset_replace})
        self.start_button.click(guarded(msg)(self.start), inputs, {msg, self.live.job_id, self.live.rendered})

    # ---- form <-> config --------------------------------------------------------------------------------------
    def form_values(self, data: dict[Any, Any]) -> dict[str, Any]:
        return {key: data[component] for key, component in self.form.items()}

    def config(self, data: dict[Any, Any], run_dir: str = "") -> Config:
        values = keep_method_params(self.form_values(data), self.method_params)
        return values_to_config(self.task, values, {"run_dir": run_dir} if run_dir else None)

    def preset_values(self, config: Config) -> dict[str, Any]:
        return config_to_values(config, list(self.form))

    # ---- handlers -----------------------------------------------------------------------------------------
    @staticmethod
    def run_name(config: Config) -> str:
        return config.save.output_name or f"{config.network.method}-{display_name(config.dataset.path)}"

    def live_twin(self, config: Config) -> JobRecord | None:
        """A queued or running job of this tab with the very same settings (a double click on Start queued the
        same training twice)."""
        wanted = {**config.to_dict(), "run_dir": ""}
        for record in self.manager.list(self.task):
            if not record.live:
                continue
            try:
                other = load_config(Path(record.run_dir) / "config.toml").to_dict()
            except LycotrainError:
                continue
            if {**other, "run_dir": ""} == wanted:
                return record
        return None

    def start(self, data: dict[Any, Any]) -> dict:
        config = self.config(data)
        self.check_inputs(config)
        if twin := self.live_twin(config):
            raise LycotrainError(f"the same run, {twin.name}, is already {twin.state} ({twin.run_dir}); change a "
                                 "setting to start another one, or Stop it first")
        name = self.run_name(config)
        run_dir = self.manager.new_run_dir(name)
        record = self.manager.submit(run_dir, self.config(data, str(run_dir)).to_toml(), task=self.task, name=name)
        where = "started" if record.state == "running" else "queued (another run is in progress)"
        job_id, rendered = self.live.show(record.id)
        return {self.message: success_html(f"Run {record.name} {where}. Its folder: {run_dir}"),
                self.live.job_id: job_id, self.live.rendered: rendered}

    def show_cli(self, data: dict[Any, Any]) -> dict:
        """The command with a run folder under ``runs/`` of the terminal's folder (a run needs one to write to)."""
        run_dir = f"runs/{sanitize_name(self.run_name(self.config(data)))}"
        return {self.message: "", self.cli_command: config_to_cli(self.config(data, run_dir))}

    def load_preset(self, data: dict[Any, Any]) -> dict:
        path = data[self.preset_picker]
        if not path:
            raise DatasetError("preset: none chosen; pick a preset in the list first")
        values = self.preset_values(load_config(path))
        keep = {k for k in ("model.path", "dataset.path") if not values.get(k)}
        return {self.message: success_html(f"Loaded preset {Path(path).stem}."),
                **{self.form[k]: v for k, v in values.items() if k not in keep}}

    def save_preset(self, data: dict[Any, Any]) -> dict:
        """Save the form as a preset; an existing preset of that name is replaced only on a second press."""
        config, path = self.config(data), preset_path(data[self.preset_name])
        if path.exists() and data[self.preset_replace] != str(path):
            return {self.message: notice_html(f"A preset named “{path.stem}” already exists ({path}). Press "
                                              "“Save preset” again to replace it, or type another name."),
                    self.preset_replace: str(path)}
        save_preset(config, data[self.preset_name])
        return {self.message: success_html(f"Saved preset {path}."), self.preset_replace: "",
                self.preset_picker: gr.update(choices=list_presets(self.task), value=str(path))}

    def preset_choices(self) -> dict:
        """The presets on disk now (a page built at start-up would not list the ones saved since)."""
        return gr.update(choices=list_presets(self.task))
