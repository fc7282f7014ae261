"""The text tab: base LM, dataset upload (alpaca or chat JSON/JSONL), method and its parameters (X-LoRA with a
picker of LoRA experts), Start/Stop, the live view (loss, sample generations, AdaLoRA's final ranks) and a
generation box that compares the base model with the adapted one."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from lycotrain.engine.config import Config, load_config
from lycotrain.errors import DatasetError, LycotrainError, ModelError
from lycotrain.jobs import JobManager
from lycotrain.ui.datasets import new_upload_folder, sanitize_name
from lycotrain.ui.form_tab import FormTab
from lycotrain.ui.forms import method_param_names, prompt_widgets, whole_number, widget
from lycotrain.ui.live import LiveView
from lycotrain.ui.messages import guarded, success_html
from lycotrain.ui.presets import list_presets
from lycotrain.ui.runner import run_cli

text_widget = partial(widget, prefix="text")
DEMO_LM = "builtin:tiny-llama"
TEXT_EXTENSIONS = (".json", ".jsonl", ".txt")
METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "lora": ("rank", "alpha", "dropout", "target_modules"),
    "adalora": ("init_r", "target_r", "tinit", "tfinal", "delta_t", "beta1", "beta2", "orth_reg_weight", "alpha",
                "dropout", "target_modules"),
    "llama_adapter": ("adapter_len", "adapter_layers"),
    "xlora": ("experts", "xlora_temperature", "xlora_top_k", "xlora_layerwise", "xlora_depth", "xlora_size",
              "xlora_dropout"),
}
ALL_METHOD_PARAMS = method_param_names(METHOD_PARAMS)
TEXT_FIELDS = {
    "dataset": ("format", "max_length", "train_on_prompt"),
    "training": ("max_steps", "epochs", "batch_size", "grad_accum", "lr", "optimizer", "scheduler", "warmup_steps",
                 "mixed_precision"),
    "sample": ("every_n_steps", "at_end", "max_new_tokens"),
    "save": ("every_n_steps", "keep_last", "output_name", "tensorboard"),
}


def check_text_dataset(path: Path) -> None:
    """Cheap structural check of an uploaded dataset, so a broken file is refused with its line number."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix == ".json":
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path.name}: not valid JSON at line {exc.lineno}: {exc.msg}") from None
    elif path.suffix == ".jsonl":
        for number, line in enumerate(text.splitlines(), 1):
            try:
                line.strip() and json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path.name}: line {number} is not valid JSON ({exc.msg}); each line must be "
                                   "one record like {\"instruction\": ..., \"output\": ...}") from None


def adapter_dir(manager: JobManager, job_id: str | None) -> Path | None:
    """The adapter folder a finished text run exported (its ``end`` event names it)."""
    if not job_id:
        return None
    view = manager.view(job_id)
    for name in ("adapter", "peft", "xlora"):
        if name in view.outputs and Path(view.outputs[name]).is_dir():
            return Path(view.outputs[name])
    dirs = [Path(p) for p in view.outputs.values() if Path(p).is_dir()]
    return dirs[0] if dirs else None


class TextTab(FormTab):
    task = "text"
    method_params = METHOD_PARAMS

    def build(self) -> None:
        f = self.form
        self.message = gr.HTML("", elem_id="text-message")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Accordion("Model and data", open=True):
                    with gr.Row():
                        f["model.path"] = text_widget("model.path", "base model", scale=4,
                                                 info="a transformers causal-LM folder on the server")
                        self.demo_model = gr.Button("Use the built-in tiny LM", scale=1, elem_id="text-use-demo-model")
                    f["dataset.path"] = text_widget("dataset.path", "dataset file",
                                               info="JSON/JSONL with alpaca (instruction, input, output) or chat "
                                                    "(messages) records, or plain text")
                    self.upload = gr.File(label="…or upload a .json / .jsonl / .txt dataset", file_count="single",
                                          elem_id="text-upload")
                    with gr.Row():
                        for name in TEXT_FIELDS["dataset"]:
                            f[f"dataset.{name}"] = text_widget(f"dataset.{name}")
                with gr.Accordion("Method", open=True):
                    f["network.method"] = text_widget("network.method", "method", choices=list(METHOD_PARAMS), value="lora",
                                                     info="LoRA, AdaLoRA, Llama-Adapter or X-LoRA")
                    with gr.Row():
                        for name in ALL_METHOD_PARAMS:
                            if name == "experts":
                                f["network.experts"] = gr.Dropdown(
                                    label="X-LoRA experts (two or more LoRA folders)", multiselect=True,
                                    allow_custom_value=True, choices=self.expert_choices(), visible=False,
                                    elem_id="text-network-experts", min_width=300)
                                continue
                            f[f"network.{name}"] = text_widget(f"network.{name}", min_width=110,
                                                          visible=name in METHOD_PARAMS["lora"])
                    self.experts_refresh = gr.Button("Refresh the expert list", size="sm", visible=False)
                with gr.Accordion("Training", open=True):
                    with gr.Row():
                        f["seed"] = text_widget("seed", min_width=110)
                        for name in TEXT_FIELDS["training"]:
                            f[f"training.{name}"] = text_widget(f"training.{name}", min_width=110)
                with gr.Accordion("Samples, saving, presets", open=False):
                    with gr.Row():
                        for name in TEXT_FIELDS["sample"]:
                            f[f"sample.{name}"] = text_widget(f"sample.{name}", min_width=110)
                    f.update(prompt_widgets("text"))
                    with gr.Row():
                        for name in TEXT_FIELDS["save"]:
                            f[f"save.{name}"] = text_widget(f"save.{name}", min_width=110)
                    with gr.Row():
                        self.preset_picker = gr.Dropdown(label="preset", choices=list_presets("text"), scale=3)
                        self.preset_load = gr.Button("Load preset", scale=1)
                    with gr.Row():
                        self.preset_name = gr.Textbox(label="save the form as preset named", scale=3)
                        self.preset_save = gr.Button("Save preset", scale=1)
                    self.cli_button = gr.Button("Show CLI command")
                    self.cli_command = gr.Code(label="the same run from a terminal", language="shell",
                                               interactive=False, elem_id="text-cli")
                self.start_button = gr.Button("Start training", variant="primary", elem_id="text-start")
            with gr.Column(scale=2):
                self.live = LiveView(self.manager, "text")
                with gr.Accordion("Try it: base vs adapted", open=True):
                    self.gen_prompt = gr.Textbox(label="prompt", lines=2, elem_id="text-gen-prompt")
                    with gr.Row():
                        self.gen_tokens = gr.Number(label="max new tokens", value=32, precision=0)
                        self.gen_button = gr.Button("Generate", elem_id="text-generate")
                    with gr.Row():
                        self.gen_base = gr.Textbox(label="base model", lines=4, interactive=False,
                                                   elem_id="text-gen-base")
                        self.gen_adapted = gr.Textbox(label="with the adapter of the run shown", lines=4,
                                                      interactive=False, elem_id="text-gen-adapted")
        self.wire()

    def wire(self) -> None:
        f, msg = self.form, self.message
        self.demo_model.click(None, None, f["model.path"], js=f"() => {DEMO_LM!r}")  # instant, in the browser
        self.upload.upload(guarded(msg, reset={self.upload: None})(self.import_upload), self.upload,
                           {msg, f["dataset.path"], self.upload})
        f["network.method"].change(self.show_method_params, f["network.method"],
                                   [f[f"network.{name}"] for name in ALL_METHOD_PARAMS] + [self.experts_refresh])
        self.experts_refresh.click(lambda: gr.update(choices=self.expert_choices()), None, f["network.experts"])
        self.wire_form()
        self.gen_button.click(guarded(msg, reset={self.gen_base: "", self.gen_adapted: ""})(self.generate),
                              {self.gen_prompt, self.gen_tokens, self.live.job_id},
                              {msg, self.gen_base, self.gen_adapted})

    def expert_choices(self) -> list[tuple[str, str]]:
        """Finished LoRA runs of this app, offered as X-LoRA experts (any other folder can be typed in)."""
        choices = []
        for record in self.manager.list("text"):
            folder = adapter_dir(self.manager, record.id) if record.state == "finished" else None
            if folder is not None and self.manager.view(record.id).method == "lora":
                choices.append((f"{record.name} ({folder.name})", str(folder)))
        return choices

    def form_values(self, data: dict[Any, Any]) -> dict[str, Any]:
        values = super().form_values(data)
        values["network.experts"] = list(values.get("network.experts") or [])
        return values

    def preset_values(self, config: Config) -> dict[str, Any]:
        return {**super().preset_values(config), "network.experts": config.network.experts}

    def show_method_params(self, method: str) -> list[dict]:
        shown = METHOD_PARAMS.get(method, ())
        return [gr.update(visible=name in shown) for name in ALL_METHOD_PARAMS] + \
            [gr.update(visible=method == "xlora")]

    def check_inputs(self, config: Config) -> None:
        if not config.model.path.strip():
            raise ModelError("model.path is empty; press “Use the built-in tiny LM” or enter a local model folder")
        if not config.model.path.startswith("builtin:") and not Path(config.model.path).exists():
            raise ModelError(f"model.path: {config.model.path} does not exist on the server")
        if not config.dataset.path.strip() or not Path(config.dataset.path).is_file():
            raise DatasetError(f"dataset.path: {config.dataset.path or '(empty)'} is not a file on the server; "
                               "upload a .json/.jsonl dataset or enter its path")

    def import_upload(self, file: str | None) -> dict:
        if not file:
            return {self.message: ""}
        name = sanitize_name(Path(file).name)
        if Path(name).suffix.lower() not in TEXT_EXTENSIONS:
            raise DatasetError(f"{name}: a text dataset must be .json, .jsonl or .txt")
        check_text_dataset(Path(file))  # before copying: a refused file leaves no upload folder behind
        target = new_upload_folder(self.uploads, "text") / name
        shutil.copyfile(file, target)
        return {self.message: success_html(f"Dataset saved as {target}."), self.form["dataset.path"]: str(target),
                self.upload: None}

    def generate(self, data: dict[Any, Any]) -> dict:
        prompt, job_id = data[self.gen_prompt], data[self.live.job_id]
        if not prompt.strip():
            raise DatasetError("prompt is empty; type a prompt to generate from")
        tokens = whole_number(data[self.gen_tokens], 32, "max new tokens", 1, 2048)
        adapter, record = adapter_dir(self.manager, job_id), self.manager.get(job_id) if job_id else None
        if adapter is None and record is not None and record.live:
            raise LycotrainError(f"the run shown, {record.name}, is {record.state}; its adapter exists once it "
                                 "has finished")
        if adapter is None or record is None:
            raise LycotrainError("no finished run with an adapter is shown; pick a finished text run above")
        model = load_config(Path(record.run_dir) / "config.toml").model.path  # the base it was trained on
        base = ["generate", "--model", model, "--prompt", prompt, "--max-new-tokens", str(tokens)]
        with ThreadPoolExecutor(2) as pool:  # both processes load the model at the same time
            results = list(pool.map(lambda args: run_cli(args, timeout_s=600), [base, base + ["--adapter",
                                                                                             str(adapter)]]))
        for result in results:
            if not result.ok:
                raise LycotrainError(result.message)
        return {self.message: "", self.gen_base: results[0].stdout.strip(), self.gen_adapted: results[1].stdout.strip()}
