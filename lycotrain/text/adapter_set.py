"""Adapters on a causal LM: where they go, how they are attached, saved in the PEFT format and loaded back.

One :class:`TextAdapterSet` per model holds the adapter modules by module path (the path PEFT uses in its
keys) plus what the method needs around them: AdaLoRA's rank allocator and regulariser, X-LoRA's two-pass
wrapper. The training task only calls its methods (``trainable_parameters``, ``extra_loss``,
``after_optimizer_step``, ``save``), so every method trains through the same loop.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lycotrain.adapters.adalora import AdaLoRAAdapter, RankAllocator, orthogonal_regularizer
from lycotrain.adapters.llama_adapter import PEFT_MODEL_TYPES, AdaptedAttention, layout_for
from lycotrain.adapters.lora import LoRAAdapter
from lycotrain.adapters.xlora import LoRAExpert, ScalingState, XLoRAClassifier, XLoRALinear, XLoRAModel
from lycotrain.atomic import atomic_path
from lycotrain.errors import AdapterError, FormatError
from lycotrain.formats import peft as peft_format

# Target presets for ``network.target_modules``: a list of leaf names (PEFT semantics: a module is
# adapted when its path ends with ".<name>") or one of these words.
TARGET_PRESETS: dict[str, tuple[str, ...]] = {
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "attn.c_proj"),
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                   "c_attn", "c_proj", "c_fc"),
}
DEFAULT_TARGETS = ("q_proj", "v_proj")
XLORA_FOLDER = "experts"


# ---- targeting ---------------------------------------------------------------------------------------
def expand_targets(target_modules: list[str] | tuple[str, ...]) -> list[str]:
    names: list[str] = []
    for name in target_modules:
        names += TARGET_PRESETS.get(name, (name,))
    return names


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")  # transformers' GPT-2 layer


def find_targets(model: nn.Module, target_modules: list[str] | tuple[str, ...]) -> dict[str, nn.Module]:
    """Module path -> Linear (or GPT-2 Conv1D) whose path ends with one of the target names; lm_head never."""
    names = expand_targets(target_modules)
    found = {}
    for path, module in model.named_modules():
        if not isinstance(module, nn.Linear) and not _is_conv1d(module):
            continue
        if path == "lm_head" or path.endswith(".lm_head"):
            continue
        if any(path == n or path.endswith("." + n) for n in names):
            found[path] = module
    if not found:
        raise AdapterError(f"network.target_modules {list(target_modules)} matches no linear layer of this "
                           f"{type(model).__name__}; use leaf names such as q_proj, v_proj (GPT-2: c_attn) or "
                           f"one of {', '.join(TARGET_PRESETS)}")
    return found


def as_linear(module: nn.Module) -> nn.Linear:
    """A Linear for an adapter to wrap. GPT-2's Conv1D stores W^T; the Linear's weight is a transposed *view*
    of the same storage, so merging into it merges into the Conv1D."""
    if isinstance(module, nn.Linear):
        return module
    linear = nn.Linear(module.weight.shape[0], module.weight.shape[1], bias=module.bias is not None,
                       device="meta")
    linear.weight = nn.Parameter(module.weight.t(), requires_grad=False)
    if module.bias is not None:
        linear.bias = module.bias
    return linear


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


# ---- the set -----------------------------------------------------------------------------------------
@dataclass
class TextAdapterSet:
    """The adapters of one causal LM. ``settings`` are the method's hyperparameters (saved in the folder)."""

    method: str
    model: nn.Module
    modules: dict[str, nn.Module]
    originals: dict[str, nn.Module]
    settings: dict[str, Any]
    allocator: RankAllocator | None = None
    xlora: XLoRAModel | None = None
    expert_folders: list[Path] = field(default_factory=list)

    # ---- training -------------------------------------------------------------------------------
    @property
    def runner(self) -> nn.Module:
        """What to call for a forward pass (the X-LoRA wrapper runs its two passes; others: the model)."""
        return self.xlora if self.xlora is not None else self.model

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.xlora is not None:
            return list(self.xlora.classifier.parameters())
        params: list[nn.Parameter] = []
        for module in self.modules.values():
            if isinstance(module, AdaptedAttention):
                params += [module.adaption_prompt, module.adaption_gate]
            else:
                params += module.adapter_parameters()
        return params

    def train(self, mode: bool = True) -> None:
        """Adapters (and the X-LoRA classifier) in train mode; the frozen base model keeps its own mode."""
        for module in self.modules.values():
            module.train(mode)
        if self.xlora is not None:
            self.xlora.classifier.train(mode)

    def extra_loss(self) -> torch.Tensor | None:
        """AdaLoRA: orth_reg_weight * the orthogonality regulariser; other methods add nothing."""
        weight = self.settings.get("orth_reg_weight", 0.0)
        if self.method != "adalora" or weight <= 0:
            return None
        return weight * orthogonal_regularizer(list(self.modules.values()))  # type: ignore[arg-type]

    def after_optimizer_step(self, step: int) -> int | None:
        """Run AdaLoRA's allocator (needs the gradients: call before zero_grad). Returns the budget."""
        if self.allocator is None:
            return None
        return self.allocator.step(step)

    def rank_pattern(self) -> dict[str, list[bool]] | None:
        return None if self.allocator is None else self.allocator.rank_pattern

    def to(self, device: torch.device | str) -> None:
        for module in self.modules.values():
            module.to(device)
        if self.xlora is not None:
            self.xlora.classifier.to(device)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained tensors by name (for checkpoints; the frozen base and X-LoRA experts are not in it)."""
        if self.xlora is not None:
            return {k: v.detach().clone() for k, v in self.xlora.classifier.state_dict().items()}
        return {f"{path}.{name}": p.detach().clone() for path, module in self.modules.items()
                for name, p in module.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if self.xlora is not None:
            self.xlora.classifier.load_state_dict(state)
            return
        current = {f"{path}.{name}": p for path, module in self.modules.items()
                   for name, p in module.named_parameters() if p.requires_grad}
        if set(current) != set(state):
            raise FormatError("the checkpoint's adapter tensors do not match this run's adapters (was the network "
                              "config changed?)")
        with torch.no_grad():
            for name, param in current.items():
                param.copy_(state[name])

    def counts(self) -> dict[str, int]:
        return {"modules": len(self.modules), "trainable": sum(p.numel() for p in self.trainable_parameters())}

    # ---- saving ---------------------------------------------------------------------------------
    def save(self, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
        """Write the adapter folder: PEFT format for lora/adalora/llama_adapter, X-LoRA layout for xlora."""
        folder = Path(folder)
        config, tensors = self._peft_payload()
        peft_format.write_peft_folder(folder, config, tensors, dtype)
        if self.xlora is not None:
            self._copy_experts(folder)
        return folder

    def _base_name(self) -> str | None:
        return getattr(self.model, "name_or_path", None) or None

    def _peft_payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        s, base = self.settings, self._base_name()
        if self.method == "lora":
            tensors = {}
            for path, a in self.modules.items():
                tensors[peft_format.peft_key(path, "lora_A.weight")] = a.lora_down.weight
                tensors[peft_format.peft_key(path, "lora_B.weight")] = a.lora_up.weight
            return peft_format.lora_config(rank=s["rank"], alpha=s["alpha"], target_modules=s["targets"],
                                           dropout=s["dropout"], fan_in_fan_out=s["fan_in_fan_out"],
                                           base_model=base), tensors
        if self.method == "adalora":
            return self._adalora_payload(base)
        if self.method == "llama_adapter":
            tensors = {peft_format.peft_key(path, name): t for path, m in self.modules.items()
                       for name, t in m.adapter_state_dict().items()}
            return peft_format.adaption_prompt_config(adapter_len=s["adapter_len"], adapter_layers=s["adapter_layers"],
                                                      target_module=s["target_module"], base_model=base), tensors
        return self._xlora_payload()

    def _adalora_payload(self, base: str | None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        s, pattern = self.settings, self.rank_pattern()
        tensors = {}
        for path, a in self.modules.items():
            keep = torch.ones(a.rank, dtype=torch.bool) if pattern is None else torch.tensor(pattern[path])
            tensors[peft_format.peft_key(path, "lora_A")] = a.lora_A[keep]
            tensors[peft_format.peft_key(path, "lora_E")] = a.lora_E[keep]
            tensors[peft_format.peft_key(path, "lora_B")] = a.lora_B[:, keep]
        total = self.allocator.total_step if self.allocator is not None else s["total_step"]
        config = peft_format.adalora_config(
            init_r=s["init_r"], target_r=s["target_r"], alpha=s["alpha"], target_modules=s["targets"],
            total_step=total, tinit=s["tinit"], tfinal=s["tfinal"], delta_t=s["delta_t"], beta1=s["beta1"],
            beta2=s["beta2"], orth_reg_weight=s["orth_reg_weight"], rank_pattern=pattern, dropout=s["dropout"],
            fan_in_fan_out=s["fan_in_fan_out"], base_model=base)
        return config, tensors

    def _xlora_payload(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        s = self.settings
        classifier = self.xlora.classifier  # type: ignore[union-attr]
        tensors = {f"base_model.internal_xlora_classifier.{k}": v for k, v in classifier.state_dict().items()}
        config = {"peft_type": "XLORA", "task_type": "CAUSAL_LM", "hidden_size": s["hidden_size"],
                  "adapters": {str(i): f"{XLORA_FOLDER}/{i}" for i in range(len(self.expert_folders))},
                  "enable_softmax": True, "enable_softmax_topk": s["softmax_top_k"],
                  "softmax_temperature": s["temperature"], "layerwise_scalings": s["layerwise"],
                  "top_k_lora": s["top_k"] or None, "xlora_depth": s["depth"], "xlora_size": s["size"],
                  "xlora_dropout_p": s["classifier_dropout"], "use_trainable_adapters": False,
                  "scaling_pass_value": 0.0, "global_scaling_weight": s["global_scale"],
                  "peft_version": peft_format.PEFT_VERSION}
        return config, tensors

    def _copy_experts(self, folder: Path) -> None:
        for index, source in enumerate(self.expert_folders):
            target = folder / XLORA_FOLDER / str(index)
            if source.resolve() == target.resolve():
                continue
            target.mkdir(parents=True, exist_ok=True)
            for name in (peft_format.CONFIG_FILE, peft_format.WEIGHTS_FILE):
                with atomic_path(target / name) as tmp:
                    shutil.copyfile(source / name, tmp)

    # ---- export and removal ---------------------------------------------------------------------
    @torch.no_grad()
    def export_merged(self, folder: str | Path, tokenizer: Any = None) -> Path:
        """Save the base model with the adapter folded in (LoRA and AdaLoRA), as an ordinary model folder.

        Written to a temporary sibling and renamed into place; the adapters are unmerged afterwards."""
        if self.method not in ("lora", "adalora"):
            raise AdapterError(f"merged export is for lora and adalora, not {self.method}")
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for module in self.modules.values():
            module.merge()
        self._swap(self.originals)
        try:
            self.model.save_pretrained(tmp, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        finally:
            self._swap(self.modules)
            for module in self.modules.values():
                module.unmerge()
            shutil.rmtree(tmp, ignore_errors=True)
        return folder

    def _swap(self, modules: dict[str, nn.Module]) -> None:
        for path, module in modules.items():
            _replace(self.model, path, module)

    def remove(self) -> nn.Module:
        """Restore the original modules; the model is bit for bit what it was before ``attach``."""
        for module in self.modules.values():
            if isinstance(module, AdaptedAttention):
                module.remove()
        self._swap(self.originals)
        self.modules = {}
        return self.model


# ---- attaching ---------------------------------------------------------------------------------------
def _wrap_linears(model: nn.Module, targets: dict[str, nn.Module], make: Callable[[nn.Linear], nn.Module]
                  ) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    modules = {}
    for path, original in targets.items():
        modules[path] = make(as_linear(original))
        _replace(model, path, modules[path])
    return modules, dict(targets)


def _target_names(targets: dict[str, nn.Module]) -> list[str]:
    return sorted({path.rsplit(".", 1)[-1] for path in targets})


def _uses_conv1d(targets: dict[str, nn.Module]) -> bool:
    return any(_is_conv1d(m) for m in targets.values())


def attach_lora(model: nn.Module, *, target_modules: list[str] | tuple[str, ...] = DEFAULT_TARGETS, rank: int = 8,
                alpha: float = 16.0, dropout: float = 0.0) -> TextAdapterSet:
    """LoRA (``LoRAAdapter``: kaiming A, zero B, scale alpha / r, like PEFT) on the target linear layers.

    ``dropout`` is PEFT's ``lora_dropout``: it drops the layer input of the LoRA branch, not the rank activations
    (kohya's image-LoRA dropout), so a run means what the saved adapter_config.json says."""
    model.requires_grad_(False)
    targets = find_targets(model, target_modules)
    modules, originals = _wrap_linears(
        model, targets,
        lambda base: LoRAAdapter(base, rank=rank, alpha=alpha or rank, dropout=dropout, dropout_on="input"))
    settings = dict(rank=rank, alpha=float(alpha or rank), dropout=dropout, targets=_target_names(targets),
                    fan_in_fan_out=_uses_conv1d(targets))
    return TextAdapterSet("lora", model, modules, originals, settings)


def attach_adalora(model: nn.Module, *, target_modules: list[str] | tuple[str, ...] = DEFAULT_TARGETS,
                   init_r: int = 12, target_r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                   total_step: int = 0, tinit: int = 0, tfinal: int = 0, delta_t: int = 1, beta1: float = 0.85,
                   beta2: float = 0.85, orth_reg_weight: float = 0.5,
                   rank_pattern: dict[str, list[bool]] | None = None) -> TextAdapterSet:
    """AdaLoRA SVD adapters plus their rank allocator (``total_step`` comes from the data; see TextTask).

    With a ``rank_pattern`` (a loaded folder) each module is built at its kept rank, scale still alpha/init_r.
    """
    model.requires_grad_(False)
    targets = find_targets(model, target_modules)

    def make(base: nn.Linear, path: str) -> AdaLoRAAdapter:
        rank = init_r if rank_pattern is None else sum(rank_pattern.get(path, [True] * init_r))
        return AdaLoRAAdapter(base, rank=rank, alpha=alpha, init_r=init_r, dropout=dropout)

    modules = {}
    for path, original in targets.items():
        modules[path] = make(as_linear(original), path)
        _replace(model, path, modules[path])
    settings = dict(init_r=init_r, target_r=target_r, alpha=float(alpha), dropout=dropout, total_step=total_step,
                    tinit=tinit, tfinal=tfinal, delta_t=delta_t, beta1=beta1, beta2=beta2,
                    orth_reg_weight=orth_reg_weight, targets=_target_names(targets),
                    fan_in_fan_out=_uses_conv1d(targets))
    allocator = None
    if rank_pattern is None:
        allocator = RankAllocator(modules, target_r=target_r, total_step=total_step, tinit=tinit, tfinal=tfinal,
                                  delta_t=delta_t, beta1=beta1, beta2=beta2)
    return TextAdapterSet("adalora", model, modules, dict(targets), settings, allocator=allocator)


def attach_llama_adapter(model: nn.Module, *, adapter_len: int = 10, adapter_layers: int = 2) -> TextAdapterSet:
    """Adaption prompts in the top ``adapter_layers`` attention modules (PEFT: the last N with that name)."""
    model.requires_grad_(False)
    layout = layout_for(model.config.model_type)
    paths = [p for p, _ in model.named_modules() if p.rsplit(".", 1)[-1] == layout.module_name]
    if not 1 <= adapter_layers <= len(paths):
        raise AdapterError(f"network.adapter_layers = {adapter_layers}, but the model has {len(paths)} decoder "
                           f"layers; choose 1..{len(paths)}")
    modules, originals = {}, {}
    hidden = model.config.hidden_size
    for path in paths[-adapter_layers:]:
        originals[path] = model.get_submodule(path)
        modules[path] = AdaptedAttention(originals[path], layout, adapter_len, hidden)
        _replace(model, path, modules[path])
    settings = dict(adapter_len=adapter_len, adapter_layers=adapter_layers, target_module=layout.module_name,
                    peft_loadable=model.config.model_type in PEFT_MODEL_TYPES)
    return TextAdapterSet("llama_adapter", model, modules, originals, settings)


def resolve_adapter_folder(path: str | Path) -> Path:
    """A PEFT adapter folder, or a lycotrain run folder (its ``adapter/`` sub-folder)."""
    folder = Path(path)
    for candidate in (folder, folder / "adapter"):
        if (candidate / peft_format.CONFIG_FILE).is_file():
            return candidate
    raise FormatError(f"{path} is neither a PEFT adapter folder (adapter_config.json) nor a lycotrain run folder "
                      "(adapter/adapter_config.json)")


def read_lora_expert(folder: Path) -> dict[str, LoRAExpert]:
    """Module path -> (lora_A, lora_B, alpha / r, lora_dropout) of a PEFT LoRA folder: X-LoRA training drops each
    expert's input with its own ``lora_dropout``, as PEFT's X-LoRA does."""
    config, tensors = peft_format.read_peft_folder(folder)
    if config["peft_type"] != "LORA":
        raise FormatError(f"{folder}: X-LoRA experts must be LoRA adapters, this one is {config['peft_type']}")
    rank = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", 8))
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    dropout = _lora_dropout(config, folder)
    grouped = peft_format.group_by_module(tensors, peft_format.LORA_TENSORS, folder)
    return {path: LoRAExpert(t["lora_A.weight"].float(), t["lora_B.weight"].float(), scale, dropout)
            for path, t in grouped.items()}


def attach_xlora(model: nn.Module, *, experts: list[str | Path], layerwise: bool = False, temperature: float = 1.0,
                 top_k: int = 0, softmax_top_k: bool = False, depth: int = 1, size: int = 2048,
                 classifier_dropout: float = 0.2, global_scale: float = 1.0) -> TextAdapterSet:
    """Frozen LoRA experts mixed per token by a trainable classifier (see adapters/xlora.py)."""
    model.requires_grad_(False)
    folders = [resolve_adapter_folder(e) for e in experts]
    if len(folders) < 2:
        raise AdapterError(f"network.experts lists {len(folders)} folder(s); X-LoRA needs two or more")
    loaded = [read_lora_expert(f) for f in folders]
    wanted = set().union(*loaded)
    all_modules = dict(model.named_modules())
    missing = sorted(wanted - set(all_modules))
    if missing:
        raise FormatError(f"expert {folders[0]}...: modules {missing[:3]} are not in this model; were the experts "
                          "trained on this base model?")
    paths = [p for p in all_modules if p in wanted]  # model order, like PEFT's layer numbering
    state = ScalingState()
    modules, originals = {}, {}
    if top_k and not 1 <= top_k <= len(folders):
        raise AdapterError(f"network.xlora_top_k = {top_k}; choose 0 (all) or 1..{len(folders)}")
    for index, path in enumerate(paths):
        layer_experts = {e: loaded[e][path] for e in range(len(folders)) if path in loaded[e]}
        originals[path] = all_modules[path]
        modules[path] = XLoRALinear(as_linear(originals[path]), layer_experts, index, state, top_k=top_k,
                                    softmax_top_k=softmax_top_k, global_scale=global_scale)
        _replace(model, path, modules[path])
    hidden = model.config.hidden_size
    classifier = XLoRAClassifier(hidden, len(folders), len(paths), layerwise=layerwise, depth=depth, size=size,
                                 dropout=classifier_dropout, temperature=temperature)
    classifier.to(next(model.parameters()).device)
    settings = dict(hidden_size=hidden, layerwise=layerwise, temperature=temperature, top_k=top_k,
                    softmax_top_k=softmax_top_k, depth=depth, size=size, classifier_dropout=classifier_dropout,
                    global_scale=global_scale)
    return TextAdapterSet("xlora", model, modules, originals, settings, xlora=XLoRAModel(model, classifier, state),
                          expert_folders=folders)


# ---- loading a saved folder ----------------------------------------------------------------------------
def load_adapter(model: nn.Module, folder: str | Path) -> TextAdapterSet:
    """Attach the adapter saved in ``folder`` (ours or PEFT's) to ``model`` and load its tensors."""
    folder = Path(folder)
    config, tensors = peft_format.read_peft_folder(folder)
    peft_type = config["peft_type"]
    if peft_type not in peft_format.METHOD_OF_PEFT_TYPE:
        raise FormatError(f"{folder}: peft_type {peft_type!r} is not supported; supported: "
                          f"{', '.join(peft_format.METHOD_OF_PEFT_TYPE)}")
    if peft_type == "XLORA":
        return _load_xlora(model, folder, config, tensors)
    grouped = peft_format.group_by_module(tensors, peft_format.SUFFIXES[peft_type], folder)
    unknown = sorted(set(grouped) - {p for p, _ in model.named_modules()})
    if unknown:
        raise FormatError(f"{folder}: modules {unknown[:3]} are not in this {type(model).__name__}; was the adapter "
                          "trained on this base model?")
    targets = sorted({p.rsplit(".", 1)[-1] for p in grouped})
    if peft_type == "LORA":
        adapters = attach_lora(model, target_modules=targets, rank=int(config.get("r", 8)),
                               alpha=float(config.get("lora_alpha", 8)), dropout=_lora_dropout(config, folder))
        renames = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
    elif peft_type == "ADALORA":
        init_r = int(config.get("init_r", 12))
        pattern = peft_format.rank_pattern_from_config(config)
        adapters = attach_adalora(model, target_modules=targets, init_r=init_r, target_r=int(config.get("target_r", 8)),
                                  alpha=float(config.get("lora_alpha", 8)), total_step=int(config.get("total_step", 0)),
                                  dropout=_lora_dropout(config, folder), rank_pattern=pattern or {})
        renames = {n: n for n in peft_format.ADALORA_TENSORS}
    else:
        adapters = attach_llama_adapter(model, adapter_len=int(config["adapter_len"]),
                                        adapter_layers=int(config["adapter_layers"]))
        renames = {n: n for n in peft_format.ADAPTION_TENSORS}
    _load_module_tensors(adapters, grouped, renames, folder)
    return adapters


def _lora_dropout(config: dict[str, Any], folder: Path) -> float:
    """The folder's ``lora_dropout``, kept so that training on from a loaded folder (and saving it) keeps it."""
    return _dropout_field(config, "lora_dropout", 0.0, folder)


def _dropout_field(config: dict[str, Any], key: str, default: float, folder: Path) -> float:
    """A dropout probability from ``adapter_config.json``; a FormatError naming the folder and key if outside [0, 1)."""
    value = config.get(key)
    dropout = float(default if value is None else value)
    if not 0.0 <= dropout < 1.0:
        raise FormatError(f"{folder}: {key} = {dropout} in adapter_config.json; it must lie in [0, 1)")
    return dropout


def _load_module_tensors(adapters: TextAdapterSet, grouped: dict[str, dict[str, torch.Tensor]],
                         renames: dict[str, str], folder: Path) -> None:
    if set(grouped) != set(adapters.modules):
        extra = sorted(set(grouped) ^ set(adapters.modules))
        raise FormatError(f"{folder}: the saved modules do not match this model (first differences: {extra[:3]})")
    for path, parts in grouped.items():
        module = adapters.modules[path]
        state = {renames[k]: v for k, v in parts.items()}
        current = module.state_dict()
        for key, value in state.items():
            if current[key].shape != value.shape:
                raise FormatError(f"{folder}: {path}.{key} has shape {tuple(value.shape)}, the model expects "
                                  f"{tuple(current[key].shape)}; was it trained on this base model?")
        module.load_state_dict(state, strict=False)


def _load_xlora(model: nn.Module, folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]
                ) -> TextAdapterSet:
    adapters_field = config.get("adapters") or {}
    experts = [folder / adapters_field[k] for k in sorted(adapters_field, key=int)]
    adapters = attach_xlora(model, experts=experts, layerwise=bool(config.get("layerwise_scalings")),
                            temperature=float(config.get("softmax_temperature", 1.0)),
                            top_k=int(config.get("top_k_lora") or 0),
                            softmax_top_k=bool(config.get("enable_softmax_topk")),
                            depth=int(config.get("xlora_depth", 1)), size=int(config.get("xlora_size", 2048)),
                            classifier_dropout=_dropout_field(config, "xlora_dropout_p", 0.2, folder),
                            global_scale=float(config.get("global_scaling_weight", 1.0)))
    prefix = "base_model.internal_xlora_classifier."
    state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    classifier = adapters.xlora.classifier  # type: ignore[union-attr]
    missing, unexpected = classifier.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise FormatError(f"{folder}: classifier tensors do not match (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]})")
    return adapters
