"""How much GPU memory a text run needs, estimated before it starts (in the ``preflight`` event's report).

The method is the image runs' (``engine/memory.py``): the causal LM is built from its config.json on the meta
device, the configured adapters are attached by the task's own ``build_adapters``, gradient checkpointing is
enabled by the task's own ``enable_gradient_checkpointing``, and one training forward with labels
(``training_loss``, the task's step) runs under the saved-tensor meter, with autocast emulated. X-LoRA runs
its two passes as in training; the first, under ``no_grad``, saves nothing.

The batch is the longest one a run can meet: ``batch_size`` rows of the longest tokenized example (at most
``dataset.max_length``), with padding in it when there are two or more rows. A padded batch is the heavier
case: transformers then hands SDPA a boolean mask, which SDPA turns into an additive mask in the query's dtype
at every layer (saved for backward), and GQA models repeat their keys and values per layer instead of using
the kernels' native grouping.

Counted besides the engine's items: the model's frozen weights (in the dtype the task loads them, with X-LoRA's
frozen experts), AdaLoRA's importance averages, and the two fp32 gradients of the logits that backward holds
when it starts (batch x length x vocabulary each, often the largest tensors of an LLM step; modelled, not
metered).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from lycotrain.engine.memory import (DTYPE_NAMES, MemoryEstimate, MemoryItem, MetaTrainingMode, SavedTensorMeter,
                                     tensor_bytes, training_state_items, visible_gpu)

if TYPE_CHECKING:
    from lycotrain.engine.config import Config
    from lycotrain.text.dataset import DatasetReport


@dataclass(kw_only=True)
class TextMemoryEstimate(MemoryEstimate):
    """The estimate for one batch of ``batch_size`` examples of ``length`` tokens."""

    length: int
    method: str

    def batch_text(self) -> str:
        return f"batch {self.batch_size} x {self.length} tokens"

    def size_saving(self) -> str:
        return f"lower dataset.max_length (longest batch: {self.length} tokens)"

    def checkpointing_saving(self) -> str | None:
        return None if self.method == "xlora" else super().checkpointing_saving()  # X-LoRA refuses it


def largest_batch(config: "Config", report: "DatasetReport | None" = None) -> tuple[int, int]:
    """(rows, tokens) of the largest batch: ``training.batch_size`` rows (fewer if the data has fewer examples)
    of ``dataset.max_length`` tokens (the longest tokenized example when it is shorter)."""
    batch_size, length = config.training.batch_size, config.dataset.max_length
    if report is not None:
        batch_size, length = min(batch_size, report.examples), min(length, report.longest)
    return batch_size, length


def estimate_text_memory(config: "Config", *, batch_size: int, length: int, autocast_dtype: torch.dtype | None,
                         weight_dtype: torch.dtype = torch.float32, device_type: str = "cuda") -> TextMemoryEstimate:
    """The estimate for ``config``'s model, network and training settings for one batch of ``batch_size`` x
    ``length`` tokens, the model held in ``weight_dtype`` and run under autocast to ``autocast_dtype`` (None:
    no autocast). ``device_type`` chooses the autocast lists and whether the CUDA runtime is counted."""
    from lycotrain.text.task import build_adapters, enable_gradient_checkpointing

    started = time.perf_counter()
    model = _build_meta_model(config.model.path, weight_dtype)
    adapters = build_adapters(model, config)
    adapters.to("meta")  # X-LoRA's experts are read from their files onto the CPU; the task moves them too
    trainable = adapters.trainable_parameters()
    frozen = [p for p in model.parameters() if not p.requires_grad] + list(model.buffers())
    meter = SavedTensorMeter(exclude=[*frozen, *trainable])
    enable_gradient_checkpointing(model, config, {"use_reentrant": False, "context_fn": meter.checkpoint_contexts})
    with meter, MetaTrainingMode(autocast_dtype, device_type):
        _meta_training_loss(model, adapters, batch_size, length)
    t = config.training
    items = [MemoryItem("model weights", tensor_bytes(frozen), DTYPE_NAMES[weight_dtype])]
    items += training_state_items(trainable, t.optimizer, meter, batch_text=f"batch {batch_size} x {length} tokens",
                                  gradient_checkpointing=t.gradient_checkpointing, device_type=device_type)
    if adapters.allocator is not None:
        items.append(MemoryItem("AdaLoRA importance", 2 * tensor_bytes(trainable),
                                "averages of importance and uncertainty, one of each per adapter value"))
    vocab = model.get_output_embeddings().out_features
    items.append(MemoryItem("logits gradients", 2 * 4 * batch_size * length * vocab,
                            f"transient: the loss's log-softmax backward holds its fp32 gradient in and out, "
                            f"{batch_size} x {length} x {vocab:,} vocabulary each"))
    return TextMemoryEstimate(
        items=items, batch_size=batch_size, length=length, method=adapters.method,
        precision=DTYPE_NAMES[autocast_dtype or weight_dtype], device_type=device_type,
        gradient_checkpointing=t.gradient_checkpointing, optimizer=t.optimizer,
        seconds=round(time.perf_counter() - started, 3),
        not_included=["backward's other transient gradients (one layer's activations at a time)",
                      "previews (generation with a key/value cache)", "allocator fragmentation (keep 10-20% headroom)"])


def estimate_for_run(config: "Config", report: "DatasetReport", *, weight_dtype: torch.dtype,
                     autocast_dtype: torch.dtype | None, device: torch.device) -> tuple[TextMemoryEstimate | None, str]:
    """The task's estimate for its device and data, with the visible GPU; or None and why not. It is advice:
    whatever stops it never stops the run."""
    batch_size, length = largest_batch(config, report)
    try:
        estimate = estimate_text_memory(config, batch_size=batch_size, length=length, autocast_dtype=autocast_dtype,
                                        weight_dtype=weight_dtype, device_type=device.type)
        estimate.gpu = visible_gpu(device)
    except Exception as exc:  # noqa: BLE001 - see the docstring: an estimate must never cost the user a run
        return None, f"{type(exc).__name__}: {exc}"
    return estimate, ""


def _build_meta_model(path: str, dtype: torch.dtype) -> Any:
    """The architecture of ``model.path`` from its config.json, on the meta device, frozen and in eval mode as
    ``load_causal_lm`` leaves the real one."""
    from transformers import AutoModelForCausalLM

    from lycotrain.text.models import read_model_config

    _, model_config = read_model_config(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    return model


def _meta_training_loss(model: Any, adapters: Any, batch_size: int, length: int) -> torch.Tensor:
    """The task's training step on a meta batch. transformers reads the values of the attention mask (or, with
    none and no cache, of the positions) to decide whether to build a 4-d mask, which meta tensors cannot give.
    Two or more rows carry padding: its 4-d boolean mask is given directly. One row has none and transformers
    passes no mask: it gets none, and the model keeps ``use_cache`` on so that transformers does not search the
    positions for packed sequences (the cache stays empty on meta, checkpointed layers drop it, nothing saved
    changes). X-LoRA turns the cache off in its passes: its one-row batch is estimated with a mask, a little
    above the real need."""
    from lycotrain.text.task import training_loss

    meta = torch.device("meta")
    ids = torch.zeros(batch_size, length, dtype=torch.long, device=meta)
    mask = None
    if batch_size > 1 or adapters.xlora is not None:
        mask = torch.ones(batch_size, 1, length, length, dtype=torch.bool, device=meta)
    else:
        model.config.use_cache = True
    return training_loss(adapters, {"input_ids": ids, "attention_mask": mask, "labels": ids})
