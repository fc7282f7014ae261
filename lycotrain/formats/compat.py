"""What AUTOMATIC1111, Forge and ComfyUI will do with an adapter file, without running them.

Clean-room simulation written from the documented loader behaviour in specs/webui-formats.md (§1.2 mechanics,
§2 names, §3-4 per-method formulas, §5 version detection); no WebUI code is used. For each loader:

* which modules it maps onto this model, which keys it drops, and whether it rejects the whole file
  (A1111: a module of unknown type; Forge: more than 12 unmatched keys, or a LoKr Tucker core);
* the delta W it applies at multipliers 1 and 0.5, and its largest relative difference to lycotrain's own
  delta (``||dW_loader - dW_ours||_F / ||dW_ours||_F``, max over modules; a dropped module counts 1);
* the SD version A1111/Forge detect from the metadata (their cards are hidden when it differs from the model).

A1111's diffusers -> LDM key conversion is written for SD's two ResNets per block; the simulation uses the
model's own ``layers_per_block`` so that tiny test models stand in for the full-size ones (on SD1.5/SD2.1/SDXL
the two are the same). Its upsampler rule (slot 1 for up block 0, else 2) is kept as documented, which
reproduces its known miss on diffusers-named SDXL files.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from lycotrain.atomic import atomic_write_text
from lycotrain.errors import LycotrainError
from lycotrain.formats.kohya import AdapterFile, adapter_from_tensors, module_rank, read_adapter_file
from lycotrain.formats.names import LDMNameMap, ModelNames, UNetLayout, model_names

LOADERS = ("a1111", "forge", "comfyui")
FORGE_UNMATCHED_LIMIT = 12
MULTIPLIERS = (1.0, 0.5)
_RESNET_LEAVES = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                  "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}
_OPENCLIP_LEAVES = {"self_attn_q_proj": "attn_q_proj", "self_attn_k_proj": "attn_k_proj",
                    "self_attn_v_proj": "attn_v_proj", "self_attn_out_proj": "attn_out_proj",
                    "mlp_fc1": "mlp_c_fc", "mlp_fc2": "mlp_c_proj"}
_FUSED = ("attn_q_proj", "attn_k_proj", "attn_v_proj", "attn_out_proj")
# methods each loader applies (§4): A1111 reads old oft_diag files, ComfyUI and Forge do not; Forge has no OFT
SUPPORTED = {"a1111": {"lora", "loha", "lokr", "oft", "oft_diag"}, "comfyui": {"lora", "loha", "lokr", "oft"},
             "forge": {"lora", "loha", "lokr"}}


# ---- key maps -----------------------------------------------------------------------------------------
def _a1111_unet_target(body: str, layers: int) -> str:
    """A1111's ``convert_diffusers_name_to_compvis`` as the spec tables describe it (``layers`` per block)."""
    per = layers + 1
    patterns: list[tuple[str, Callable[[re.Match[str]], str]]] = [
        (r"conv_in(.*)", lambda m: f"input_blocks_0_0{m[1]}"),
        (r"conv_out(.*)", lambda m: f"out_2{m[1]}"),
        (r"time_embedding_linear_(\d+)(.*)", lambda m: f"time_embed_{int(m[1]) * 2 - 2}{m[2]}"),
        (r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"input_blocks_{1 + per * int(m[1]) + int(m[3])}_{_slot(m[2])}_{_leaf(m[2], m[4])}"),
        (r"mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"middle_block_{1 if m[1] == 'attentions' else 2 * int(m[2])}_{_leaf(m[1], m[3])}"),
        (r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"output_blocks_{per * int(m[1]) + int(m[3])}_{_slot(m[2])}_{_leaf(m[2], m[4])}"),
        (r"down_blocks_(\d+)_downsamplers_0_conv", lambda m: f"input_blocks_{per * (int(m[1]) + 1)}_0_op"),
        (r"up_blocks_(\d+)_upsamplers_0_conv",
         lambda m: f"output_blocks_{per * int(m[1]) + layers}_{1 if int(m[1]) == 0 else 2}_conv"),
    ]
    for pattern, convert in patterns:
        match = re.fullmatch(pattern, body)
        if match:
            return "diffusion_model_" + convert(match)
    return "diffusion_model_" + body  # fallback: lora_unet -> diffusion_model (LDM names pass through)


def _slot(kind: str) -> int:
    return 1 if kind == "attentions" else 0


def _leaf(kind: str, rest: str) -> str:
    return _RESNET_LEAVES.get(rest, rest) if kind == "resnets" else rest


def _a1111_te_target(name: str, family: str) -> str | None:
    """A1111's text-encoder layer name for a kohya TE name (HF CLIP for SD1/TE1, OpenCLIP for SD2/TE2)."""
    match = re.fullmatch(r"lora_te([12]?)_text_model_encoder_layers_(\d+)_(.+)", name)
    if match is None:
        return None
    which, layer, leaf = match[1], match[2], match[3]
    openclip = (family == "sd2" and which == "") or (family == "sdxl" and which == "2")
    if family == "sdxl" and which == "":
        return None
    if family != "sdxl" and which:
        return None
    if openclip:
        return f"{'1_' if which else ''}model_transformer_resblocks_{layer}_{_OPENCLIP_LEAVES.get(leaf, leaf)}"
    return f"{'0_' if which else ''}transformer_text_model_encoder_layers_{layer}_{leaf}"


@dataclass
class KeyMaps:
    """File module name -> internal layer name, per loader, for one model."""

    a1111: dict[str, str]
    comfyui: dict[str, str]
    layers_per_block: int
    family: str

    def a1111_target(self, file_name: str) -> str | None:
        """The layer name A1111 looks up for a file module (before checking that it exists)."""
        if file_name.startswith("lora_unet_"):
            return _a1111_unet_target(file_name[len("lora_unet_"):], self.layers_per_block)
        if file_name.startswith("oft_unet_"):
            return "diffusion_model_" + file_name[len("oft_unet_"):]
        return _a1111_te_target(file_name, self.family)

    def resolve(self, loader: str, file_name: str) -> str | None:
        """The internal layer name ``loader`` applies a file module to, or None when it drops it."""
        if loader == "a1111":
            target = self.a1111_target(file_name)
            return self.a1111.get(target) if target else None
        return self.comfyui.get(file_name)  # Forge uses ComfyUI's (older) key map


def key_maps(names: ModelNames, unet_config: Mapping | None) -> KeyMaps:
    """The layer names each loader knows on this model: A1111's LDM/OpenCLIP names; ComfyUI's key map
    (diffusers and LDM UNet names, ``lycoris_`` UNet names, ``lora_te*`` text-encoder names)."""
    layout = UNetLayout.from_config(unet_config) if unet_config is not None else None
    ldm = LDMNameMap(layout) if layout is not None else None
    a1111: dict[str, str] = {}
    comfy: dict[str, str] = {}
    for name in names.layers:
        comfy[name] = name
        if name.startswith("lora_unet_"):
            ldm_name = ldm.to_ldm(name) if ldm is not None else None
            if ldm_name is not None:
                comfy[ldm_name] = name
                a1111["diffusion_model_" + ldm_name[len("lora_unet_"):]] = name
            comfy["lycoris_" + name[len("lora_unet_"):]] = name
        else:
            target = _a1111_te_target(name, names.family)
            if target is not None:
                a1111[target] = name
    layers = max(layout.down_layers) if layout is not None else 2
    return KeyMaps(a1111, comfy, layers, names.family)


# ---- loader math (§3-4) -----------------------------------------------------------------------------
def _lora_scale(tensors: Mapping[str, torch.Tensor], rank: int | None) -> float:
    """alpha / r; a missing alpha gives 1 and alpha = 0 gives 0 in every WebUI (§1.3)."""
    if "alpha" not in tensors or rank is None:
        return 1.0
    return float(tensors["alpha"]) / rank


def _lora_delta(t: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    down, up = t["lora_down.weight"].float(), t["lora_up.weight"].float()
    r = down.shape[0]
    up2 = up.reshape(up.shape[0], r)
    if "lora_mid.weight" in t:
        delta = torch.einsum("oa,abyx,bi->oiyx", up2, t["lora_mid.weight"].float(), down.reshape(r, -1))
    else:
        delta = up2 @ down.reshape(r, -1)
    return delta.reshape(shape) * _lora_scale(t, r)


def _hada(a: torch.Tensor, b: torch.Tensor, core: torch.Tensor | None, shape: torch.Size) -> torch.Tensor:
    if core is None:
        return (a.float() @ b.float()).reshape(shape)
    return torch.einsum("ijyx,jq,ip->pqyx", core.float(), b.float(), a.float())


def _loha_delta(t: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    w1 = _hada(t["hada_w1_a"], t["hada_w1_b"], t.get("hada_t1"), shape)
    w2 = _hada(t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t2"), shape)
    return w1 * w2 * _lora_scale(t, t["hada_w1_b"].shape[0])


def _lokr_delta(t: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    w1 = t["lokr_w1"].float() if "lokr_w1" in t else t["lokr_w1_a"].float() @ t["lokr_w1_b"].float()
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].float()
    elif "lokr_t2" in t:
        w2 = torch.einsum("ijyx,jq,ip->pqyx", t["lokr_t2"].float(), t["lokr_w2_b"].float(), t["lokr_w2_a"].float())
    else:
        w2 = t["lokr_w2_a"].float() @ t["lokr_w2_b"].float()
        if len(shape) == 4:
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    scale = _lora_scale(t, module_rank("lokr", t)) if module_rank("lokr", t) is not None else 1.0
    return torch.kron(w1, w2.contiguous()).reshape(shape) * scale


def _cayley(blocks: torch.Tensor, bound: float) -> torch.Tensor:
    """R_k = (I + Q_k)(I - Q_k)^-1 with Q = B - B^T, norm-clamped to ``bound`` over all blocks when bound > 0."""
    q = blocks.float() - blocks.float().transpose(1, 2)
    norm = float(q.norm())
    if bound > 0 and norm > bound:
        q = q * (bound / norm)
    eye = torch.eye(q.shape[-1], dtype=q.dtype).expand_as(q)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _rotate(rotation: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W'_k = R_k^T W_k over output-channel blocks."""
    n, bs, _ = rotation.shape
    blocks = weight.float().reshape(n, bs, *weight.shape[1:])
    return torch.einsum("knm,kn...->km...", rotation, blocks).reshape(weight.shape)


def _oft_delta(loader: str, t: Mapping[str, torch.Tensor], weight: torch.Tensor, m: float) -> torch.Tensor:
    if "oft_diag" in t:  # old LyCORIS: the rotation itself (A1111 only)
        return m * (_rotate(t["oft_diag"].float(), weight) - weight.float())
    alpha = float(t["alpha"]) if "alpha" in t else 0.0
    out = weight.shape[0]
    if loader == "comfyui":  # bound alpha (not alpha*out), m^2, rescale ignored
        rotation = _cayley(t["oft_blocks"], alpha)
        return m * m * (_rotate(rotation, weight) - weight.float())
    rotation = _cayley(t["oft_blocks"], alpha * out)
    rotated = _rotate(rotation, weight)
    if "rescale" in t:
        rotated = rotated * t["rescale"].float().reshape(out, *[1] * (weight.dim() - 1))
    return m * (rotated - weight.float())


def loader_delta(loader: str, method: str, tensors: Mapping[str, torch.Tensor], weight: torch.Tensor,
                 multiplier: float) -> torch.Tensor:
    """The delta W ``loader`` adds to ``weight`` for one module at ``multiplier`` (fp32)."""
    if method in ("oft", "oft_diag"):
        return _oft_delta(loader, tensors, weight, multiplier)
    linear = {"lora": _lora_delta, "loha": _loha_delta, "lokr": _lokr_delta}[method]
    return multiplier * linear(tensors, weight.shape)


# ---- the report -------------------------------------------------------------------------------------
@dataclass
class LoaderReport:
    matched: int = 0
    unmatched: int = 0  # keys of the file the loader does not load
    rejected: bool = False
    max_rel_diff_m1: float = 0.0
    max_rel_diff_m05: float = 0.0
    detected_version: str = "n/a"
    version_matches: bool | None = None
    unmatched_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class CompatReport:
    file: str
    family: str
    methods: dict[str, int]
    modules: int
    loaders: dict[str, LoaderReport]
    lycotrain_unmatched: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        methods = ", ".join(f"{k} x{v}" for k, v in sorted(self.methods.items()))
        lines = [f"{self.file}: {self.modules} modules ({methods}) on a {self.family} model"]
        if 2 * len(self.lycotrain_unmatched) > self.modules:
            declared = self.loaders["a1111"].detected_version if "a1111" in self.loaders else "unknown"
            lines.append(f"  WARNING: {len(self.lycotrain_unmatched)} of {self.modules} modules match no layer of "
                         f"this {self.family} model: the file is for another model (its metadata reads as "
                         f"{declared}); check it against that model (--model)")
        elif self.lycotrain_unmatched:
            lines.append(f"  lycotrain itself cannot place {len(self.lycotrain_unmatched)} module(s), e.g. "
                         f"{self.lycotrain_unmatched[:3]}")
        for loader, r in self.loaders.items():
            if r.rejected:
                verdict = "REJECTS THE FILE"
            elif r.unmatched == 0 and r.max_rel_diff_m1 < 1e-3 and r.max_rel_diff_m05 < 1e-3:
                verdict = "OK, same effect as in training"
            elif r.unmatched == 0 and r.max_rel_diff_m1 < 1e-3:
                verdict = "OK at weight 1, differs at other weights"
            else:
                verdict = "DIFFERS"
            lines.append(f"  {loader:8s} {verdict}: {r.matched} modules matched, {r.unmatched} keys dropped, "
                         f"max rel. diff {r.max_rel_diff_m1:.2g} at 1, {r.max_rel_diff_m05:.2g} at 0.5; "
                         f"detects version {r.detected_version}"
                         + ("" if r.version_matches in (None, True) else " (card hidden for this model)"))
            lines += [f"           - {note}" for note in r.notes]
            if r.unmatched_keys:
                lines.append(f"           - dropped: {', '.join(r.unmatched_keys[:5])}"
                             + (" ..." if len(r.unmatched_keys) > 5 else ""))
        return "\n".join(lines)


def detect_version(metadata: Mapping[str, str]) -> str:
    """A1111/Forge ``detect_version`` (§5): SDXL, SD2, SD1 (any metadata) or Unknown (none)."""
    if metadata.get("ss_base_model_version", "").startswith("sdxl_"):
        return "sdxl"
    if metadata.get("ss_v2") == "True":
        return "sd2"
    return "sd1" if metadata else "unknown"


def _rel(diff: torch.Tensor, ref: torch.Tensor) -> float:
    """||diff|| / ||ref||; where lycotrain's own delta is zero, relative to the loader's (so 1 = all wrong)."""
    diff_norm = float(diff.norm())
    ref_norm = float(ref.norm()) or float((diff + ref).norm())
    return diff_norm / ref_norm if ref_norm > 0 else 0.0


def _incomplete_groups(loader_matches: dict[str, str]) -> set[str]:
    """A1111 fused attention (SD2 TE, SDXL TE2): modules whose q, k, v, out group is incomplete."""
    groups: dict[str, set[str]] = {}
    for file_name, target in loader_matches.items():
        for leaf in _FUSED:
            if target.endswith(leaf):
                groups.setdefault(target[: -len(leaf)], set()).add(leaf)
    broken = {g for g, leaves in groups.items() if len(leaves) < len(_FUSED)}
    return {f for f, t in loader_matches.items() if any(t.startswith(g) and t.endswith(_FUSED) for g in broken)}


def check_file(file: AdapterFile | str | Path, components: Mapping[str, nn.Module]) -> CompatReport:
    """Simulate A1111, Forge and ComfyUI loading ``file`` onto ``components`` (unet, text_encoder[, _2])."""
    if not isinstance(file, AdapterFile):
        file = read_adapter_file(file)
    names = model_names(components)
    unet = components.get("unet")
    maps = key_maps(names, unet.config if unet is not None else None)
    methods = {name: file.method_of(name) for name in file.modules}
    ours: dict[str, dict[float, torch.Tensor]] = {}
    lycotrain_unmatched = []
    with torch.no_grad():
        for file_name in file.modules:
            internal = names.from_file.get(file_name)
            if internal is None:
                lycotrain_unmatched.append(file_name)
                continue
            try:
                adapter = adapter_from_tensors(file, file_name, names.layers[internal])
            except LycotrainError:
                lycotrain_unmatched.append(file_name)
                continue
            ours[file_name] = {m: adapter.delta_weight(m) for m in MULTIPLIERS}
        reports = {loader: _simulate(loader, file, methods, names, maps, ours) for loader in LOADERS}
    return CompatReport(file.source, names.family, dict(sorted(_count(methods).items())), len(file.modules),
                        reports, sorted(lycotrain_unmatched))


def _count(methods: Mapping[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for method in methods.values():
        counts[method] = counts.get(method, 0) + 1
    return counts


def _simulate(loader: str, file: AdapterFile, methods: Mapping[str, str], names: ModelNames, maps: KeyMaps,
              ours: Mapping[str, Mapping[float, torch.Tensor]]) -> LoaderReport:
    report = LoaderReport()
    targets = {n: maps.resolve(loader, n) for n in file.modules}
    if loader == "a1111":
        broken = _incomplete_groups({n: maps.a1111_target(n) or "" for n, t in targets.items() if t is not None})
        for name in sorted(broken):
            targets[name] = None
        if broken:
            report.notes.append(f"{len(broken)} text-encoder attention module(s) lack q, k, v or out: A1111 "
                                "skips those layers")
        unknown = sorted(n for n, m in methods.items() if m not in SUPPORTED["a1111"])
        if unknown:
            report.rejected = True
            report.notes.append(f"module {unknown[0]} ({methods[unknown[0]]}) has no A1111 module type: "
                                "the whole network fails to load")
    dropped: list[str] = []
    for name, tensors in file.modules.items():
        method = methods[name]
        if targets[name] is None or method not in SUPPORTED[loader]:
            dropped += [f"{name}.{k}" for k in tensors]
            continue
        if method == "lokr" and "lokr_t2" in tensors and loader != "a1111":
            if loader == "forge":
                report.rejected = True
                report.notes.append(f"{name}: LoKr Tucker core (lokr_t2) raises in Forge; the patch aborts")
            else:
                report.notes.append(f"{name}: LoKr Tucker core (lokr_t2) fails in ComfyUI; layer left unpatched")
            dropped += [f"{name}.{k}" for k in tensors]
            continue
        report.matched += 1
    report.unmatched = len(dropped)
    report.unmatched_keys = dropped
    if loader == "forge" and report.unmatched > FORGE_UNMATCHED_LIMIT:
        report.rejected = True
        report.notes.append(f"{report.unmatched} unmatched keys (> {FORGE_UNMATCHED_LIMIT}): Forge rejects the "
                            "file as a 'LoRA version mismatch'")
    if loader != "comfyui":
        report.detected_version = detect_version(file.metadata)
        report.version_matches = report.detected_version == names.family
    dropped_modules = {k.partition(".")[0] for k in dropped}
    for m, attr in ((1.0, "max_rel_diff_m1"), (0.5, "max_rel_diff_m05")):
        worst = 0.0
        for name, deltas in ours.items():
            if report.rejected or name in dropped_modules:
                applied = torch.zeros_like(deltas[m])
            else:
                layer = names.layers[names.from_file[name]]
                applied = loader_delta(loader, methods[name], file.modules[name], layer.weight, m)
            worst = max(worst, _rel(applied - deltas[m], deltas[m]))
        setattr(report, attr, worst)
    return report


def compat_paths(path: str | Path) -> tuple[Path, Path]:
    """``NAME.safetensors`` -> (``NAME.compat.json``, ``NAME.compat.txt``)."""
    path = Path(path)
    stem = path.name.removesuffix(".safetensors")
    return path.with_name(f"{stem}.compat.json"), path.with_name(f"{stem}.compat.txt")


def write_compat_report(path: str | Path, components: Mapping[str, nn.Module]) -> CompatReport:
    """Check the file at ``path`` against ``components`` and write the report next to it (json + txt)."""
    report = check_file(path, components)
    json_path, text_path = compat_paths(path)
    atomic_write_text(json_path, report.to_json() + "\n")
    atomic_write_text(text_path, report.to_text() + "\n")
    return report

