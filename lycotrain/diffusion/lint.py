"""The pre-flight report: what the dataset holds, what is wrong with it, the exact step arithmetic, and an
estimate of the GPU memory the run needs (``memory.py``).

Shown by ``lycotrain lint``, emitted as the ``preflight`` event at the start of every image run, and shown by
the GUI before Start. It is data (``LintReport.to_dict()``, JSON-ready) plus a readable ``format()``.
Nothing here is fatal: defects are listed with the file and the fix; a dataset with no usable image at all
already failed with a DatasetError when it was scanned.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from lycotrain.diffusion.buckets import Size, bucket_grid, fits_grid
from lycotrain.diffusion.captions import with_trigger
from lycotrain.diffusion.dataset import ImageDataset, ImageRecord
from lycotrain.diffusion import memory as memory_estimate
from lycotrain.diffusion.memory import ModelSpec
from lycotrain.engine import memory as engine_memory
from lycotrain.engine.memory import DTYPES, MemoryEstimate

if TYPE_CHECKING:
    from lycotrain.engine.config import Config


@dataclass
class FolderStats:
    path: str
    repeats: int
    images: int  # readable images (usable or not)
    samples: int  # usable images x repeats: how often the folder is seen per epoch
    missing_captions: int
    regularization: bool
    loss_weight: float


@dataclass
class BucketStats:
    width: int
    height: int
    images: int
    samples: int  # images x their repeats
    batches: int  # ceil(samples / batch_size)


@dataclass
class StepPlan:
    """``batches_per_epoch`` is one process's share (the loop pads the epoch's batches by wrapping around to a
    multiple of the process count); an epoch ends with an optimizer step even if its last accumulation group
    is short, hence the ceil in ``steps_per_epoch``."""

    batch_size: int
    grad_accum: int
    num_processes: int
    batches_per_epoch: int  # per process
    steps_per_epoch: int  # optimizer steps
    epochs: int  # epochs the run covers (ceil when max_steps decides)
    total_steps: int
    arithmetic: list[str] = field(default_factory=list)


@dataclass
class LintReport:
    source: str
    resolution: int
    bucket_step: int
    no_upscale: bool
    folders: list[FolderStats]
    buckets: list[BucketStats]
    steps: StepPlan
    missing_captions: list[dict[str, str]]  # image, used_instead
    empty_captions: list[dict[str, str]]  # image, used_instead
    orphan_captions: list[dict[str, str]]  # caption, reason
    unreadable: list[dict[str, str]]  # image, reason (skipped)
    below_smallest_bucket: list[dict[str, Any]]  # image, size, action
    starved_buckets: list[dict[str, Any]]  # bucket, images, batch_size
    duplicates: list[list[str]]  # groups of images with identical pixels
    notes: list[str]  # how the folder was read (unused folders, a repeat folder given directly)
    memory: MemoryEstimate | None = None  # added by add_memory_estimate
    memory_unavailable: str = ""  # why there is no memory estimate

    @property
    def problem_count(self) -> int:
        return sum(len(items) for items in (self.missing_captions, self.empty_captions, self.orphan_captions,
                                            self.unreadable, self.below_smallest_bucket, self.starved_buckets,
                                            self.duplicates))

    def to_dict(self) -> dict[str, Any]:
        memory = None if self.memory is None else self.memory.to_dict()
        return {**asdict(self), "memory": memory, "problem_count": self.problem_count}

    def format(self) -> str:
        return "\n".join(_format_lines(self))


def lint_dataset(dataset: ImageDataset, *, batch_size: int = 1, grad_accum: int = 1, epochs: int = 1,
                 max_steps: int = 0, num_processes: int = 1) -> LintReport:
    """The report for a scanned dataset and the training settings that decide the step count."""
    spec, scan = dataset.spec, dataset.scan
    used = [r for r in scan.records if r.placement is not None]
    buckets = _bucket_stats(dataset, used, batch_size)
    return LintReport(
        source=str(spec.source), resolution=spec.buckets.resolution, bucket_step=spec.buckets.step,
        no_upscale=spec.buckets.no_upscale,
        folders=_folder_stats(dataset),
        buckets=buckets,
        steps=plan_steps(buckets, batch_size=batch_size, grad_accum=grad_accum, epochs=epochs,
                         max_steps=max_steps, num_processes=num_processes),
        missing_captions=_caption_findings(dataset, "missing"),
        empty_captions=_caption_findings(dataset, "empty"),
        orphan_captions=[{"caption": str(p), "reason": why} for p, why in scan.orphan_captions],
        unreadable=[{"image": str(p), "reason": why} for p, why in scan.unreadable],
        below_smallest_bucket=_small_images(dataset),
        starved_buckets=[{"bucket": f"{b.width}x{b.height}", "images": b.images, "batch_size": batch_size}
                         for b in buckets if b.images < batch_size],
        duplicates=_duplicates(scan.records),
        notes=list(spec.notes))


def lint_config(config: "Config") -> tuple[ImageDataset, LintReport]:
    """Scan ``config.dataset`` and report with ``config.training``'s batch size, accumulation and length; with
    ``config.model.path`` also the memory estimate, for a CUDA GPU (the visible one's size when there is one)."""
    from lycotrain.diffusion.cache import default_cache_dir

    dataset = ImageDataset.from_config(config.dataset, seed=config.seed, scan_cache=default_cache_dir() / "scan")
    t = config.training
    report = lint_dataset(dataset, batch_size=t.batch_size, grad_accum=t.grad_accum, epochs=t.epochs,
                          max_steps=t.max_steps)
    if config.model.path:
        add_memory_estimate(report, config,
                            lambda: memory_estimate.spec_from_path(config.model.path, config.model.family),
                            weight_dtype=DTYPES[t.mixed_precision])
    else:
        report.memory_unavailable = "no model.path given (lint --model PATH, or a --config that names the model)"
    return dataset, report


def add_memory_estimate(report: LintReport, config: "Config", spec: Callable[[], ModelSpec], *,
                        weight_dtype: torch.dtype, device: torch.device | None = None) -> None:
    """Put the memory estimate for the report's largest batch (see ``largest_batch``) into ``report``.

    ``device`` is the training device (the task knows it); None means a CUDA GPU, as lint assumes. The estimate
    is advice: whatever stops it (a model the meta device cannot run, a file whose architecture cannot be read)
    is recorded in ``memory_unavailable`` and never stops a run or a lint.
    """
    width, height, batch_size = largest_batch(report)
    device_type = "cuda" if device is None else device.type
    try:
        estimate = memory_estimate.estimate_memory(spec(), config, batch_size=batch_size, width=width,
                                                   height=height, weight_dtype=weight_dtype, device_type=device_type)
        estimate.gpu = engine_memory.visible_gpu(device)
    except Exception as exc:  # noqa: BLE001 - see the docstring: an estimate must never cost the user a run
        report.memory_unavailable = f"{type(exc).__name__}: {exc}"
        return
    report.memory = estimate


def largest_batch(report: LintReport) -> tuple[int, int, int]:
    """(width, height, images) of the batch with the most pixels: a bucket's batches hold at most its samples."""
    batch_size = report.steps.batch_size
    if not report.buckets:
        return report.resolution, report.resolution, batch_size
    pixels = lambda b: min(batch_size, b.samples) * b.width * b.height  # noqa: E731
    bucket = max(report.buckets, key=pixels)
    return bucket.width, bucket.height, min(batch_size, bucket.samples)


def plan_steps(buckets: list[BucketStats], *, batch_size: int, grad_accum: int, epochs: int, max_steps: int,
               num_processes: int = 1) -> StepPlan:
    """Steps per epoch and in total, with each line of the arithmetic spelled out."""
    lines = [f"bucket {b.width}x{b.height}: {b.samples} samples / batch {batch_size} = {b.batches} batches "
             f"(rounded up)" for b in buckets]
    batches = sum(b.batches for b in buckets)
    lines.append(f"batches per epoch = {' + '.join(str(b.batches) for b in buckets) or 0} = {batches}")
    if num_processes > 1:
        per_process = math.ceil(batches / num_processes)
        lines.append(f"per process = ceil({batches} / {num_processes} processes) = {per_process}")
        batches = per_process
    steps_per_epoch = math.ceil(batches / grad_accum)
    if grad_accum > 1:
        lines.append(f"optimizer steps per epoch = ceil({batches} / grad_accum {grad_accum}) = {steps_per_epoch}")
    else:
        lines.append(f"optimizer steps per epoch = {steps_per_epoch}")
    if max_steps:
        epochs = math.ceil(max_steps / steps_per_epoch) if steps_per_epoch else 0
        total = max_steps
        lines.append(f"total = max_steps = {max_steps} (= {max_steps / max(steps_per_epoch, 1):.2f} epochs, "
                     f"so {epochs} epoch(s) are started)")
    else:
        total = steps_per_epoch * epochs
        lines.append(f"total = {steps_per_epoch} steps x {epochs} epochs = {total} steps")
    return StepPlan(batch_size=batch_size, grad_accum=grad_accum, num_processes=num_processes,
                    batches_per_epoch=batches, steps_per_epoch=steps_per_epoch, epochs=epochs, total_steps=total,
                    arithmetic=lines)


# ---- the parts --------------------------------------------------------------------------------------------
def _folder_stats(dataset: ImageDataset) -> list[FolderStats]:
    stats = []
    for index, subset in enumerate(dataset.spec.subsets):
        records = [r for r in dataset.scan.records if r.subset == index]
        usable = sum(1 for r in records if r.placement is not None)
        stats.append(FolderStats(
            path=str(subset.path), repeats=subset.repeats, images=len(records), samples=usable * subset.repeats,
            missing_captions=sum(1 for r in records if r.caption_status != "ok"),
            regularization=subset.is_regularization, loss_weight=subset.loss_weight))
    return stats


def _bucket_stats(dataset: ImageDataset, used: list[ImageRecord], batch_size: int) -> list[BucketStats]:
    images: Counter[Size] = Counter()
    samples: Counter[Size] = Counter()
    for record in used:
        bucket = record.placement.bucket  # type: ignore[union-attr]
        images[bucket] += 1
        samples[bucket] += dataset.subset_of(record).repeats
    return [BucketStats(width=b[0], height=b[1], images=images[b], samples=samples[b],
                        batches=math.ceil(samples[b] / batch_size)) for b in sorted(images)]


def _caption_findings(dataset: ImageDataset, status: str) -> list[dict[str, str]]:
    findings = []
    for record in dataset.scan.records:
        if record.caption_status == status:
            subset = dataset.subset_of(record)
            findings.append({"image": str(record.path),
                             "used_instead": with_trigger(record.caption, subset.captions.trigger_word)})
    return findings


def _small_images(dataset: ImageDataset) -> list[dict[str, Any]]:
    grid = bucket_grid(dataset.spec.buckets)
    findings = []
    for record in dataset.scan.records:
        if fits_grid(record.width, record.height, grid):
            continue
        placement = record.placement
        if placement is None:
            action = f"skipped: narrower than one bucket step ({dataset.spec.buckets.step} px)"
        elif not placement.on_grid:
            action = f"trained in its own {placement.bucket[0]}x{placement.bucket[1]} bucket (no_upscale)"
        else:
            action = (f"upscaled x{placement.scale:.2f} to fill the {placement.bucket[0]}x{placement.bucket[1]} "
                      "bucket (blurry; set no_upscale or use a larger image)")
        findings.append({"image": str(record.path), "size": f"{record.width}x{record.height}", "action": action})
    return findings


def _duplicates(records: list[ImageRecord]) -> list[list[str]]:
    groups: defaultdict[str, list[str]] = defaultdict(list)
    for record in records:
        groups[record.pixel_hash].append(str(record.path))
    return [paths for paths in groups.values() if len(paths) > 1]


# ---- text -------------------------------------------------------------------------------------------------
def _format_lines(report: LintReport) -> list[str]:
    lines = [f"Pre-flight report: {report.source}", "", "Folders:"]
    for f in report.folders:
        kind = f", regularization (loss weight {f.loss_weight:g})" if f.regularization else ""
        lines.append(f"  {f.path}: {f.images} images x {f.repeats} repeats = {f.samples} samples{kind}"
                     + (f", {f.missing_captions} without caption" if f.missing_captions else ""))
    lines += ["", f"Buckets (resolution {report.resolution}, step {report.bucket_step}"
                  f"{', no upscale' if report.no_upscale else ''}):"]
    lines += [f"  {b.width}x{b.height}: {b.images} images, {b.samples} samples, {b.batches} batches"
              for b in report.buckets]
    lines += ["", "Steps:"] + [f"  {line}" for line in report.steps.arithmetic]
    if report.memory is not None:
        lines += [""] + report.memory.format_lines()
    elif report.memory_unavailable:
        lines += ["", f"Memory estimate: not available ({report.memory_unavailable})"]
    sections = [
        ("Missing captions", [_trained_as(x) for x in report.missing_captions]),
        ("Empty captions", [_trained_as(x) for x in report.empty_captions]),
        ("Caption files no image reads", [f"{x['caption']}: {x['reason']}" for x in report.orphan_captions]),
        ("Unreadable images (skipped)", [f"{x['image']}: {x['reason']}" for x in report.unreadable]),
        ("Images below the smallest bucket", [f"{x['image']} ({x['size']}): {x['action']}"
                                              for x in report.below_smallest_bucket]),
        ("Buckets with fewer images than the batch size",
         [f"{x['bucket']}: {x['images']} image(s) < batch size {x['batch_size']} (its batches are smaller)"
          for x in report.starved_buckets]),
        ("Duplicate images", [" = ".join(group) for group in report.duplicates]),
        ("Notes", report.notes),
    ]
    for title, items in sections:
        if items:
            lines += ["", f"{title} ({len(items)}):"] + [f"  {item}" for item in items]
    lines += ["", f"{report.problem_count} problem(s) found." if report.problem_count else "No problems found."]
    return lines


def _trained_as(finding: dict[str, str]) -> str:
    if finding["used_instead"]:
        return f"{finding['image']} -> trained as \"{finding['used_instead']}\""
    return (f"{finding['image']} -> trained with an empty caption (add a caption file, set dataset.trigger_word, "
            "or class_token in a dataset TOML)")
