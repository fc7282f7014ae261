"""The one config schema shared by the CLI, the GUI and the presets.

A config is TOML with top-level ``task`` ("image" | "text"), ``run_dir`` and ``seed`` and the tables
``[model] [dataset] [network] [training] [sample] [save]``. Image-only and text-only fields live in the same
tables; each field says which task reads it (``task=`` in its metadata) and the per-task rules in
:meth:`Config.validate` check the combinations.

Every field carries its allowed values or range in its metadata, so one generic checker gives messages that
name the field (``network.rank``) and what is allowed, and the GUI can read the same metadata for its widgets.

Paths (``run_dir``, ``model.path``, ``dataset.path``, ``network.experts``) are used as written: relative paths
are relative to the working directory of the process (the GUI writes absolute paths).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import shlex
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from lycotrain.atomic import atomic_write_text
from lycotrain.errors import ConfigError

TASKS = ("image", "text")
IMAGE_METHODS = ("lora", "loha", "lokr", "oft", "hra")
TEXT_METHODS = ("lora", "adalora", "llama_adapter", "xlora")
OPTIMIZERS = ("adamw", "adafactor", "adamw8bit", "prodigy")
SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
SAMPLERS = ("euler", "euler_a", "dpmpp_2m", "ddim", "unipc")


def _f(default: Any, *, choices: tuple | None = None, lo: float | None = None, hi: float | None = None,
       lo_open: bool = False, hi_open: bool = False, task: str | None = None, help: str = "") -> Any:
    """A dataclass field with its rule: allowed ``choices`` or the range ``lo``..``hi`` (open ends optional)."""
    meta = dict(choices=choices, lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open, task=task, help=help)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# ---- tables -----------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    path: str = _f("", help="diffusers/transformers folder, one .safetensors checkpoint, or builtin:tiny-sd1 | "
                            "builtin:tiny-sdxl | builtin:tiny-llama")
    prediction_type: str = _f("auto", choices=("auto", "epsilon", "v_prediction"), task="image",
                              help="auto reads it from the model's scheduler config")
    family: str = _f("auto", choices=("auto", "sd1", "sd2", "sd2-v", "sdxl"), task="image",
                     help="auto detects it from the weights; an SD 2.x single file needs sd2 (512 px, epsilon) "
                          "or sd2-v (768 px, v-prediction)")


@dataclass
class DatasetConfig:
    path: str = _f("", help="image folder (kohya N_name sub-folders repeat N times) or a dataset TOML; "
                            "for text a JSON/JSONL/TXT file")
    # image
    caption_extension: str = _f(".txt", task="image")
    repeats: int = _f(1, lo=1, task="image", help="repeats of a folder without an N_ prefix")
    resolution: int = _f(512, lo=32, hi=4096, task="image")
    buckets: bool = _f(True, task="image", help="aspect-ratio bucketing")
    min_bucket_resolution: int = _f(256, lo=32, hi=4096, task="image")
    max_bucket_resolution: int = _f(1024, lo=32, hi=8192, task="image")
    bucket_step: int = _f(64, lo=8, hi=512, task="image")
    no_upscale: bool = _f(False, task="image")
    flip: bool = _f(False, task="image", help="random horizontal flip")
    crop: str = _f("center", choices=("center", "random"), task="image")
    shuffle_caption: bool = _f(False, task="image")
    keep_tokens: int = _f(0, lo=0, task="image", help="comma-separated tags kept in front when shuffling")
    caption_dropout: float = _f(0.0, lo=0.0, hi=1.0, task="image", help="probability of an empty caption")
    tag_dropout: float = _f(0.0, lo=0.0, hi=1.0, task="image", help="probability of dropping each tag")
    trigger_word: str = _f("", task="image", help="prefix put in front of every caption")
    cache_latents: bool = _f(True, task="image", help="encode each image once, cache the latents on disk")
    cache_text_encoder: bool = _f(True, task="image",
                                  help="cache text-encoder outputs when the encoders are frozen and captions fixed")
    # text
    format: str = _f("auto", choices=("auto", "alpaca", "chat", "text"), task="text")
    max_length: int = _f(512, lo=8, hi=131072, task="text")
    train_on_prompt: bool = _f(False, task="text", help="also compute the loss on prompt tokens")


@dataclass
class NetworkConfig:
    method: str = _f("loha", choices=IMAGE_METHODS + TEXT_METHODS[1:],
                     help=f"image: {', '.join(IMAGE_METHODS)}; text: {', '.join(TEXT_METHODS)}")
    rank: int = _f(8, lo=1, hi=4096)
    alpha: float = _f(4.0, lo=0.0, help="scale = alpha / rank; 0 means alpha = rank")
    dropout: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True)
    # image
    conv_rank: int = _f(0, lo=0, hi=4096, task="image",
                        help="rank of 3x3 convolutions (preset full); 0 means network.rank")
    conv_alpha: float = _f(0.0, lo=0.0, task="image", help="0 means network.alpha (with conv_rank 0)")
    factor: int = _f(-1, lo=-1, task="image", help="LoKr Kronecker factor; -1 picks it automatically")
    decompose_both: bool = _f(False, task="image")
    block_size: int = _f(8, lo=1, task="image", help="OFT block size")
    constraint: float = _f(0.0, lo=0.0, task="image", help="OFT (COFT) constraint; 0 = none")
    rescaled: bool = _f(False, task="image", help="OFT rescaled output")
    hra_apply_gs: bool = _f(False, task="image", help="HRA: Gram-Schmidt orthogonalisation (as peft; the model then "
                        "starts as a reflection of every adapted input, not unchanged)")
    hra_lambda: float = _f(0.0, lo=0.0, task="image", help="HRA orthogonality regulariser weight")
    rank_dropout: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True, task="image")
    module_dropout: float = _f(0.0, lo=0.0, hi=1.0, hi_open=True, task="image")
    preset: str = _f("attn-mlp", choices=("attn", "attn-mlp", "full"), task="image",
                     help="which UNet/text-encoder layers get adapters")
    train_unet: bool = _f(True, task="image")
    train_text_encoder: bool = _f(False, task="image")
    include: list[str] = _f([], task="image", help="extra module-name patterns to adapt")
    exclude: list[str] = _f([], task="image", help="module-name patterns never adapted")
    overrides: dict[str, dict[str, Any]] = _f({}, task="image",
                                              help="pattern -> parameters for the matching modules")
    # text
    target_modules: list[str] = _f(["q_proj", "v_proj"], task="text")
    init_r: int = _f(12, lo=1, hi=4096, task="text", help="AdaLoRA starting rank per module")
    target_r: int = _f(8, lo=1, hi=4096, task="text", help="AdaLoRA average final rank")
    tinit: int = _f(0, lo=0, task="text", help="AdaLoRA warm-up steps before pruning")
    tfinal: int = _f(0, lo=0, task="text", help="AdaLoRA final steps at a fixed rank pattern")
    delta_t: int = _f(1, lo=1, task="text", help="AdaLoRA steps between two maskings")
    beta1: float = _f(0.85, lo=0.0, hi=1.0, hi_open=True, task="text")
    beta2: float = _f(0.85, lo=0.0, hi=1.0, hi_open=True, task="text")
    orth_reg_weight: float = _f(0.5, lo=0.0, task="text")
    adapter_len: int = _f(10, lo=1, task="text", help="Llama-Adapter prompt length")
    adapter_layers: int = _f(2, lo=1, task="text", help="Llama-Adapter: number of top decoder layers")
    experts: list[str] = _f([], task="text", help="X-LoRA: two or more LoRA folders")
    xlora_temperature: float = _f(1.0, lo=0.0, lo_open=True, task="text")
    xlora_top_k: int = _f(0, lo=0, task="text", help="0 keeps every expert")
    xlora_layerwise: bool = _f(False, task="text", help="one scaling per layer instead of one for all")
    xlora_depth: int = _f(1, lo=1, hi=16, task="text",
                          help="X-LoRA classifier layers; 1 is one Linear, more add hidden layers of xlora_size")
    xlora_size: int = _f(2048, lo=1, hi=65536, task="text", help="X-LoRA classifier hidden width (xlora_depth > 1)")
    xlora_dropout: float = _f(0.2, lo=0.0, hi=1.0, hi_open=True, task="text",
                              help="X-LoRA classifier dropout after each hidden layer (xlora_depth > 1); PEFT's "
                                   "xlora_dropout_p")


@dataclass
class TrainingConfig:
    max_steps: int = _f(0, lo=0, help="optimizer steps; 0 means train for `epochs`")
    epochs: int = _f(1, lo=0)
    batch_size: int = _f(1, lo=1, hi=4096)
    grad_accum: int = _f(1, lo=1, hi=4096)
    lr: float = _f(1e-4, lo=0.0, lo_open=True, hi=10.0)
    text_encoder_lr: float = _f(0.0, lo=0.0, hi=10.0, task="image", help="0 means the same as lr")
    optimizer: str = _f("adamw", choices=OPTIMIZERS)
    weight_decay: float = _f(0.01, lo=0.0, hi=1.0)
    scheduler: str = _f("constant", choices=SCHEDULERS)
    warmup_steps: int = _f(0, lo=0)
    scheduler_cycles: int = _f(1, lo=1, help="cosine_with_restarts: number of cycles")
    scheduler_power: float = _f(1.0, lo=0.0, lo_open=True, help="polynomial: power")
    mixed_precision: str = _f("no", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _f(False)
    max_grad_norm: float = _f(1.0, lo=0.0, help="0 disables clipping")
    # image
    noise_offset: float = _f(0.0, lo=0.0, hi=1.0, task="image")
    min_snr_gamma: float = _f(0.0, lo=0.0, task="image", help="0 disables min-SNR weighting")
    zero_terminal_snr: bool = _f(False, task="image")
    loss: str = _f("l2", choices=("l2", "huber"), task="image")
    huber_delta: float = _f(0.1, lo=0.0, lo_open=True, task="image")
    fixed_noise: bool = _f(False, task="image",
                           help="the same noise and timestep for each image at every step (debugging, tests)")


@dataclass
class SamplePrompt:
    prompt: str = _f("")
    negative_prompt: str = _f("", task="image")
    seed: int = _f(0, lo=0)
    steps: int = _f(20, lo=1, hi=1000, task="image")
    cfg: float = _f(7.0, lo=0.0, hi=100.0, task="image")
    width: int = _f(0, lo=0, hi=8192, task="image", help="0 means dataset.resolution")
    height: int = _f(0, lo=0, hi=8192, task="image", help="0 means dataset.resolution")


@dataclass
class SampleConfig:
    every_n_steps: int = _f(0, lo=0, help="0 disables periodic previews")
    at_start: bool = _f(False)
    at_end: bool = _f(True, help="image: rendered from the exported file reloaded")
    sampler: str = _f("euler_a", choices=SAMPLERS, task="image")
    prompts: list[SamplePrompt] = _f([])
    max_new_tokens: int = _f(32, lo=1, hi=4096, task="text")


@dataclass
class SaveConfig:
    every_n_steps: int = _f(0, lo=0, help="0: no periodic checkpoints by steps")
    every_n_epochs: int = _f(0, lo=0, help="0: no periodic checkpoints by epochs")
    keep_last: int = _f(3, lo=0, help="checkpoints kept; 0 keeps all")
    dtype: str = _f("fp16", choices=("fp16", "fp32"), help="dtype of the exported adapter")
    output_name: str = _f("", help="file name of the exported adapter; empty: the run folder's name")
    merged_model: bool = _f(False, task="text", help="LoRA/AdaLoRA: also save the base model with the adapter "
                                                     "merged in (RUN_DIR/merged)")
    oft_as_lora: bool = _f(False, task="image",
                           help="write OFT as its exact LoRA (Forge does not load OFT; A1111 and ComfyUI do)")
    activation_text: str = _f("", task="image", help="A1111 sidecar activation text (trigger words)")
    preferred_weight: float = _f(1.0, lo=0.0, hi=10.0, task="image", help="A1111 sidecar preferred weight")
    tensorboard: bool = _f(False, help="also write TensorBoard logs (loss, learning rates, it/s, image previews) to "
                                       "RUN_DIR/tensorboard; needs `pip install tensorboard`")


SECTIONS: dict[str, type] = {"model": ModelConfig, "dataset": DatasetConfig, "network": NetworkConfig,
                             "training": TrainingConfig, "sample": SampleConfig, "save": SaveConfig}


@dataclass
class Config:
    task: str = _f("image", choices=TASKS)
    run_dir: str = _f("", help="output folder of the run")
    seed: int = _f(0, lo=0, hi=2**32 - 1)
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    save: SaveConfig = field(default_factory=SaveConfig)

    # ---- building -----------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Config":
        """Build and validate; unknown keys and wrong types raise ConfigError naming the field."""
        data = dict(data)
        network = data.get("network", {})
        if data.get("task") == "text" and isinstance(network, dict) and "method" not in network:
            data["network"] = {**network, "method": "lora"}  # the image default is loha
        config = _build(cls, data, "")
        config.validate()
        return config

    def to_dict(self, only_changed: bool = False) -> dict[str, Any]:
        """Plain dict (TOML-ready). ``only_changed`` keeps just the fields that differ from the defaults."""
        full = dataclasses.asdict(self)
        if not only_changed:
            return full
        return _diff(full, dataclasses.asdict(Config()))

    def to_toml(self, only_changed: bool = False) -> str:
        return tomli_w.dumps(self.to_dict(only_changed))

    def write_toml(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_toml())

    def replace(self, overrides: list[str]) -> "Config":
        """A new validated config with ``section.key=value`` overrides applied."""
        return Config.from_dict(apply_overrides(self.to_dict(), overrides))

    # ---- checking -----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Ranges and choices of every field, then the rules that depend on the task or on several fields."""
        _check_ranges(self, "")
        for prompt_index, prompt in enumerate(self.sample.prompts):
            _check_ranges(prompt, f"sample.prompts[{prompt_index}].")
        if self.task == "image":
            self._validate_image()
        else:
            self._validate_text()
        t = self.training
        if t.max_steps == 0 and t.epochs == 0:
            raise ConfigError("training.max_steps and training.epochs are both 0; set one of them (> 0)")
        if t.scheduler != "constant" and t.warmup_steps and t.max_steps and t.warmup_steps >= t.max_steps:
            raise ConfigError(f"training.warmup_steps ({t.warmup_steps}) must be below training.max_steps "
                              f"({t.max_steps})")

    def _validate_image(self) -> None:
        n, d = self.network, self.dataset
        if n.method not in IMAGE_METHODS:
            raise ConfigError(f"network.method = {n.method!r} is a text method; for task = \"image\" choose one "
                              f"of {', '.join(IMAGE_METHODS)}")
        if not d.caption_extension.strip().strip("."):
            raise ConfigError(f"dataset.caption_extension = {d.caption_extension!r} is empty; captions are read "
                              "from IMAGE_NAME + this extension, e.g. \".txt\"")
        if not d.min_bucket_resolution <= d.resolution <= d.max_bucket_resolution:
            raise ConfigError(f"dataset.resolution ({d.resolution}) must lie between dataset.min_bucket_resolution "
                              f"({d.min_bucket_resolution}) and dataset.max_bucket_resolution "
                              f"({d.max_bucket_resolution})")
        for name in ("resolution", "min_bucket_resolution", "max_bucket_resolution", "bucket_step"):
            if getattr(d, name) % 8:
                raise ConfigError(f"dataset.{name} ({getattr(d, name)}) must be a multiple of 8 (the VAE "
                                  "downsamples by 8)")
        if not n.train_unet and not n.train_text_encoder:
            raise ConfigError("network.train_unet and network.train_text_encoder are both false; nothing would "
                              "train")
        if n.factor == 0:
            raise ConfigError("network.factor must be -1 (automatic) or >= 1, got 0")
        if n.method == "hra" and not n.hra_apply_gs:
            for name in ("rank", "conv_rank"):
                if getattr(n, name) % 2:
                    raise ConfigError(f"network.{name} ({getattr(n, name)}) must be even for HRA: the reflections "
                                      "start in equal pairs so that training starts from the unchanged model")
        for index, prompt in enumerate(self.sample.prompts):
            for side in ("width", "height"):
                if getattr(prompt, side) % 8:
                    raise ConfigError(f"sample.prompts[{index}].{side} ({getattr(prompt, side)}) must be a "
                                      "multiple of 8 (or 0 for dataset.resolution)")
        for pattern, params in n.overrides.items():
            if not isinstance(params, dict):
                raise ConfigError(f"network.overrides.{pattern!r} must be a table of parameters, e.g. "
                                  f"{{ rank = 16 }}")

    def _validate_text(self) -> None:
        n = self.network
        if n.method not in TEXT_METHODS:
            raise ConfigError(f"network.method = {n.method!r} is an image method; for task = \"text\" choose one "
                              f"of {', '.join(TEXT_METHODS)}")
        if n.method == "adalora" and n.target_r > n.init_r:
            raise ConfigError(f"network.target_r ({n.target_r}) must not exceed network.init_r ({n.init_r})")
        if n.method == "xlora" and len(n.experts) < 2:
            raise ConfigError(f"network.experts lists {len(n.experts)} LoRA folder(s); X-LoRA needs two or more")
        if n.method in ("lora", "adalora") and not n.target_modules:
            raise ConfigError("network.target_modules is empty; name at least one module, e.g. [\"q_proj\", "
                              "\"v_proj\"]")


# ---- generic building and checking --------------------------------------------------------------------------
def _build(cls: type, data: Any, path: str) -> Any:
    where = path.rstrip(".") or "the config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {path}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown key {path}{key}{hint}; allowed keys "
                              f"{'in [' + path.rstrip('.') + ']' if path else 'at the top level'}: "
                              f"{', '.join(known)}")
    return cls(**{key: _coerce(value, hints[key], f"{path}{key}") for key, value in data.items()})


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``hint``; ints are accepted for floats, "a,b" for lists."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{name}.")
    origin = typing.get_origin(hint)
    if origin is list:
        (item_hint,) = typing.get_args(hint)
        if isinstance(value, str) and item_hint is str:
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        return [_coerce(item, item_hint, f"{name}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is bool and not isinstance(value, bool) or hint is not bool and isinstance(value, bool) \
            or not isinstance(value, hint):
        raise ConfigError(f"{name} must be {_type_word(hint)}, got {value!r}")
    return value


def _type_word(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _check_ranges(obj: Any, path: str) -> None:
    for f in fields(obj):
        value, meta, name = getattr(obj, f.name), f.metadata, f"{path}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_ranges(value, f"{name}.")
            continue
        if meta.get("choices") and value not in meta["choices"]:
            raise ConfigError(f"{name} = {value!r} is not allowed; choose one of {', '.join(meta['choices'])}")
        lo, hi = meta.get("lo"), meta.get("hi")
        if lo is None and hi is None:
            continue
        below = lo is not None and (value <= lo if meta["lo_open"] else value < lo)
        above = hi is not None and (value >= hi if meta["hi_open"] else value > hi)
        if below or above:
            raise ConfigError(f"{name} = {value!r} is out of range; allowed: {_range_word(meta)}")


def _range_word(meta: Any) -> str:
    lo, hi = meta["lo"], meta["hi"]
    if hi is None:
        return f"{'>' if meta['lo_open'] else '>='} {lo:g}"
    if lo is None:
        return f"{'<' if meta['hi_open'] else '<='} {hi:g}"
    return f"{'(' if meta['lo_open'] else '['}{lo:g}, {hi:g}{')' if meta['hi_open'] else ']'}"


def _diff(full: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in full.items():
        if isinstance(value, dict) and isinstance(default.get(key), dict) and key != "overrides":
            sub = _diff(value, default[key])
            if sub:
                out[key] = sub
        elif value != default.get(key):
            out[key] = value
    return out


# ---- files, overrides and the CLI form ----------------------------------------------------------------------
def parse_value(text: str) -> Any:
    """A ``--set`` value: TOML syntax (1e-4, true, "x", [1, 2], {prompt = "a"}); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings to a config dict (a copy is returned)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. training.lr=1e-4")
        parts = key.split(".")
        if len(parts) > 2 and parts[:2] != ["network", "overrides"] or len(parts) > 4:
            raise ConfigError(f"--set {item!r}: keys are top-level or section.key, e.g. network.rank=16")
        target = data
        for part in parts[:-1]:
            if part not in SECTIONS and target is data:
                raise ConfigError(f"--set {item!r}: unknown section {part!r}; sections: {', '.join(SECTIONS)}")
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a table")
        target[parts[-1]] = parse_value(text.strip())
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a TOML config (or start from the defaults when ``path`` is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    data = apply_overrides(data, overrides or [])
    try:
        return Config.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


def config_to_cli(config: Config) -> str:
    """The ``lycotrain train`` command that reproduces ``config`` with no file (one ``--set`` per changed field)."""
    words = ["lycotrain", "train"]
    for key, value in _flatten(config.to_dict(only_changed=True)):
        words += ["--set", f"{key}={_inline(value)}"]
    return " ".join(shlex.quote(w) for w in words)


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        if isinstance(value, dict) and key in SECTIONS and not prefix:
            items += _flatten(value, f"{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def _inline(value: Any) -> str:
    """One value in TOML inline syntax (what parse_value reads back)."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_inline(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_inline(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).strip()[len("v = "):]


def _key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else tomli_w.dumps({"k": key})[len("k = "):].strip()


def field_help(section: str, name: str) -> dict[str, Any]:
    """The rule of one field (choices, range, task, help): what the GUI needs for a widget and a tooltip."""
    cls = Config if section == "" else SECTIONS.get(section)
    if cls is None:
        raise ConfigError(f"unknown section {section!r}; sections: {', '.join(SECTIONS)}")
    for f in fields(cls):
        if f.name == name:
            return dict(f.metadata)
    raise ConfigError(f"unknown key {section}.{name}")
