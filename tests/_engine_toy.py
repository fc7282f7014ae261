"""A toy task for engine tests: a LoRA on a frozen linear layer learns a linear map from noisy data.

It draws noise from the global RNG in every step (so exact resume needs the RNG states), shuffles its data
per (seed, epoch), and counts the hook calls, so the engine's promises can be checked in milliseconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from lycotrain.adapters.lora import LoRAAdapter


class ToyTask:
    def __init__(self, nan_at_step: int | None = None, fail_at_step: int | None = None, items: int = 24) -> None:
        self.nan_at_step, self.fail_at_step, self.items = nan_at_step, fail_at_step, items
        self.after_steps: list[tuple[int, int]] = []
        self.previews: list[tuple[int, bool]] = []

    def setup(self, config, accelerator, events) -> None:
        self.config = config
        self.layer = LoRAAdapter(nn.Linear(8, 8), rank=4, alpha=4)
        nn.init.normal_(self.layer.lora_up.weight, std=0.1)
        data = torch.Generator().manual_seed(123)
        inputs = torch.randn(self.items, 8, generator=data)
        targets = inputs @ torch.randn(8, 8, generator=data) * 0.5
        self.dataset = TensorDataset(inputs, targets)
        events.emit("preflight", report={"items": self.items})

    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": self.layer.adapter_parameters()}]

    def dataloader(self, epoch: int) -> DataLoader:
        order = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        sampler = BatchSampler(RandomSampler(self.dataset, generator=order), self.config.training.batch_size,
                               drop_last=False)
        return DataLoader(self.dataset, batch_sampler=sampler)

    def training_step(self, batch, step: int) -> torch.Tensor:
        if step == self.fail_at_step:
            raise RuntimeError("boom")
        inputs, targets = batch
        noisy = inputs + 0.01 * torch.randn_like(inputs)  # global RNG on purpose
        loss = (self.layer(noisy) - targets).pow(2).mean()
        if step == self.nan_at_step:
            loss = loss * float("nan")
        return loss

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        self.after_steps.append((step, total_steps))

    def preview(self, step: int, exported: dict[str, Path] | None = None) -> dict[str, Any]:
        self.previews.append((step, exported is not None))
        return {"texts": [{"prompt": "p", "output": str(step)}]}

    def save_adapter(self, out_dir: Path, step: int) -> dict[str, Path]:
        path = Path(out_dir) / "toy.safetensors"
        save_file({k: v.contiguous() for k, v in self.layer.adapter_state_dict().items()}, str(path))
        return {"adapter": path}

    def state_dict(self) -> dict[str, Any]:
        return {"adapter": self.layer.adapter_state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.layer.load_state_dict(state["adapter"], strict=False)

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.layer.adapter_state_dict().items()}
