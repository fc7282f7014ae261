"""The image dataset: where the images are (folders, kohya ``N_name`` repeat folders, a dataset TOML), what
each one is captioned with, which bucket it trains in, and the batches the training loop draws.

Nothing is dropped silently. Unreadable images, caption files that match no image, images without a caption
(and the text used instead), folders that are not used and images too small to train are all kept in the
scan result, which the pre-flight report (``lint.py``) shows before every run.

Engine use::

    dataset = ImageDataset.from_config(config.dataset, seed=config.seed)
    batches = dataset.sampler(batch_size).epoch_batches(epoch)   # a pure function of (seed, epoch)
    loader = DataLoader(dataset, batch_sampler=batches[done:], collate_fn=collate)   # see ``collate``

Exact resume needs only (epoch, batches done): the batch order and every sample's flip, crop and caption
draw come from the seed, never from the global RNG.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from lycotrain.diffusion.buckets import BucketBatchSampler, BucketOptions, Placement, SampleRef, bucket_grid, \
    place_image
from lycotrain.diffusion.captions import CaptionOptions, fixed_texts, process_caption, read_caption
from lycotrain.diffusion.images import ImageInfo, InfoCache, UnreadableImage, inspect_image, is_image_file, load_rgb
from lycotrain.errors import DatasetError

if TYPE_CHECKING:
    from lycotrain.engine.config import DatasetConfig

REPEAT_FOLDER = re.compile(r"^(\d+)_(.+)$")
CAPTION_EXTENSIONS = (".txt", ".caption")
CROPS = ("center", "random")


# ---- what the dataset is made of ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Subset:
    """One image folder and how to use it."""

    path: Path
    repeats: int = 1
    caption_extension: str = ".txt"
    captions: CaptionOptions = CaptionOptions()
    class_token: str = ""  # caption text of an image without a caption file (reported, never silent)
    is_regularization: bool = False
    loss_weight: float = 1.0  # the prior-loss weight of regularization images


@dataclass(frozen=True)
class DatasetSpec:
    source: Path  # the folder or dataset TOML the user named
    subsets: tuple[Subset, ...]
    buckets: BucketOptions = BucketOptions()
    flip: bool = False
    crop: str = "center"
    notes: tuple[str, ...] = ()  # how the folder was read, for the report (ignored folders, ambiguities)

    @classmethod
    def from_config(cls, config: "DatasetConfig") -> "DatasetSpec":
        """Read ``config.path`` (a folder or a dataset TOML) with the options of the ``[dataset]`` table."""
        template = Subset(
            path=Path(config.path), repeats=config.repeats, caption_extension=_dotted(config.caption_extension),
            captions=CaptionOptions(shuffle=config.shuffle_caption, keep_tokens=config.keep_tokens,
                                    caption_dropout=config.caption_dropout, tag_dropout=config.tag_dropout,
                                    trigger_word=config.trigger_word))
        buckets = BucketOptions(resolution=config.resolution, enabled=config.buckets,
                                min_resolution=config.min_bucket_resolution,
                                max_resolution=config.max_bucket_resolution, step=config.bucket_step,
                                no_upscale=config.no_upscale)
        return resolve_dataset(config.path, template, buckets=buckets, flip=config.flip, crop=config.crop)


def resolve_dataset(path: str | Path, template: Subset | None = None, *, buckets: BucketOptions = BucketOptions(),
                    flip: bool = False, crop: str = "center") -> DatasetSpec:
    """The subsets behind ``path``: a dataset TOML, a folder of images, or a folder of ``N_name`` folders.

    ``template`` carries the defaults (repeats of a plain folder, caption options) that subsets inherit.
    """
    if crop not in CROPS:
        raise DatasetError(f"dataset.crop = {crop!r} is not allowed; choose one of {', '.join(CROPS)}")
    source = Path(path)
    template = template or Subset(path=source)
    if not str(path):
        raise DatasetError("dataset.path is empty; set it to an image folder or a dataset TOML")
    if not source.exists():
        raise DatasetError(f"dataset.path {source} does not exist")
    if source.is_file():
        if source.suffix.lower() != ".toml":
            raise DatasetError(f"dataset.path {source} is a file; give an image folder or a dataset .toml")
        subsets, notes = _subsets_from_toml(source, template)
    else:
        subsets, notes = _subsets_from_folder(source, template)
    return DatasetSpec(source=source, subsets=tuple(subsets), buckets=buckets, flip=flip, crop=crop,
                       notes=tuple(notes))


def _dotted(extension: str) -> str:
    return extension if extension.startswith(".") else f".{extension}"


def _image_count(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if is_image_file(p))


def _subsets_from_folder(folder: Path, template: Subset) -> tuple[list[Subset], list[str]]:
    subsets: list[Subset] = []
    notes: list[str] = []
    if _image_count(folder):
        subsets.append(replace(template, path=folder))
        match = REPEAT_FOLDER.match(folder.name)
        if match:
            notes.append(f"{folder.name} looks like a repeat folder, but repeats come from N_name sub-folders of "
                         f"dataset.path: its images are used {template.repeats} time(s) per epoch. To repeat them "
                         f"{int(match.group(1))} times, set dataset.path to {folder.parent}.")
    others: list[Path] = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        match = REPEAT_FOLDER.match(sub.name)
        if match and int(match.group(1)) > 0:
            subsets.append(replace(template, path=sub, repeats=int(match.group(1))))
        elif match:
            notes.append(f"{sub} is not used: its repeat count is 0 (rename it to 1_{match.group(2)} to use it)")
        else:
            others.append(sub)
    if not subsets:
        raise DatasetError(_no_images_message(folder, others))
    for sub in others:
        notes.append(f"{sub} is not used: only N_name sub-folders (e.g. 10_{sub.name}) are read")
    return subsets, notes


def _no_images_message(folder: Path, subfolders: list[Path]) -> str:
    message = (f"No images found in {folder}; expected images (.png, .jpg, .webp, ...) or N_name sub-folders "
               f"(e.g. {folder / '10_mystyle'}, whose images repeat 10 times per epoch).")
    hints = []
    for sub in subfolders:
        if _image_count(sub):
            hints.append(f"'{sub.name}' holds images: rename it to 1_{sub.name} (or N_{sub.name} to repeat N times)"
                         f", or set dataset.path to {sub}")
        elif any(p.is_dir() and REPEAT_FOLDER.match(p.name) for p in sub.iterdir()):
            hints.append(f"'{sub.name}' holds N_name folders: set dataset.path to {sub}")
    return message + ("" if not hints else " Found: " + "; ".join(hints) + ".")


_TOML_KEYS = {"path", "repeats", "caption_extension", "shuffle_caption", "keep_tokens", "caption_dropout",
              "tag_dropout", "trigger_word", "class_token", "is_regularization", "prior_loss_weight"}


def _subsets_from_toml(path: Path, template: Subset) -> tuple[list[Subset], list[str]]:
    """``[[subsets]]`` tables; relative paths are relative to the TOML file. Unset keys take the template's."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DatasetError(f"{path} is not valid TOML: {exc}") from None
    unknown = set(data) - {"subsets"}
    if unknown or not isinstance(data.get("subsets"), list) or not data["subsets"]:
        raise DatasetError(f"{path}: a dataset TOML holds only [[subsets]] tables (at least one, each with a "
                           f"path){'; unknown keys: ' + ', '.join(sorted(unknown)) if unknown else ''}")
    subsets, notes = [], []
    for index, table in enumerate(data["subsets"]):
        subset = _subset_from_table(table, f"{path}: subsets[{index}]", path.parent, template)
        if not _image_count(subset.path):
            hint = ""
            try:
                _subsets_from_folder(subset.path, template)
                hint = " (it holds N_name folders: list each one as a subset with its repeats)"
            except DatasetError:
                pass
            raise DatasetError(f"{path}: subsets[{index}].path {subset.path} holds no images{hint}")
        subsets.append(subset)
    return subsets, notes


def _subset_from_table(table: Any, where: str, base: Path, template: Subset) -> Subset:
    if not isinstance(table, dict) or "path" not in table:
        raise DatasetError(f"{where} must be a table with a path, e.g. path = \"images/10_style\"")
    unknown = set(table) - _TOML_KEYS
    if unknown:
        raise DatasetError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: "
                           f"{', '.join(sorted(_TOML_KEYS))}")
    value = _TomlReader(table, where)
    folder = Path(value.get("path", str, "")).expanduser()
    folder = folder if folder.is_absolute() else base / folder
    if not folder.is_dir():
        raise DatasetError(f"{where}.path {folder} is not a folder")
    regularization = value.get("is_regularization", bool, False)
    if "prior_loss_weight" in table and not regularization:
        raise DatasetError(f"{where}: prior_loss_weight applies to regularization subsets only; set "
                           "is_regularization = true or remove it")
    c = template.captions
    captions = CaptionOptions(
        shuffle=value.get("shuffle_caption", bool, c.shuffle),
        keep_tokens=value.get("keep_tokens", int, c.keep_tokens, lo=0),
        caption_dropout=value.get("caption_dropout", float, c.caption_dropout, lo=0.0, hi=1.0),
        tag_dropout=value.get("tag_dropout", float, c.tag_dropout, lo=0.0, hi=1.0),
        trigger_word=value.get("trigger_word", str, c.trigger_word))
    return Subset(path=folder, repeats=value.get("repeats", int, 1, lo=1),
                  caption_extension=_dotted(value.get("caption_extension", str, template.caption_extension)),
                  captions=captions, class_token=value.get("class_token", str, template.class_token),
                  is_regularization=regularization,
                  loss_weight=value.get("prior_loss_weight", float, 1.0, lo=0.0))


@dataclass
class _TomlReader:
    table: dict[str, Any]
    where: str

    def get(self, key: str, kind: type, default: Any, lo: float | None = None, hi: float | None = None) -> Any:
        value = self.table.get(key, default)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise DatasetError(f"{self.where}.{key} must be {kind.__name__}, got {value!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise DatasetError(f"{self.where}.{key} = {value!r} is out of range; allowed: "
                               f"{'>= ' + str(lo) if hi is None else f'[{lo}, {hi}]'}")
        return value


# ---- scanning ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageRecord:
    path: Path
    subset: int  # index into DatasetSpec.subsets
    width: int  # upright size (after EXIF rotation)
    height: int
    pixel_hash: str
    caption: str  # raw caption text, or the subset's class_token when the caption is missing or empty
    caption_status: str  # "ok" | "missing" | "empty"
    placement: Placement | None  # None: too small to train (narrower than one bucket step)


@dataclass
class ScanResult:
    records: list[ImageRecord] = field(default_factory=list)  # every readable image, usable or not
    unreadable: list[tuple[Path, str]] = field(default_factory=list)  # (image, reason)
    orphan_captions: list[tuple[Path, str]] = field(default_factory=list)  # (caption file, reason)


def scan_dataset(spec: DatasetSpec, workers: int | None = None, scan_cache: Path | None = None) -> ScanResult:
    """Decode every image (in threads), read its caption, place it in a bucket.

    ``scan_cache``: a folder where the sizes and pixel hashes of decoded images are remembered (keyed by path,
    size and modification time), so scanning an unchanged dataset again decodes nothing.
    """
    result = ScanResult()
    grid = bucket_grid(spec.buckets)
    jobs = [(index, path) for index, subset in enumerate(spec.subsets)
            for path in sorted(p for p in subset.path.iterdir() if is_image_file(p))]
    known = None
    if scan_cache is not None:
        name = hashlib.sha256(str(spec.source.resolve()).encode()).hexdigest()[:16]
        known = InfoCache(Path(scan_cache) / f"{name}.json")
    infos: list[ImageInfo | str | None] = [known.get(path) if known else None for _, path in jobs]
    todo = [i for i, info in enumerate(infos) if info is None]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for i, info in zip(todo, pool.map(_inspect_or_reason, [jobs[i][1] for i in todo])):
            infos[i] = info
            if known is not None and isinstance(info, ImageInfo):
                known.put(jobs[i][1], info)
    if known is not None:
        known.save()
    for (index, path), info in zip(jobs, infos):
        if not isinstance(info, ImageInfo):
            result.unreadable.append((path, str(info)))
            continue
        subset = spec.subsets[index]
        caption, status = _caption_of(path, subset)
        result.records.append(ImageRecord(
            path=path, subset=index, width=info.width, height=info.height, pixel_hash=info.pixel_hash,
            caption=caption, caption_status=status,
            placement=place_image(info.width, info.height, grid, spec.buckets)))
    for subset in spec.subsets:
        result.orphan_captions += _orphan_captions(subset)
    return result


def _inspect_or_reason(path: Path) -> ImageInfo | str:
    try:
        return inspect_image(path)
    except UnreadableImage as exc:
        return str(exc)


def _caption_of(image: Path, subset: Subset) -> tuple[str, str]:
    caption_file = image.with_suffix(subset.caption_extension)
    if not caption_file.is_file():
        return subset.class_token, "missing"
    text = read_caption(caption_file)
    return (text, "ok") if text else (subset.class_token, "empty")


def _orphan_captions(subset: Subset) -> list[tuple[Path, str]]:
    """Caption-like files no image will read: a wrong extension, or no image of that name."""
    stems = {p.stem for p in subset.path.iterdir() if is_image_file(p)}
    extensions = set(CAPTION_EXTENSIONS) | {subset.caption_extension}
    orphans = []
    for path in sorted(p for p in subset.path.iterdir() if p.is_file() and p.suffix.lower() in extensions):
        if path.suffix == subset.caption_extension and path.stem in stems:
            continue
        if path.stem in stems:
            orphans.append((path, f"extension mismatch: captions are read from '{subset.caption_extension}' "
                                  f"files, so {path.name} is ignored; rename it to {path.stem}"
                                  f"{subset.caption_extension} or set caption_extension = '{path.suffix}'"))
        else:
            orphans.append((path, f"no image named {path.stem}.* in {subset.path}"))
    return orphans


# ---- the dataset --------------------------------------------------------------------------------------------
class ImageDataset(Dataset):
    """Usable images of a scanned dataset; items are addressed by ``SampleRef`` (index + augmentation seed).

    ``records`` are the images that train; ``scan`` keeps everything found, for the pre-flight report.
    """

    def __init__(self, spec: DatasetSpec, seed: int = 0, scan: ScanResult | None = None,
                 scan_cache: Path | None = None) -> None:
        self.spec, self.seed = spec, seed
        self.scan = scan if scan is not None else scan_dataset(spec, scan_cache=scan_cache)
        self.records = [r for r in self.scan.records if r.placement is not None]
        if not self.records:
            raise DatasetError(self._nothing_usable_message())
        self.latent_cache: Any = None  # set by use_latent_cache
        self.text_cache: Any = None  # set by use_text_cache

    @classmethod
    def from_config(cls, config: "DatasetConfig", seed: int = 0, scan_cache: Path | None = None) -> "ImageDataset":
        """``scan_cache``: see ``scan_dataset`` (runs pass ``cache.default_cache_dir() / "scan"``)."""
        return cls(DatasetSpec.from_config(config), seed=seed, scan_cache=scan_cache)

    def _nothing_usable_message(self) -> str:
        folders = ", ".join(str(s.path) for s in self.spec.subsets)
        if self.scan.unreadable:
            listed = "; ".join(f"{p.name}: {why}" for p, why in self.scan.unreadable[:5])
            return f"No usable images in {folders}: {len(self.scan.unreadable)} could not be read ({listed})"
        if self.scan.records:
            return (f"No usable images in {folders}: every image is smaller than dataset.bucket_step "
                    f"({self.spec.buckets.step} px) on one side")
        return f"No images found in {folders}"

    # ---- per-sample ---------------------------------------------------------------------------------------
    def subset_of(self, record: ImageRecord) -> Subset:
        return self.spec.subsets[record.subset]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, ref: SampleRef) -> dict[str, Any]:
        record = self.records[ref.item]
        placement = record.placement
        assert placement is not None
        subset = self.subset_of(record)
        rng = random.Random(ref.aug_seed)  # draw order is fixed: flip, crop, caption
        flip = self.spec.flip and rng.random() < 0.5
        crop = placement.random_crop(rng) if self.spec.crop == "random" else placement.center_crop()
        caption = process_caption(record.caption, subset.captions, rng)
        left = placement.resized[0] - crop[0] - placement.bucket[0] if flip else crop[0]
        sample: dict[str, Any] = {
            "caption": caption, "path": str(record.path), "loss_weight": subset.loss_weight,
            "original_size": (record.height, record.width), "crop_top_left": (crop[1], left),
            "target_size": (placement.bucket[1], placement.bucket[0])}
        if self.latent_cache is not None:
            sample["latents"] = self.latent_cache.load(self.latent_key(record, crop, flip))
        else:
            sample["pixel_values"] = self.pixels(record, crop, flip)
        if self.text_cache is not None:
            sample["text_embeds"] = self.text_cache.load(caption)
        return sample

    def pixels(self, record: ImageRecord, crop: tuple[int, int], flip: bool) -> torch.Tensor:
        """The (3, H, W) tensor in [-1, 1] the VAE encodes: resized, cropped, optionally mirrored."""
        placement = record.placement
        assert placement is not None
        image = load_rgb(record.path)
        if image.size != placement.resized:
            image = image.resize(placement.resized, Image.Resampling.LANCZOS)
        left, top = crop
        image = image.crop((left, top, left + placement.bucket[0], top + placement.bucket[1]))
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    # ---- caches -------------------------------------------------------------------------------------------
    def latent_variants(self) -> list[tuple[ImageRecord, tuple[int, int], bool]]:
        """Every (image, crop, flip) a cached run can draw: the centred crop, mirrored too when flip is on."""
        if self.spec.crop == "random":
            raise DatasetError("dataset.crop = 'random' gives a new crop every epoch, which a latent cache "
                               "cannot hold; set dataset.crop = 'center' or dataset.cache_latents = false")
        flips = (False, True) if self.spec.flip else (False,)
        return [(r, r.placement.center_crop(), f) for r in self.records if r.placement for f in flips]

    @staticmethod
    def latent_key(record: ImageRecord, crop: tuple[int, int], flip: bool) -> str:
        """What the latents of a sample depend on, apart from the VAE (the cache adds its identity)."""
        placement = record.placement
        assert placement is not None
        return f"{record.pixel_hash}:{placement.resized}:{placement.bucket}:{crop}:{int(flip)}"

    def use_latent_cache(self, cache: Any) -> None:
        """Read latents from ``cache`` (filled beforehand) instead of decoding images."""
        self.latent_cache = cache

    def caption_texts(self) -> list[str]:
        """Every caption text the training can draw, for the text-encoder cache (fixed captions only)."""
        texts: set[str] = set()
        for record in self.records:
            options = self.subset_of(record).captions
            if options.randomised:
                raise DatasetError(f"the captions of {self.subset_of(record).path} are shuffled or tag-dropped, "
                                   "so text-encoder outputs cannot be cached; set dataset.cache_text_encoder = false "
                                   "or turn off shuffle_caption and tag_dropout")
            texts.update(fixed_texts(record.caption, options))
        return sorted(texts)

    def use_text_cache(self, cache: Any) -> None:
        """Add ``text_embeds`` (from ``cache.load(caption)``) to every sample."""
        self.text_cache = cache

    # ---- batches ------------------------------------------------------------------------------------------
    def sampler(self, batch_size: int) -> BucketBatchSampler:
        """Per-bucket batches of ``SampleRef``; ``epoch_batches(epoch)`` depends only on (seed, epoch)."""
        return BucketBatchSampler([r.placement.bucket for r in self.records],  # type: ignore[union-attr]
                                  [self.subset_of(r).repeats for r in self.records],
                                  batch_size=batch_size, seed=self.seed)


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch format the diffusion task consumes (all samples of a batch share one bucket):

    * ``latents`` (B, 4, H/8, W/8) unscaled VAE means, when a latent cache is in use; else
      ``pixel_values`` (B, 3, H, W) in [-1, 1]
    * ``captions`` list[str] (trigger word, shuffle and dropouts applied)
    * ``original_size``, ``crop_top_left``, ``target_size``: (B, 2) long tensors, (height, width) /
      (top, left) in pixels, what SDXL's ``add_time_ids`` needs
    * ``loss_weights`` (B,) float: 1, or the prior-loss weight for regularization images
    * ``paths`` list[str]; ``text_embeds`` dict of (B, ...) tensors when a text-encoder cache is in use
    """
    batch: dict[str, Any] = {
        "captions": [s["caption"] for s in samples],
        "paths": [s["path"] for s in samples],
        "loss_weights": torch.tensor([s["loss_weight"] for s in samples], dtype=torch.float32),
    }
    for key in ("original_size", "crop_top_left", "target_size"):
        batch[key] = torch.tensor([s[key] for s in samples], dtype=torch.long)
    for key in ("latents", "pixel_values"):
        if key in samples[0]:
            batch[key] = torch.stack([s[key] for s in samples])
    if "text_embeds" in samples[0]:
        batch["text_embeds"] = {name: torch.stack([s["text_embeds"][name] for s in samples])
                                for name in samples[0]["text_embeds"]}
    return batch
