"""Whole image-pipeline training step: lycotrain's loop + DiffusionTask vs the bare adapter step.

    python benchmarks/train_step.py [--quick] [--methods lora loha ...] [--json PATH]

For each model, method and latent-cache setting, a real ``lycotrain.engine.loop.train`` run at 256 px,
batch 1 (latents 4 x 32 x 32), UNet adapters on kohya's attn-mlp targets with the settings of
``benchmarks/adapters.py`` (``OURS``), text-encoder outputs cached. The step time is the CPU time
(``time.process_time``) between two ``step`` events: data loading, VAE encode (without the latent cache),
text conditioning, noise, loss, backward, gradient clipping, AdamW, scheduler and the event write.
The bare step is ``benchmarks/adapters.py``'s ``run_case`` (forward + backward + AdamW on the same UNet with
random inputs). ``overhead = pipeline step with the latent cache / bare step``; target <= 1.10.

Models: the tiny SD1 pipeline of the tests, and an SD1.5-size pipeline (the published SD1.5 UNet, VAE and
CLIP-L configs, random weights, built in memory). ``--quick`` runs the tiny model only. Compare ratios, never
absolute times (CPU, one thread). Results: a markdown table in ``benchmarks/results/`` and optional JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import adapters as bare  # noqa: E402  (benchmarks/adapters.py)

RESULTS = Path(__file__).resolve().parent / "results"
RESOLUTION = 256
WARMUP, STEPS = 2, 5


def tiny_pipeline(root: Path) -> Any:
    from lycotrain.diffusion.models import build_tiny_pipeline, load_pipeline

    return load_pipeline(build_tiny_pipeline(root / "tiny", arch="sd1")).pipeline


def sd15_pipeline(root: Path) -> Any:
    """SD1.5's published component configs with random weights (no download), the tiny CLIP tokenizer."""
    from importlib import resources

    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = resources.files("lycotrain") / "data" / "configs" / "sd1"

    def read(component: str, name: str = "config.json") -> dict[str, Any]:
        return json.loads((configs / component / name).read_text())

    torch.manual_seed(0)
    tokenizer = tiny_pipeline(root).tokenizer
    return StableDiffusionPipeline(
        vae=AutoencoderKL.from_config(read("vae")), text_encoder=CLIPTextModel(CLIPTextConfig(**read("text_encoder"))),
        tokenizer=tokenizer, unet=UNet2DConditionModel.from_config(read("unet")),
        scheduler=DDPMScheduler.from_config(read("scheduler", "scheduler_config.json")), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)


def dataset(root: Path, count: int = 4) -> Path:
    from PIL import Image, ImageDraw

    folder = root / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        image = Image.new("RGB", (RESOLUTION, RESOLUTION), (40 * index, 120, 200))
        ImageDraw.Draw(image).ellipse((60, 60, 200, 200), fill=(220, 40 + 50 * index, 40))
        image.save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"shape {index}, circle")
    return folder


def pipeline_step_ms(pipeline: Any, data: Path, root: Path, method: str, cache_latents: bool) -> float:
    """Median CPU ms per optimizer step of a real run (after WARMUP steps)."""
    import lycotrain.diffusion.models as models
    from lycotrain.diffusion.task import DiffusionTask
    from lycotrain.engine.config import Config
    from lycotrain.engine.loop import train

    models.load_pipeline = lambda path, **_: models.LoadedModel(pipeline, "sd1", str(path))  # in-memory model
    params = bare.OURS[method]
    config = Config.from_dict({
        "run_dir": str(root / f"run-{method}-{int(cache_latents)}-{time.time_ns()}"),
        "model": {"path": "in-memory"},
        "dataset": {"path": str(data), "resolution": RESOLUTION, "min_bucket_resolution": RESOLUTION,
                    "max_bucket_resolution": RESOLUTION, "cache_latents": cache_latents},
        "network": {"method": method, "preset": "attn-mlp", "alpha": 0.0, **params},
        "training": {"max_steps": WARMUP + STEPS, "batch_size": 1, "lr": 1e-4},
        "sample": {"at_end": False},
    })
    marks: list[float] = []
    task = DiffusionTask()
    result = train(config, task=task,
                   listener=lambda e: marks.append(time.process_time()) if e["type"] == "step" else None)
    if result["status"] != "finished":
        raise RuntimeError(result["message"])
    task.adapters.remove()  # the same pipeline serves the next case
    times = [b - a for a, b in zip(marks[WARMUP - 1:], marks[WARMUP:])]
    return statistics.median(times) * 1e3


def bare_step_ms(pipeline: Any, method: str, name: str) -> float:
    import copy

    spec = bare.ModelSpec(name, {}, batch=1, latent=RESOLUTION // 8, context=pipeline.unet.config.cross_attention_dim,
                          warmup=WARMUP, steps=STEPS)
    unet = copy.deepcopy(pipeline.unet).requires_grad_(False).train()
    return bare.run_case(unet, spec, method, "lycotrain")["step_ms"]


def markdown(records: list[dict[str, Any]], command: str) -> str:
    lines = [f"# Image training step: whole pipeline vs bare adapter step\n\n`{command}` — CPU, one thread, fp32, "
             f"{RESOLUTION} px, batch 1, median CPU time of {STEPS} steps after {WARMUP}.\n",
             "| model | method | bare step ms | pipeline ms (latent cache) | pipeline ms (no cache) | "
             "overhead (cache) | target |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['method']} | {r['bare_ms']:.1f} | {r['cached_ms']:.1f} | "
                     f"{r['uncached_ms']:.1f} | {r['overhead']:.3f} | <= 1.10 |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model only")
    parser.add_argument("--methods", nargs="*", default=list(bare.OURS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="lycotrain-bench-"))
    os.environ["LYCOTRAIN_HOME"] = str(root / "home")
    data = dataset(root)
    builders = {"tiny-sd1": tiny_pipeline} if args.quick else {"tiny-sd1": tiny_pipeline, "sd15-size": sd15_pipeline}
    records = []
    for model_name, build in builders.items():
        pipeline = build(root)
        for method in args.methods:
            record = {"model": model_name, "method": method,
                      "bare_ms": bare_step_ms(pipeline, method, model_name),
                      "cached_ms": pipeline_step_ms(pipeline, data, root, method, cache_latents=True),
                      "uncached_ms": pipeline_step_ms(pipeline, data, root, method, cache_latents=False)}
            record["overhead"] = record["cached_ms"] / record["bare_ms"]
            print(json.dumps(record), flush=True)
            records.append(record)
    command = "python benchmarks/train_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"train-step{'-quick' if args.quick else ''}.md"
    out.write_text(markdown(records, command.strip()))
    print(f"wrote {out}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
