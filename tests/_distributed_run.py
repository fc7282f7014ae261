"""Run by ``accelerate launch`` in test_engine_distributed.py: train a config, then save this rank's adapters."""

import sys
from pathlib import Path

import torch

from lycotrain.diffusion.task import DiffusionTask
from lycotrain.engine.config import load_config
from lycotrain.engine.loop import train

torch.set_num_threads(1)
task = DiffusionTask()
result = train(load_config(sys.argv[1]), task=task)
rank = task.accelerator.process_index
torch.save({"status": result["status"], "world": task.accelerator.num_processes,
            "adapters": task.adapters.state_dict()}, Path(sys.argv[2]) / f"rank{rank}.pt")
