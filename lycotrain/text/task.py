"""The text task: a causal LM with LoRA, AdaLoRA, Llama-Adapter or X-LoRA, trained by the shared loop.

The loop calls the methods of ``engine/task.py: Task``; everything method-specific happens here or in the
adapter set, so a user never wires a hook: AdaLoRA's regulariser is added in ``training_step`` and its rank
allocator runs in ``after_optimizer_step`` (with the total steps the loop derived from the data); X-LoRA's
two passes run inside its wrapper.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from lycotrain.engine.config import Config
from lycotrain.engine.events import EventWriter
from lycotrain.engine.memory import DTYPES
from lycotrain.errors import ConfigError
from lycotrain.text.adapter_set import (TextAdapterSet, attach_adalora, attach_llama_adapter, attach_lora,
                                        attach_xlora, load_adapter)
from lycotrain.text.dataset import load_text_dataset, make_dataloader
from lycotrain.text.generate import generate_text
from lycotrain.text.memory import estimate_for_run
from lycotrain.text.models import load_causal_lm

ADAPTER_FOLDER = "adapter"
MERGED_FOLDER = "merged"
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def build_adapters(model: Any, config: Config) -> TextAdapterSet:
    """The adapter set that ``config.network`` describes, attached to ``model``."""
    n = config.network
    if n.method == "lora":
        return attach_lora(model, target_modules=n.target_modules, rank=n.rank, alpha=n.alpha, dropout=n.dropout)
    if n.method == "adalora":
        return attach_adalora(model, target_modules=n.target_modules, init_r=n.init_r, target_r=n.target_r,
                              alpha=n.alpha, dropout=n.dropout, total_step=config.training.max_steps,
                              tinit=n.tinit, tfinal=n.tfinal, delta_t=n.delta_t, beta1=n.beta1, beta2=n.beta2,
                              orth_reg_weight=n.orth_reg_weight)
    if n.method == "llama_adapter":
        return attach_llama_adapter(model, adapter_len=n.adapter_len, adapter_layers=n.adapter_layers)
    if n.method == "xlora":
        return attach_xlora(model, experts=n.experts, layerwise=n.xlora_layerwise, temperature=n.xlora_temperature,
                            top_k=n.xlora_top_k, depth=n.xlora_depth, size=n.xlora_size,
                            classifier_dropout=n.xlora_dropout)
    raise ConfigError(f"network.method = {n.method!r} is not a text method")


def enable_gradient_checkpointing(model: Any, config: Config,
                                  checkpoint_kwargs: dict[str, Any] | None = None) -> None:
    """Checkpoint every decoder layer when ``training.gradient_checkpointing`` asks (the task and the memory
    estimate both call this; ``checkpoint_kwargs`` as transformers takes them, None: its non-reentrant default).

    transformers checkpoints a layer only while the layer is in training mode, and the frozen base model stays
    in eval mode (its own dropout off): so only the checkpointed layers' own flags are set, their attention and
    dropout modules keep eval mode."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if not config.training.gradient_checkpointing:
        return
    if config.network.method == "xlora":
        raise ConfigError("training.gradient_checkpointing does not work with X-LoRA (its scalings are not "
                          "recomputed); turn it off")
    model.activation_checkpointing_enable(checkpoint_kwargs)
    model.config.use_cache = False
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True


def training_loss(adapters: TextAdapterSet, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """One training forward with labels (X-LoRA: its two passes) plus the method's regulariser."""
    adapters.train(True)
    loss = adapters.runner(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           labels=batch["labels"]).loss
    extra = adapters.extra_loss()
    return loss if extra is None else loss + extra


class TextTask:
    """``engine.task.Task`` for causal language models."""

    def setup(self, config: Config, accelerator: Any, events: EventWriter) -> None:
        self.config, self.accelerator, self.events = config, accelerator, events
        self.run_dir = Path(config.run_dir)
        self.model, self.tokenizer = load_causal_lm(config.model.path)
        self.model.to(accelerator.device)
        enable_gradient_checkpointing(self.model, config)
        self.adapters = build_adapters(self.model, config)
        self.adapters.to(accelerator.device)
        d = config.dataset
        self.dataset, report = load_text_dataset(d.path, self.tokenizer, format=d.format, max_length=d.max_length,
                                                 train_on_prompt=d.train_on_prompt)
        memory, unavailable = None, "estimated on the main process only"
        if accelerator.is_main_process:  # the only process that reports it; the others would idle meanwhile
            memory, unavailable = estimate_for_run(config, report, weight_dtype=self.model.dtype,
                                                   autocast_dtype=self._autocast_dtype(), device=accelerator.device)
        events.emit("preflight", report={**report.to_dict(), **self.adapters.counts(),
                                         "memory": None if memory is None else memory.to_dict(),
                                         "memory_unavailable": unavailable})
        for message in report.warnings:
            events.emit("warning", message=message)
        if memory is not None and (too_big := memory.fit_warning()):
            events.emit("warning", message=too_big)

    def _autocast_dtype(self) -> torch.dtype | None:
        """What the loop's ``accelerator.autocast()`` computes in (accelerate has no autocast without native AMP)."""
        precision = self.config.training.mixed_precision
        return DTYPES[precision] if precision != "no" and self.accelerator.native_amp else None

    # ---- training ---------------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.adapters.trainable_parameters()}]

    def dataloader(self, epoch: int) -> torch.utils.data.DataLoader:
        return make_dataloader(self.dataset, self.config.training.batch_size, self.tokenizer.pad_token_id,
                               self.config.seed, epoch)

    def training_step(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        return training_loss(self.adapters, batch)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """AdaLoRA: importance, budget and masking (PEFT's update_and_allocate), with the loop's total."""
        allocator = self.adapters.allocator
        if allocator is None:
            return
        if allocator.total_step != total_steps:
            allocator.set_total_step(total_steps)
        budget = self.adapters.after_optimizer_step(step)
        if step == total_steps - allocator.tfinal:  # the pattern is fixed from here on: report it once
            self.events.emit("ranks", step=step, budget=budget, ranks=allocator.ranks())

    # ---- previews and files ----------------------------------------------------------------------------
    def preview(self, step: int, exported: dict[str, Path] | None = None) -> dict[str, Any]:
        """Greedy generations of the sample prompts (from the saved folder reloaded, for the final one)."""
        prompts = [p.prompt for p in self.config.sample.prompts if p.prompt]
        if not prompts:
            return {}
        if exported and "adapter" in exported:  # training is over: check the folder a user will load
            self.adapters.remove()
            self.adapters = load_adapter(self.model, exported["adapter"])
            self.adapters.to(self.accelerator.device)
        runner = self.adapters.runner
        texts = [{"prompt": p, "output": generate_text(runner, self.tokenizer, p, self.config.sample.max_new_tokens)}
                 for p in prompts]
        return {"texts": texts}

    def save_adapter(self, out_dir: Path, step: int) -> dict[str, Path]:
        """The adapter folder (PEFT format; X-LoRA with its experts) in ``out_dir/adapter``; at the end of a
        LoRA/AdaLoRA run with ``save.merged_model`` also the merged model in ``out_dir/merged``."""
        out_dir = Path(out_dir)
        outputs = {"adapter": self.adapters.save(out_dir / ADAPTER_FOLDER, SAVE_DTYPES[self.config.save.dtype])}
        is_export = out_dir.resolve() == self.run_dir.resolve()
        if is_export and self.config.save.merged_model and self.adapters.method in ("lora", "adalora"):
            outputs["merged"] = self.adapters.export_merged(out_dir / MERGED_FOLDER, self.tokenizer)
        return outputs

    # ---- resume -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        allocator = self.adapters.allocator
        return {"adapters": self.adapters.trainable_state_dict(),
                "allocator": allocator.state_dict() if allocator is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adapters.load_trainable_state_dict(state["adapters"])
        if state.get("allocator") is not None and self.adapters.allocator is not None:
            self.adapters.allocator.load_state_dict(state["allocator"])
