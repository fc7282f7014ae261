"""Form <-> config: widgets made from the config schema, and the two directions between them.

A form is an ordered mapping ``"section.key" -> component``. Each widget takes its kind, choices, range and
tooltip from the schema (``engine/config.py`` field metadata), so the GUI cannot drift from what the CLI and the
presets accept. Values travel as a flat dict; :func:`values_to_config` nests and validates them through
``Config.from_dict`` (the one place that decides what is valid), :func:`config_to_values` goes back.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import gradio as gr

from lycotrain.engine.config import SECTIONS, Config, SamplePrompt, field_help
from lycotrain.errors import ConfigError

Form = dict[str, gr.components.Component]

# Preview prompts are a list of tables in the config; the form edits them as one prompt per line plus the
# settings shared by every line (a preset with per-prompt settings loads its first prompt's settings).
PROMPT_KEYS = ("sample.prompts", "sample.negative_prompt", "sample.prompt_seed", "sample.prompt_steps",
               "sample.cfg", "sample.size")


def _schema_field(key: str) -> tuple[type, Any]:
    """The annotation and default of one config field."""
    section, _, name = key.rpartition(".")
    cls = SECTIONS[section] if section else Config
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == name:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            return hints[name], default
    raise ConfigError(f"unknown key {key}")


def widget(key: str, label: str | None = None, *, prefix: str = "", **kwargs: Any) -> gr.components.Component:
    """A widget for the config field ``key`` ("network.rank"), initialised to its default; its element id is
    ``<prefix>-network-rank`` (the tests and the page's CSS find it by that)."""
    section, _, name = key.rpartition(".")
    meta = field_help(section, name)
    hint, default = _schema_field(key)
    default = kwargs.pop("value", default)
    choices = kwargs.pop("choices", meta.get("choices"))
    label = label or name.replace("_", " ")
    info = kwargs.pop("info", meta.get("help") or None)
    common = dict(label=label, info=info, elem_id=element_id(prefix, key), **kwargs)
    if choices:
        return gr.Dropdown(choices=list(choices), value=default, **common)
    if hint is bool:
        return gr.Checkbox(value=default, **common)
    if hint in (int, float):  # no min/max in the widget: Config names the field and the range in its message
        return gr.Number(value=default, precision=0 if hint is int else None, **common)
    if typing.get_origin(hint) is list:
        return gr.Textbox(value=", ".join(default), **common)
    return gr.Textbox(value=default, **common)


def whole_number(value: float | None, default: int, field: str, low: int = 1, high: int | None = None) -> int:
    """A whole-number field's value (empty: ``default``), range-checked here rather than by the widget's
    minimum/maximum: Gradio's own check shows only "Error" in the outputs and leaves the previous results."""
    number = default if value is None else int(value)
    if number < low or (high is not None and number > high):
        allowed = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"{field} = {number} is out of range; allowed: {allowed}")
    return number


def element_id(prefix: str, key: str) -> str:
    return "-".join(filter(None, (prefix, key.replace(".", "-").replace("_", "-"))))


def prompt_widgets(task: str) -> Form:
    """Widgets for the preview prompts (one per line) and the settings they share."""
    form: Form = {"sample.prompts": gr.Textbox(label="preview prompts (one per line)", lines=3,
                                               elem_id=f"{task}-sample-prompts")}
    with gr.Row():
        form["sample.prompt_seed"] = gr.Number(label="preview seed", value=0, precision=0, min_width=110)
        if task == "image":
            form["sample.negative_prompt"] = gr.Textbox(label="negative prompt", min_width=200, scale=2)
            form["sample.prompt_steps"] = gr.Number(label="sampling steps", value=20, precision=0, min_width=110,
                                                    elem_id=f"{task}-sample-steps")
            form["sample.cfg"] = gr.Number(label="CFG scale", value=7.0, min_width=110)
            form["sample.size"] = gr.Number(label="size (0 = training resolution)", value=0, precision=0, step=8,
                                            min_width=110)
    return form


def method_param_names(method_params: dict[str, tuple[str, ...]]) -> tuple[str, ...]:
    """Every network field some method reads, in a stable order (one widget each)."""
    return tuple(dict.fromkeys(p for params in method_params.values() for p in params))


def keep_method_params(values: dict[str, Any], method_params: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """Drop the network fields the chosen method does not read, so they stay at their defaults (and out of the
    CLI command and the presets)."""
    chosen = method_params.get(values.get("network.method"), ())
    others = set(method_param_names(method_params)) - set(chosen)
    return {k: v for k, v in values.items() if not (k.startswith("network.") and k[len("network."):] in others)}


def values_to_config(task: str, values: dict[str, Any], extra: dict[str, Any] | None = None) -> Config:
    """Validate the form's values (plus ``extra`` fields such as run_dir) into a Config."""
    data: dict[str, Any] = {"task": task}
    prompt_values = {k: values.pop(k) for k in list(values) if k in PROMPT_KEYS}
    for key, value in {**values, **(extra or {})}.items():
        if value is None or (isinstance(value, float) and value != value):
            raise ConfigError(f"{key} is empty; enter a value")
        section, _, name = key.rpartition(".")
        if isinstance(value, float) and _schema_field(key)[0] is int:
            value = int(value)  # a Number widget can hand back 8.0 for an int field
        (data.setdefault(section, {}) if section else data)[name] = value
    data.setdefault("sample", {})["prompts"] = _prompts(task, prompt_values)
    return Config.from_dict(data)


def _prompts(task: str, values: dict[str, Any]) -> list[dict[str, Any]]:
    lines = [line.strip() for line in (values.get("sample.prompts") or "").splitlines() if line.strip()]
    shared: dict[str, Any] = {"seed": int(values.get("sample.prompt_seed") or 0)}
    if task == "image":
        size = int(values.get("sample.size") or 0)
        shared.update(negative_prompt=values.get("sample.negative_prompt") or "",
                      steps=int(values.get("sample.prompt_steps") or 20), cfg=float(values.get("sample.cfg") or 0),
                      width=size, height=size)
    return [{"prompt": line, **shared} for line in lines]


def config_to_values(config: Config, keys: list[str]) -> dict[str, Any]:
    """The form values that show ``config`` (for loading a preset or a past run)."""
    data = config.to_dict()
    values: dict[str, Any] = {}
    for key in keys:
        if key in PROMPT_KEYS:
            continue
        section, _, name = key.rpartition(".")
        value = (data[section] if section else data)[name]
        values[key] = ", ".join(value) if isinstance(value, list) else value
    prompts = config.sample.prompts
    first = prompts[0] if prompts else SamplePrompt()
    values.update({"sample.prompts": "\n".join(p.prompt for p in prompts), "sample.prompt_seed": first.seed,
                   "sample.negative_prompt": first.negative_prompt, "sample.prompt_steps": first.steps,
                   "sample.cfg": first.cfg, "sample.size": first.width})
    return {k: v for k, v in values.items() if k in keys}
