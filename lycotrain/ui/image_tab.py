"""The image tab: model, dataset (folder, upload, demo), caption editor, pre-flight report, method and training
settings, presets, the CLI command, Start, and the live view of the run."""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from lycotrain.engine.config import Config
from lycotrain.diffusion.demo_data import make_demo_dataset
from lycotrain.errors import DatasetError, ModelError
from lycotrain.ui import datasets
from lycotrain.ui.form_tab import FormTab
from lycotrain.ui.forms import method_param_names, prompt_widgets, widget
from lycotrain.ui.live import LiveView
from lycotrain.ui.messages import error_html, guarded, notice_html, success_html
from lycotrain.ui.presets import list_presets
from lycotrain.ui.runner import run_cli

image_widget = partial(widget, prefix="image")
DEMO_MODEL = "builtin:tiny-sd1"
MAX_GALLERY = 500
LINT_USABLE = (0, 1)  # `lycotrain lint` exit codes: clean, problems listed; 2 means unusable

# The network fields each method reads (engine/config.py); the others are hidden and left at their defaults.
METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "lora": ("rank", "alpha", "dropout", "rank_dropout", "module_dropout", "conv_rank", "conv_alpha"),
    "loha": ("rank", "alpha", "rank_dropout", "module_dropout", "conv_rank", "conv_alpha"),
    "lokr": ("rank", "alpha", "factor", "decompose_both", "rank_dropout", "module_dropout", "conv_rank",
             "conv_alpha"),
    "oft": ("block_size", "constraint", "rescaled", "module_dropout"),
    "hra": ("rank", "hra_apply_gs", "hra_lambda", "module_dropout"),
}
ALL_METHOD_PARAMS = method_param_names(METHOD_PARAMS)
IMAGE_FIELDS = {
    "dataset": ("caption_extension", "resolution", "min_bucket_resolution", "max_bucket_resolution", "bucket_step",
                "repeats", "buckets", "no_upscale", "flip", "shuffle_caption", "keep_tokens", "caption_dropout",
                "tag_dropout", "trigger_word", "cache_latents"),
    "training": ("max_steps", "epochs", "batch_size", "grad_accum", "lr", "text_encoder_lr", "optimizer",
                 "scheduler", "warmup_steps", "mixed_precision", "gradient_checkpointing", "noise_offset",
                 "min_snr_gamma", "loss"),
    "sample": ("every_n_steps", "at_start", "at_end", "sampler"),
    "save": ("every_n_steps", "keep_last", "dtype", "output_name", "activation_text", "tensorboard"),
}


def check_paths(config: Config) -> None:
    """Catch the usual path mistakes before a job is queued (the engine would fail on them a minute later)."""
    model = config.model.path.strip()
    if not model:
        raise ModelError("model.path is empty; press “Use the built-in demo model” or enter a local model path")
    if not model.startswith("builtin:") and not Path(model).exists():
        raise ModelError(f"model.path: {model} does not exist on the server; enter a diffusers folder or a "
                         ".safetensors checkpoint")
    check_dataset_path(config)


def check_dataset_path(config: Config) -> None:
    """The dataset alone: all the pre-flight report needs (without a model it only leaves out the memory)."""
    dataset = config.dataset.path.strip()
    if not dataset:
        raise DatasetError("dataset.path is empty; enter an image folder on the server, upload images, or press "
                           "“Create the demo dataset”")
    if not Path(dataset).exists():
        raise DatasetError(f"dataset.path: {dataset} does not exist on the server; enter an existing folder or "
                           "upload images")
    if Path(dataset).is_file() and Path(dataset).suffix.lower() != ".toml":
        raise DatasetError(f"dataset.path: {dataset} is a file; enter the folder that holds the images (or a "
                           "dataset .toml)")


def thumbnail(path: Path, size: int = 192) -> Image.Image:
    """A small RGB copy for the gallery (the dataset folder itself is never served to the browser)."""
    with Image.open(path) as image:
        image.thumbnail((size, size))
        return image.convert("RGB")


class ImageTab(FormTab):
    task = "image"
    method_params = METHOD_PARAMS

    # ---- layout -------------------------------------------------------------------------------------------
    def build(self) -> None:
        f = self.form
        self.message = gr.HTML("", elem_id="image-message")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Accordion("Model", open=True):
                    with gr.Row():
                        f["model.path"] = image_widget("model.path", "base model", scale=4,
                                                 info="a diffusers folder or one .safetensors checkpoint on the "
                                                      "server")
                        self.demo_model = gr.Button("Use the built-in demo model", scale=1,
                                                    elem_id="image-use-demo-model")
                        f["model.family"] = image_widget("model.family", "model family", scale=1, min_width=120)
                with gr.Accordion("Dataset", open=True):
                    with gr.Row():
                        f["dataset.path"] = image_widget("dataset.path", "dataset folder", scale=4,
                                                   info="a folder of images with same-name .txt captions")
                        self.demo_data = gr.Button("Create the demo dataset", scale=1, elem_id="image-demo-data")
                    self.upload = gr.File(label="…or upload images / a .zip (they go to a new folder on the "
                                                "server)", file_count="multiple", elem_id="image-upload")
                    with gr.Row():
                        for name in IMAGE_FIELDS["dataset"][:5]:
                            f[f"dataset.{name}"] = image_widget(f"dataset.{name}", min_width=120)
                    with gr.Row():
                        for name in IMAGE_FIELDS["dataset"][5:10]:
                            f[f"dataset.{name}"] = image_widget(f"dataset.{name}", min_width=120)
                    with gr.Row():
                        for name in IMAGE_FIELDS["dataset"][10:]:
                            f[f"dataset.{name}"] = image_widget(f"dataset.{name}", min_width=120)
                    with gr.Row():
                        self.lint_button = gr.Button("Check dataset (pre-flight report)", elem_id="image-lint")
                    self.report = gr.Markdown("", elem_id="image-preflight")
                with gr.Accordion("Caption editor", open=False):
                    self.caption_editor()
                with gr.Accordion("Method", open=True):
                    with gr.Row():
                        f["network.method"] = image_widget("network.method", "method", choices=list(METHOD_PARAMS),
                                                      info="LoRA, LoHa, LoKr, OFT or HRA")
                        f["network.preset"] = image_widget("network.preset", "target layers")
                        f["network.train_text_encoder"] = image_widget("network.train_text_encoder",
                                                                 "train the text encoder too")
                    with gr.Row():
                        for name in ALL_METHOD_PARAMS:
                            f[f"network.{name}"] = image_widget(f"network.{name}", min_width=110,
                                                          visible=name in METHOD_PARAMS["loha"])
                with gr.Accordion("Training", open=True):
                    keys = ["seed", *(f"training.{name}" for name in IMAGE_FIELDS["training"])]
                    for first in range(0, len(keys), 5):  # rows of five: a fuller row squeezed a checkbox's label
                        with gr.Row():                     # out of sight and wrapped its last field alone
                            for key in keys[first:first + 5]:
                                f[key] = image_widget(key, min_width=110)
                with gr.Accordion("Previews", open=False):
                    with gr.Row():
                        for name in IMAGE_FIELDS["sample"]:
                            f[f"sample.{name}"] = image_widget(f"sample.{name}", min_width=110)
                    f.update(prompt_widgets("image"))
                with gr.Accordion("Saving", open=False):
                    with gr.Row():
                        for name in IMAGE_FIELDS["save"]:
                            f[f"save.{name}"] = image_widget(f"save.{name}", min_width=110)
                with gr.Accordion("Presets and CLI command", open=False):
                    with gr.Row():
                        self.preset_picker = gr.Dropdown(label="preset", choices=list_presets("image"), scale=3,
                                                         elem_id="image-preset")
                        self.preset_load = gr.Button("Load preset", scale=1)
                    with gr.Row():
                        self.preset_name = gr.Textbox(label="save the form as preset named", scale=3)
                        self.preset_save = gr.Button("Save preset", scale=1)
                    self.cli_button = gr.Button("Show CLI command", elem_id="image-show-cli")
                    self.cli_command = gr.Code(label="the same run from a terminal", language="shell",
                                               elem_id="image-cli", interactive=False)
                self.start_button = gr.Button("Start training", variant="primary", elem_id="image-start")
            with gr.Column(scale=2):
                self.live = LiveView(self.manager, "image")
        self.wire()

    def caption_editor(self) -> None:
        self.caption_paths = gr.State([])
        self.caption_selected = gr.State(None)
        self.caption_load = gr.Button("Load images and captions", elem_id="image-captions-load")
        self.caption_gallery = gr.Gallery(label="images (click one to edit its caption)", columns=6, height=300,
                                          allow_preview=False, elem_id="image-captions-gallery", interactive=False)
        with gr.Row():
            self.caption_text = gr.Textbox(label="caption", lines=2, scale=4, elem_id="image-caption-text")
            self.caption_save = gr.Button("Save caption", scale=1, elem_id="image-caption-save")
        with gr.Row():
            self.caption_prefix = gr.Textbox(label="trigger word / prefix for every caption", scale=3)
            self.caption_prefix_apply = gr.Button("Add to all captions", scale=1)
        with gr.Row():
            self.caption_find = gr.Textbox(label="find", scale=2)
            self.caption_replace = gr.Textbox(label="replace with", scale=2)
            self.caption_replace_apply = gr.Button("Replace in all captions", scale=1)

    # ---- events -------------------------------------------------------------------------------------------
    def wire(self) -> None:
        f, msg = self.form, self.message
        inputs = set(f.values())
        self.demo_model.click(None, None, f["model.path"], js=f"() => {DEMO_MODEL!r}")  # instant, in the browser
        self.demo_data.click(guarded(msg)(self.create_demo_dataset), None, {msg, f["dataset.path"]})
        self.upload.upload(guarded(msg, reset={self.upload: None})(self.import_upload), self.upload,
                           {msg, f["dataset.path"], self.upload})
        f["network.method"].change(self.show_method_params, f["network.method"],
                                   [f[f"network.{name}"] for name in ALL_METHOD_PARAMS])
        self.lint_button.click(guarded(msg, reset={self.report: ""})(self.lint), inputs, {msg, self.report})
        self.wire_form()
        ext = f["dataset.caption_extension"]
        editing = [self.caption_selected, self.caption_text]  # every caption action first keeps a pending edit
        self.caption_load.click(guarded(msg)(self.load_captions), [f["dataset.path"], ext, *editing],
                                {msg, self.caption_gallery, self.caption_paths, self.caption_selected,
                                 self.caption_text})
        self.caption_gallery.select(guarded(msg)(self.select_caption), [self.caption_paths, ext, *editing],
                                    {msg, self.caption_selected, self.caption_text})
        self.caption_save.click(guarded(msg)(self.save_caption), [self.caption_selected, ext, self.caption_text],
                                {msg})
        self.caption_prefix_apply.click(guarded(msg)(self.bulk_prefix),
                                        [f["dataset.path"], ext, self.caption_prefix, *editing],
                                        {msg, self.caption_text})
        self.caption_replace_apply.click(guarded(msg)(self.bulk_replace),
                                         [f["dataset.path"], ext, self.caption_find, self.caption_replace, *editing],
                                         {msg, self.caption_text})

    def show_method_params(self, method: str) -> list[dict]:
        shown = METHOD_PARAMS.get(method, ())
        return [gr.update(visible=name in shown) for name in ALL_METHOD_PARAMS]

    def check_inputs(self, config: Config) -> None:
        check_paths(config)

    def create_demo_dataset(self) -> dict:
        folder = make_demo_dataset(datasets.new_upload_folder(self.uploads, "demo-dataset"))
        return {self.message: success_html(f"Demo dataset created in {folder} (10 shapes with captions)."),
                self.form["dataset.path"]: str(folder)}

    def import_upload(self, files: list[str] | None) -> dict:
        if not files:
            return {self.message: ""}
        result = datasets.import_uploads(files, datasets.new_upload_folder(self.uploads))
        if not result.images:  # nothing kept (captions are kept only beside an image): no empty folder left
            result.folder.rmdir()
            return {self.message: error_html(result.summary().replace(f" into `{result.folder}`", "")),
                    self.upload: None}
        box = notice_html if result.rejected or result.uncaptioned else success_html
        return {self.message: box(result.summary()), self.upload: None,
                self.form["dataset.path"]: str(result.dataset_folder)}

    def lint(self, data: dict[Any, Any]) -> dict:
        """The pre-flight report with the step arithmetic, from ``lycotrain lint`` (it needs torch: a child); the
        memory estimate is part of it when a model is given. A failure clears the report of the previous check."""
        config = self.config(data)
        check_dataset_path(config)
        with tempfile.TemporaryDirectory(prefix="lycotrain-lint-") as folder:  # the child reads it, then it goes
            config_path = Path(folder) / "config.toml"
            config.write_toml(config_path)
            result = run_cli(["lint", config.dataset.path, "--config", str(config_path)], timeout_s=600)
        if result.returncode not in LINT_USABLE:
            raise DatasetError(result.message)
        verdict = "No problems found." if result.returncode == 0 else "Problems found (the dataset is still usable):"
        return {self.message: "", self.report: f"**{verdict}**\n\n```\n{result.stdout.strip()}\n```"}

    # ---- caption editor ----------------------------------------------------------------------------------
    @staticmethod
    def keep_edit(image: str | None, extension: str, text: str) -> str:
        """Save the caption box when it differs from the selected image's caption file (an edit not saved yet,
        which switching images or reloading would throw away); returns what was done, for the message."""
        if not image or not Path(image).is_file() or text.strip() == datasets.read_caption(Path(image), extension):
            return ""
        return f"Saved your edit of {datasets.save_caption(Path(image), extension, text).name}. "

    def load_captions(self, folder: str, extension: str, image: str | None, text: str) -> dict:
        kept = self.keep_edit(image, extension, text)
        images = datasets.list_images(folder)
        if not images:
            raise DatasetError(f"dataset.path: no images in {folder}; add .png/.jpg/.webp files or upload them")
        shown = images[:MAX_GALLERY]
        items = [(thumbnail(p), datasets.read_caption(p, extension)[:60]) for p in shown]
        more = f" (showing the first {MAX_GALLERY})" if len(images) > MAX_GALLERY else ""
        return {self.message: notice_html(f"{kept}{len(images)} image(s){more}. Click one to edit its caption."),
                self.caption_gallery: items, self.caption_paths: [str(p) for p in shown],
                self.caption_selected: None, self.caption_text: ""}

    def select_caption(self, paths: list[str], extension: str, image: str | None, text: str,
                       event: gr.SelectData) -> dict:
        kept = self.keep_edit(image, extension, text)
        selected = paths[event.index] if event.index is not None and event.index < len(paths) else None
        return {self.message: success_html(kept) if kept else "", self.caption_selected: selected,
                self.caption_text: datasets.read_caption(Path(selected), extension) if selected else ""}

    def save_caption(self, image: str | None, extension: str, text: str) -> dict:
        if not image:
            raise DatasetError("caption: no image selected; click an image in the gallery first")
        path = datasets.save_caption(Path(image), extension, text)
        return {self.message: success_html(f"Saved {path.name}.")}

    def bulk_prefix(self, folder: str, extension: str, prefix: str, image: str | None, text: str) -> dict:
        kept = self.keep_edit(image, extension, text)
        changed = datasets.add_prefix(folder, extension, prefix)
        return {self.message: success_html(f"{kept}Added “{prefix.strip()}” to {changed} caption(s)."),
                self.caption_text: datasets.read_caption(Path(image), extension) if image else text}

    def bulk_replace(self, folder: str, extension: str, find: str, replace: str, image: str | None,
                     text: str) -> dict:
        kept = self.keep_edit(image, extension, text)
        changed = datasets.find_replace(folder, extension, find, replace)
        return {self.message: success_html(f"{kept}Replaced “{find}” in {changed} caption(s)."),
                self.caption_text: datasets.read_caption(Path(image), extension) if image else text}
