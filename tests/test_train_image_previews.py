"""Previews: at the start, every N steps and at the end; the final one from the exported file reloaded; every
sampler renders."""

import pytest
from PIL import Image

from _image_runs import events, image_config
from lycotrain.diffusion.sampling import SAMPLERS, render_previews
from lycotrain.engine.config import SamplePrompt
from lycotrain.engine.loop import train

pytestmark = pytest.mark.usefixtures("isolated_home")


def test_previews_at_configured_steps_and_final_from_the_file(tmp_path, image_assets, monkeypatch):
    import lycotrain.formats.kohya as kohya

    loaded = []
    real_apply = kohya.apply_file
    monkeypatch.setattr(kohya, "apply_file", lambda components, path, **kw: loaded.append(path) or
                        real_apply(components, path, **kw))
    model, data = image_assets
    prompts = [{"prompt": "lyco, red circle", "seed": 1, "steps": 2}, {"prompt": "blue", "steps": 2, "width": 48}]
    config = image_config(tmp_path / "run", model, data, training={"max_steps": 4},
                          sample={"prompts": prompts, "at_start": True, "every_n_steps": 2, "at_end": True})
    result = train(config)
    assert result["status"] == "finished"
    previews = events(tmp_path / "run", "preview")
    assert [(e["step"], e["final"]) for e in previews] == [(0, False), (2, False), (4, True)]
    for event in previews:
        sizes = [Image.open(tmp_path / "run" / path).size for path in event["images"]]
        assert sizes == [(32, 32), (48, 32)]
    assert loaded == [result["outputs"]["adapter"]]
    assert (tmp_path / "run" / "run.preview.png").is_file()  # the WebUI card image, from the final preview


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_renders(tmp_path, image_assets, sampler):
    from lycotrain.diffusion.models import load_pipeline

    model, _ = image_assets
    pipeline = load_pipeline(model).pipeline
    paths = render_previews(pipeline, [SamplePrompt(prompt="a", seed=3, steps=3)], sampler=sampler,
                            scheduler_config=pipeline.scheduler.config, default_size=32, out_dir=tmp_path, stem="x")
    again = render_previews(pipeline, [SamplePrompt(prompt="a", seed=3, steps=3)], sampler=sampler,
                            scheduler_config=pipeline.scheduler.config, default_size=32, out_dir=tmp_path, stem="y")
    assert Image.open(paths[0]).tobytes() == Image.open(again[0]).tobytes()  # seeded: reproducible
