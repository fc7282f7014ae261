"""One-file Stable Diffusion checkpoints in the original (LDM / SGM) layout: family detection, offline loading
through diffusers' ``from_single_file``, and writing (diffusers has no writer for this layout).

Loading needs diffusers-format component configs and tokenizer files, which a single file lacks. They come from:

1. the file's own metadata when lycotrain wrote it (``lycotrain_pipeline``: the component configs, and the
   tokenizer when it is not the standard CLIP one). Weights alone cannot say everything about an
   architecture (the number of attention heads is not in any tensor shape), so a file we write carries its
   exact configs and reloads to the identical pipeline, tiny or real;
2. otherwise the published SD1.5 / SD2.1 / SDXL configs and the CLIP BPE vocabulary that ship as package data,
   chosen by the family detected from the key names and shapes.

Either way they are written to a temporary diffusers-layout folder that ``from_single_file(config=...)`` reads
with ``local_files_only=True``: nothing is downloaded.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from lycotrain.atomic import atomic_write
from lycotrain.errors import ModelError

METADATA_KEY = "lycotrain_pipeline"
FAMILIES = ("sd1", "sd2", "sd2-v", "sdxl")

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# (component, layout, prefix) of the text encoders in each family's original checkpoint
_TEXT_LAYOUT: dict[str, list[tuple[str, str, str]]] = {
    "sd1": [("text_encoder", "clip", "cond_stage_model.transformer.")],
    "sd2": [("text_encoder", "openclip", "cond_stage_model.model.")],
    "sdxl": [("text_encoder", "clip", "conditioner.embedders.0.transformer."),
             ("text_encoder_2", "openclip", "conditioner.embedders.1.model.")],
}


# ---- family detection ----------------------------------------------------------------------------------
def detect_family(keys: Iterable[str]) -> str:
    """``sd1`` / ``sd2`` / ``sdxl`` from the key names of an original-layout checkpoint.

    SD2 checkpoints do not say whether they predict v or epsilon; the caller decides (see ``load_single_file``).
    """
    keys = set(keys)
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise ModelError("the checkpoint has no 'model.diffusion_model.*' UNet weights: it is not a Stable "
                         "Diffusion 1.x/2.x/XL checkpoint in the original layout (diffusers folders are also accepted)")
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("conditioner.embedders.1.model."):
        return "sdxl"
    if has("conditioner.embedders.0.model."):
        raise ModelError("this is an SDXL refiner checkpoint (one OpenCLIP text encoder); only SDXL base "
                         "models can be trained on")
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer."):
        return "sd1"
    raise ModelError("the checkpoint has a UNet but no CLIP text encoder this trainer knows (expected "
                     "'cond_stage_model.*' for SD1.x/2.x or 'conditioner.embedders.*' for SDXL)")


# ---- diffusers -> original layout ------------------------------------------------------------------------
_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}


def _rename(key: str, prefixes: Mapping[str, str], inner: Mapping[str, str] | None = None) -> str | None:
    """Replace the longest matching diffusers prefix; optionally rename the first path part after it."""
    for old in sorted(prefixes, key=len, reverse=True):
        if key.startswith(old):
            rest = key[len(old):]
            if inner:
                head, _, tail = rest.partition(".")
                rest = f"{inner.get(head, head)}.{tail}" if tail else inner.get(head, head)
            return prefixes[old] + rest
    return None


def _layers_per_block(config: Mapping[str, Any]) -> int:
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ModelError(f"layers_per_block={layers!r} per block has no original-layout equivalent")
    return layers


def unet_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` keys -> LDM/SGM ``model.diffusion_model.*`` keys."""
    per, blocks = _layers_per_block(config), len(config["block_out_channels"])
    resnets: dict[str, str] = {"mid_block.resnets.0.": "middle_block.0.", "mid_block.resnets.1.": "middle_block.2."}
    others: dict[str, str] = {f"{k}.": f"{v}." for k, v in _UNET_TOP.items()}
    others["mid_block.attentions.0."] = "middle_block.1."
    for i in range(blocks):
        for j in range(per):
            index = (per + 1) * i + j + 1
            resnets[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{index}.0."
            others[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{index}.1."
        for j in range(per + 1):
            index = (per + 1) * i + j
            resnets[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{index}.0."
            others[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{index}.1."
        if i < blocks - 1:
            others[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(per + 1) * (i + 1)}.0.op."
            slot = 2 if config["up_block_types"][i].startswith("CrossAttn") else 1
            others[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(per + 1) * i + per}.{slot}."
    out = {}
    for key, value in state.items():
        new = _rename(key, resnets, _RESNET) or _rename(key, others)
        if new is None:
            raise ModelError(f"UNet weight {key!r} has no place in the original layout")
        out[UNET_PREFIX + new] = value
    return out


_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}


def vae_to_original(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderKL`` keys -> LDM ``first_stage_model.*`` keys (attention as 1x1 convs)."""
    per, blocks = _layers_per_block(config), len(config["block_out_channels"])
    resnets: dict[str, str] = {}
    others: dict[str, str] = {"quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."}
    for part in ("encoder", "decoder"):
        others.update({f"{part}.conv_in.": f"{part}.conv_in.", f"{part}.conv_out.": f"{part}.conv_out.",
                       f"{part}.conv_norm_out.": f"{part}.norm_out."})
        resnets.update({f"{part}.mid_block.resnets.{k}.": f"{part}.mid.block_{k + 1}." for k in range(2)})
    for i in range(blocks):
        for j in range(per):
            resnets[f"encoder.down_blocks.{i}.resnets.{j}."] = f"encoder.down.{i}.block.{j}."
        for j in range(per + 1):
            resnets[f"decoder.up_blocks.{i}.resnets.{j}."] = f"decoder.up.{blocks - 1 - i}.block.{j}."
        if i < blocks - 1:
            others[f"encoder.down_blocks.{i}.downsamplers.0.conv."] = f"encoder.down.{i}.downsample.conv."
            others[f"decoder.up_blocks.{i}.upsamplers.0.conv."] = f"decoder.up.{blocks - 1 - i}.upsample.conv."
    attentions = {f"{part}.mid_block.attentions.0.": f"{part}.mid.attn_1." for part in ("encoder", "decoder")}
    out = {}
    for key, value in state.items():
        new = _rename(key, resnets, {"conv_shortcut": "nin_shortcut"}) or _rename(key, others)
        if new is None and (new := _rename(key, attentions, _VAE_ATTENTION)) is not None:
            new = new.replace(".proj_out.0.", ".proj_out.")
            if value.dim() == 2:
                value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        if new is None:
            raise ModelError(f"VAE weight {key!r} has no place in the original layout")
        out[VAE_PREFIX + new] = value
    return out


def _with_text_model(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP keys with the ``text_model.`` level (transformers 5 dropped it from ``CLIPTextModel``)."""
    return {k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
            for k, v in state.items()}


def clip_to_original(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF ``CLIPTextModel`` -> the original CLIP-L layout (HF names under ``<prefix>text_model.``)."""
    return {prefix + k: v for k, v in _with_text_model(state).items() if not k.endswith("position_ids")}


_OPENCLIP_TOP = {"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
                 "text_model.embeddings.position_embedding.weight": "positional_embedding",
                 "text_model.final_layer_norm.weight": "ln_final.weight",
                 "text_model.final_layer_norm.bias": "ln_final.bias"}
_OPENCLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


def openclip_to_original(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """HF CLIP text model -> OpenCLIP layout: fused ``in_proj`` q/k/v, ``resblocks``, transposed projection."""
    state = _with_text_model(state)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key in _OPENCLIP_TOP:
            out[prefix + _OPENCLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()  # OpenCLIP computes x @ projection
        elif key.startswith("text_model.encoder.layers."):
            index, _, rest = key.removeprefix("text_model.encoder.layers.").partition(".")
            block = f"{prefix}transformer.resblocks.{index}."
            module, _, kind = rest.rpartition(".")
            if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if module.endswith("q_proj"):  # fused once, when its first part is met
                    base = f"text_model.encoder.layers.{index}.self_attn."
                    out[f"{block}attn.in_proj_{kind}"] = torch.cat(
                        [state[f"{base}{p}_proj.{kind}"] for p in "qkv"], dim=0)
            elif module in _OPENCLIP_LAYER:
                out[f"{block}{_OPENCLIP_LAYER[module]}.{kind}"] = value
            else:
                raise ModelError(f"text encoder weight {key!r} has no place in the OpenCLIP layout")
        else:
            raise ModelError(f"text encoder weight {key!r} has no place in the OpenCLIP layout")
    return out


# ---- reading -----------------------------------------------------------------------------------------------
def read_keys_and_metadata(path: Path) -> tuple[list[str], dict[str, str]]:
    """Key names and metadata of a ``.safetensors`` file without loading its tensors."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises several types for a damaged header
        raise ModelError(f"{path}: cannot read as .safetensors ({exc}); is the download complete?") from None


def load_ckpt(path: Path) -> dict[str, torch.Tensor]:
    """A legacy ``.ckpt``, read with ``torch.load(weights_only=True)`` so no pickled code ever runs."""
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"{path}: cannot be read safely as a tensors-only .ckpt ({exc}); convert it to "
                         ".safetensors with a trusted tool") from None
    while isinstance(data, dict) and "state_dict" in data:
        data = data["state_dict"]
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


def _package_configs(family: str) -> dict[str, dict[str, Any]]:
    folder = resources.files("lycotrain") / "data" / "configs" / family
    configs = {"model_index": json.loads((folder / "model_index.json").read_text())}
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if (folder / component / "config.json").is_file():
            configs[component] = json.loads((folder / component / "config.json").read_text())
    configs["scheduler"] = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return configs


def _write_config_folder(folder: Path, configs: Mapping[str, Any], tokenizers: Mapping[str, str]) -> None:
    """A diffusers-layout folder with configs and tokenizers only (what ``from_single_file(config=)`` reads)."""
    from lycotrain.diffusion.tokenizer import clip_vocabulary, make_clip_tokenizer

    (folder / "model_index.json").write_text(json.dumps(configs["model_index"]))
    for component, config in configs.items():
        if component == "model_index":
            continue
        name = "scheduler_config.json" if component == "scheduler" else "config.json"
        (folder / component).mkdir()
        (folder / component / name).write_text(json.dumps(config))
    for component in ("tokenizer", "tokenizer_2"):
        if component not in configs["model_index"]:
            continue
        (folder / component).mkdir()
        if component in tokenizers:  # a non-standard vocabulary recorded by save_single_file
            (folder / component / "tokenizer.json").write_text(tokenizers[component])
            (folder / component / "tokenizer_config.json").write_text(
                json.dumps(json.loads(tokenizers[component + "_config"])))
        else:  # SDXL's second tokenizer pads with "!", like OpenCLIP
            pad = "!" if component == "tokenizer_2" else "<|endoftext|>"
            make_clip_tokenizer(clip_vocabulary(), pad_token=pad).save_pretrained(folder / component)


def load_single_file(path: Path, family: str = "auto", dtype: torch.dtype | None = None) -> tuple[Any, str]:
    """``(pipeline, family)`` from one original-layout ``.safetensors`` or ``.ckpt``, fully offline.

    ``family`` "auto" reads it from the file; SD2 files that lycotrain did not write must name it
    ("sd2" for 512-px epsilon models, "sd2-v" for 768-px v-prediction ones): the weights cannot tell.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if path.suffix == ".safetensors":
        keys, metadata = read_keys_and_metadata(path)
        source: str | dict[str, torch.Tensor] = str(path)
    elif path.suffix == ".ckpt":
        state = load_ckpt(path)
        keys, metadata, source = list(state), {}, ""
    else:
        raise ModelError(f"{path}: unknown model file type {path.suffix!r}; use a .safetensors (or .ckpt) "
                         "checkpoint or a diffusers folder")
    detected = detect_family(keys)
    recorded = json.loads(metadata[METADATA_KEY]) if METADATA_KEY in metadata else None
    if family == "auto" and recorded is None and detected == "sd2":
        raise ModelError(f"{path}: SD 2.x files do not say whether they predict noise or v; set model.family "
                         "(--family for check, merge and extract) to 'sd2' (512-px base models) or 'sd2-v' "
                         "(768-px v-prediction models)")
    if family == "auto":
        family = recorded["family"] if recorded else detected
    if family not in FAMILIES or family.split("-")[0] != detected:
        raise ModelError(f"{path}: holds a {detected} model, not {family!r}; use one of {', '.join(FAMILIES)}")
    configs = recorded["configs"] if recorded else _package_configs(family)
    pipeline_cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    with tempfile.TemporaryDirectory(prefix="lycotrain-config-") as tmp:
        _write_config_folder(Path(tmp), configs, recorded.get("tokenizers", {}) if recorded else {})
        if path.suffix == ".ckpt":  # from_single_file reads paths only; give it the tensors as .safetensors
            from safetensors.torch import save_file

            source = str(Path(tmp) / "weights.safetensors")
            save_file({k: v.contiguous() for k, v in state.items()}, source)
        try:
            # a .ckpt's temporary copy is deleted below, so it must not stay memory-mapped
            pipeline = pipeline_cls.from_single_file(source, config=tmp, local_files_only=True, torch_dtype=dtype,
                                                       disable_mmap=path.suffix == ".ckpt")
        except (ValueError, KeyError, RuntimeError, OSError) as exc:
            raise ModelError(f"{path}: not a loadable {family} checkpoint ({exc})") from None
    return pipeline, family


# ---- writing -------------------------------------------------------------------------------------------------
def _tokenizer_record(tokenizer: Any, component: str) -> dict[str, str]:
    """The tokenizer to store in the file, or nothing when it is the standard CLIP one the package ships."""
    from lycotrain.diffusion.tokenizer import clip_vocabulary

    if tokenizer.get_vocab() == clip_vocabulary()[0]:
        return {}
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": tokenizer.model_max_length,
              "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
              "unk_token": tokenizer.unk_token, "pad_token": tokenizer.pad_token}
    return {component: tokenizer.backend_tokenizer.to_str(), component + "_config": json.dumps(config)}


def original_state_dict(pipeline: Any, family: str) -> dict[str, torch.Tensor]:
    """Every weight of ``pipeline`` under its original-layout (LDM/SGM) name."""
    state = unet_to_original(pipeline.unet.state_dict(), pipeline.unet.config)
    state.update(vae_to_original(pipeline.vae.state_dict(), pipeline.vae.config))
    for component, layout, prefix in _TEXT_LAYOUT[family.split("-")[0]]:
        encoder_state = getattr(pipeline, component).state_dict()
        convert = clip_to_original if layout == "clip" else openclip_to_original
        state.update(convert(encoder_state, prefix))
    return state


def save_single_file(pipeline: Any, path: str | Path, family: str, dtype: torch.dtype | None = None) -> Path:
    """Write ``pipeline`` as one original-layout ``.safetensors`` (atomic) that WebUIs and diffusers load.

    The metadata records the component configs (and a non-standard tokenizer) so ``load_single_file`` rebuilds
    exactly this architecture; a real SD checkpoint written here stays a plain checkpoint for other tools.
    """
    from safetensors.torch import save_file

    path = Path(path)
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
             for k, v in original_state_dict(pipeline, family).items()}
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    configs: dict[str, Any] = {c: dict(getattr(pipeline, c).config) if c in ("unet", "vae")
                               else getattr(pipeline, c).config.to_dict() for c in components}
    configs["scheduler"] = dict(pipeline.scheduler.config)
    configs["model_index"] = {**_package_configs(family)["model_index"],
                              "scheduler": ["diffusers", type(pipeline.scheduler).__name__]}
    tokenizers: dict[str, str] = {}
    for component in ("tokenizer", "tokenizer_2"):
        if getattr(pipeline, component, None) is not None:
            tokenizers.update(_tokenizer_record(getattr(pipeline, component), component))
    record = {"family": family, "configs": configs, "tokenizers": tokenizers}
    metadata = {METADATA_KEY: json.dumps(record, default=_json_default)}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, (tuple, set)):
        return list(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    raise TypeError(f"cannot record {type(value).__name__} in the checkpoint metadata")
