"""Every preset in presets/ validates; each image method has an SD1.5 and an SDXL preset; each image preset
trains a step on the tiny model of its family with only paths and sizes overridden."""

from pathlib import Path

import pytest

from _image_runs import build_assets
from lycotrain.engine.config import IMAGE_METHODS, load_config
from lycotrain.engine.loop import train

PRESETS = sorted((Path(__file__).parent.parent / "presets").glob("*.toml"))
IMAGE_PRESETS = [p for p in PRESETS if p.name.startswith(("sd15-", "sdxl-"))]


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_validates(path):
    config = load_config(path)
    assert config.to_dict() == load_config(path).to_dict()


def test_every_image_method_has_sd15_and_sdxl_presets():
    for method in IMAGE_METHODS:
        for family in ("sd15", "sdxl"):
            found = [p for p in IMAGE_PRESETS if p.name.startswith(f"{family}-{method}-")]
            assert found, f"no {family} preset for {method}"
            assert all(load_config(p).network.method == method for p in found)
    kinds = {p.stem.rsplit("-", 1)[1] for p in IMAGE_PRESETS}
    assert kinds == {"style", "subject"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from lycotrain.diffusion.models import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    sd1, data = build_assets(root)
    return {"sd15": sd1, "sdxl": build_tiny_pipeline(root / "sdxl", arch="sdxl"), "data": data}


@pytest.mark.parametrize("path", IMAGE_PRESETS, ids=lambda p: p.stem)
def test_image_preset_trains_on_the_tiny_model(tmp_path, isolated_home, tiny, path):
    family = path.name.split("-")[0]
    config = load_config(path, [f"model.path={tiny[family]}", f"dataset.path={tiny['data']}",
                                f"run_dir={tmp_path / 'run'}", "dataset.resolution=32",
                                "dataset.min_bucket_resolution=32", "dataset.max_bucket_resolution=64",
                                "dataset.bucket_step=8", "training.max_steps=2", "training.warmup_steps=0",
                                "training.mixed_precision=no", "sample.at_start=false", "sample.at_end=false"])
    result = train(config)
    assert result["status"] == "finished", result["message"]
    assert result["outputs"]["adapter"].is_file()
