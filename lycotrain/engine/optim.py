"""Optimizers and learning-rate schedules built from ``[training]``.

Optional optimizers (AdamW 8-bit from bitsandbytes, Prodigy from prodigyopt) are imported only when chosen;
a missing package gives a ConfigError that says how to install it or what to choose instead, never an import
crash at start-up.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import torch

from lycotrain.engine.config import TrainingConfig
from lycotrain.errors import ConfigError

# name -> (module, class, pip package) for optimizers that live outside torch/transformers
_OPTIONAL = {
    "adamw8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
}


def _optional_class(name: str) -> type:
    module, cls, package = _OPTIONAL[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except Exception as exc:  # ImportError, or a broken GPU library raising at import time
        raise ConfigError(
            f"training.optimizer = {name!r} needs the {package} package, which is not usable here "
            f"({type(exc).__name__}: {exc}); install it with `pip install {package}` or choose "
            f"training.optimizer = \"adamw\"") from None


def build_optimizer(training: TrainingConfig, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer over the task's parameter groups; each group may carry its own ``lr``."""
    groups = [{**group, "lr": group.get("lr", training.lr)} for group in param_groups]
    if not any(p.requires_grad for group in groups for p in group["params"]):
        raise ConfigError("nothing to train: the adapter has no trainable parameters (check network.preset, "
                          "network.include and network.exclude)")
    name, decay = training.optimizer, training.weight_decay
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=training.lr, weight_decay=decay)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        # a fixed, external learning rate (the scheduler drives it), as kohya does for adapters
        return Adafactor(groups, lr=training.lr, weight_decay=decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    return _optional_class(name)(groups, lr=training.lr, weight_decay=decay)


def build_scheduler(training: TrainingConfig, optimizer: torch.optim.Optimizer,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A diffusers schedule over ``total_steps`` optimizer steps, with linear warmup."""
    from diffusers.optimization import get_scheduler

    name = training.scheduler
    if name == "constant" and training.warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=training.warmup_steps,
                         num_training_steps=max(total_steps, 1), num_cycles=training.scheduler_cycles,
                         power=training.scheduler_power)


def fast_forward(scheduler: torch.optim.lr_scheduler.LambdaLR, steps: int) -> None:
    """Advance a fresh schedule by ``steps`` (used when a run is extended: the new plan, at the old position)."""
    with warnings.catch_warnings():  # torch warns that no optimizer step came first; here that is the point
        warnings.filterwarnings("ignore", message="Detected call of")
        for _ in range(steps):
            scheduler.step()
