"""The tools tab: inspect an adapter file (method, modules, metadata, what each WebUI will do with it), merge it
into a model, extract/convert it to a LoRA, resize a LoRA. Each runs the matching ``lycotrain`` command in a
child process; the page shows the command, its output and the files it wrote."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import gradio as gr

from lycotrain.errors import FormatError, LycotrainError
from lycotrain.jobs import JobManager
from lycotrain.ui.datasets import new_upload_folder, sanitize_name
from lycotrain.ui.forms import whole_number, widget
from lycotrain.ui.messages import guarded
from lycotrain.ui.runner import CliResult, run_cli


def chosen_file(upload: str | None, typed: str, what: str) -> str:
    """An uploaded file wins over a typed server path; neither is an error naming the field."""
    if upload:
        return upload
    if not typed or not typed.strip():
        raise FormatError(f"{what}: no file; upload one or type a path on the server")
    if not Path(typed.strip()).exists():
        raise FormatError(f"{what}: {typed.strip()} does not exist on the server")
    return typed.strip()


def number(value: float | None, default: float) -> float:
    """A Number field's value; only an empty field means ``default`` (``value or default`` turned 0 into it)."""
    return default if value is None else value


def report_text(results: list[CliResult]) -> str:
    """Each command and what it printed (stderr holds library chatter; a failure shows its own message)."""
    return "\n\n".join(f"$ {r.command_line}\n{r.stdout.strip()}" for r in results)


def written_files(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else []


class ToolsTab:
    def __init__(self, manager: JobManager) -> None:
        self.out_root = manager.runs_root / "_tools"
        self.message = gr.HTML("", elem_id="tools-message")
        with gr.Row():
            self.upload = gr.File(label="adapter file (.safetensors) — upload…", file_types=[".safetensors"],
                                  elem_id="tools-upload", scale=1)
            self.path = gr.Textbox(label="…or its path on the server", elem_id="tools-path", scale=2)
        with gr.Row():
            self.model = gr.Textbox(label="base model the adapter was trained on (needed for the compatibility "
                                          "report, merge and convert): a diffusers folder, a .safetensors "
                                          "checkpoint or builtin:tiny-sd1", elem_id="tools-model", scale=4)
            self.family = widget("model.family", "model family", prefix="tools", scale=1)
        with gr.Tab("Inspect and check"):
            self.inspect_button = gr.Button("Inspect", variant="primary", elem_id="tools-inspect")
        with gr.Tab("Merge into a model"):
            self.merge_multiplier = gr.Number(label="multiplier", value=1.0)
            self.merge_button = gr.Button("Merge", variant="primary", elem_id="tools-merge")
        with gr.Tab("Extract / convert to LoRA"):
            self.extract_rank = gr.Number(label="LoRA rank", value=16, precision=0, elem_id="tools-extract-rank")
            self.extract_button = gr.Button("Convert to LoRA", variant="primary", elem_id="tools-extract")
        with gr.Tab("Resize a LoRA"):
            self.resize_rank = gr.Number(label="new rank", value=8, precision=0, elem_id="tools-resize-rank")
            self.resize_button = gr.Button("Resize", variant="primary", elem_id="tools-resize")
        self.output = gr.Textbox(label="output", lines=14, max_lines=40, interactive=False, elem_id="tools-output")
        self.files = gr.File(label="files written", file_count="multiple", interactive=False, elem_id="tools-files")
        self.wire()

    def wire(self) -> None:
        outs = {self.message, self.output, self.files}
        source = {self.upload, self.path, self.model, self.family}
        self.inspect_button.click(self.guarded(self.inspect), source, outs)
        self.merge_button.click(self.guarded(self.merge), source | {self.merge_multiplier}, outs)
        self.extract_button.click(self.guarded(self.extract), source | {self.extract_rank}, outs)
        self.resize_button.click(self.guarded(self.resize), source | {self.resize_rank}, outs)

    def guarded(self, handler: Callable[[dict[Any, Any]], dict]) -> Callable[[dict[Any, Any]], dict]:
        """A failure shows its message and clears the output and files, which belonged to the previous tool run."""
        return guarded(self.message, reset={self.output: "", self.files: None})(handler)

    def _model(self, data: dict[Any, Any], why: str) -> str:
        model = (data[self.model] or "").strip()
        if not model:
            raise FormatError(f"base model: empty; {why} needs the model the adapter was trained on (a diffusers "
                              "folder, a .safetensors checkpoint or builtin:tiny-sd1)")
        return model

    def _model_args(self, data: dict[Any, Any], model: str) -> list[str]:
        """``--model`` and ``--family`` (an SD 2.x single-file checkpoint cannot be told from SD 1.x by itself)."""
        return ["--model", model, "--family", data[self.family] or "auto"]

    def _source(self, data: dict[Any, Any]) -> str:
        return chosen_file(data[self.upload], data[self.path], "adapter file")

    def _finish(self, results: list[CliResult], folder: Path | None = None) -> dict:
        failed = [r for r in results if not r.ok]
        if failed:
            raise LycotrainError(failed[0].message)
        return {self.message: "", self.output: report_text(results),
                self.files: (written_files(folder) or None) if folder else None}

    def _out(self, source: str, operation: str, suffix: str = ".safetensors") -> tuple[Path, Path]:
        folder = new_upload_folder(self.out_root, operation)
        return folder, folder / f"{Path(sanitize_name(Path(source).name)).stem}-{operation}{suffix}"

    def inspect(self, data: dict[Any, Any]) -> dict:
        """Method, modules and metadata; with a base model also what A1111, Forge and ComfyUI will do."""
        source, model = self._source(data), (data[self.model] or "").strip()
        results = [run_cli(["inspect", source], timeout_s=300)]
        if model:
            results.append(run_cli(["check", source, *self._model_args(data, model)], timeout_s=600))
        out = self._finish(results)
        if not model:
            out[self.output] += "\n\n(enter the base model above for the per-WebUI compatibility report)"
        return out

    def merge(self, data: dict[Any, Any]) -> dict:
        source, model = self._source(data), self._model(data, "merging")
        folder, out = self._out(source, "merged")
        return self._finish([run_cli(["merge", source, *self._model_args(data, model), "--out", str(out),
                                      "--multiplier", str(number(data[self.merge_multiplier], 1.0))])], folder)

    def extract(self, data: dict[Any, Any]) -> dict:
        source, model = self._source(data), self._model(data, "converting to LoRA")
        rank = whole_number(data[self.extract_rank], 16, "LoRA rank")
        folder, out = self._out(source, "lora")
        return self._finish([run_cli(["extract", source, *self._model_args(data, model), "--rank", str(rank),
                                      "--out", str(out)])], folder)

    def resize(self, data: dict[Any, Any]) -> dict:
        source = self._source(data)
        rank = whole_number(data[self.resize_rank], 8, "new rank")
        folder, out = self._out(source, "resized")
        return self._finish([run_cli(["resize", source, "--rank", str(rank), "--out", str(out)])], folder)
