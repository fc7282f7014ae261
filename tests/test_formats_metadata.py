"""Metadata of WebUI files (spec §5-6) and the sidecar files."""

import json

import pytest
from PIL import Image
from safetensors import safe_open
from torch import nn

from lycotrain.adapters import build_adapter
from lycotrain.errors import FormatError
from lycotrain.formats.compat import detect_version
from lycotrain.formats.kohya import save_webui_file
from lycotrain.formats.metadata import build_metadata, data_section_sha256, write_sidecars

JSON_FIELDS = ("ss_tag_frequency", "ss_dataset_dirs", "ss_network_args")


def metadata(family="sdxl", method="lokr", preview=None, **extra):
    return build_metadata(
        family=family, method=method, rank=8, alpha=4, output_name="my_style", resolution=(1024, 768),
        network_args={"factor": 8}, tag_frequency={"10_subject": {"1girl": 20, "red hair": 3}},
        dataset_dirs={"10_subject": {"n_repeats": 10, "img_count": 20}},
        training={"learning_rate": 1e-4, "steps": 500, "optimizer": "AdamW"}, started_at=1700000000.5,
        trigger_phrase="mystyle", preview=preview, **extra)


def adapters():
    layer = nn.Linear(8, 8)
    adapter = build_adapter("lora", layer, rank=2, alpha=1.0)
    nn.init.normal_(adapter.lora_up.weight)
    return {"lora_te1_text_model_encoder_layers_0_mlp_fc1": adapter}


def test_metadata_values_are_strings_and_json_objects(tmp_path):
    preview = tmp_path / "preview.png"
    Image.new("RGB", (64, 48), (200, 10, 10)).save(preview)
    meta = metadata(preview=preview)
    assert all(isinstance(v, str) for v in meta.values())
    for key in JSON_FIELDS:
        assert isinstance(json.loads(meta[key]), dict)
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "factor": "8"}
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert meta["ss_resolution"] == "(1024, 768)"
    assert float(meta["ss_training_started_at"]) == 1700000000.5
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "1024x768"
    assert meta["modelspec.trigger_phrase"] == "mystyle"
    assert meta["modelspec.thumbnail"].startswith("data:image/png;base64,")


@pytest.mark.parametrize("family,v,version,v2", [("sd1", False, "sd_v1", "False"), ("sd2", False, "sd_v2", "True"),
                                                 ("sd2", True, "sd_v2_v", "True"),
                                                 ("sd2-v", False, "sd_v2_v", "True"),
                                                 ("sdxl", False, "sdxl_base_v1-0", "False")])
def test_version_keys_match_the_model_and_a1111_detects_it(family, v, version, v2):
    meta = metadata(family=family, v_prediction=v)
    assert meta["ss_base_model_version"] == version and meta["ss_v2"] == v2
    assert meta["modelspec.prediction_type"] == ("v" if version.endswith("_v") else "epsilon")
    assert detect_version(meta) == family.removesuffix("-v")


def test_file_header_and_kohya_model_hash(tmp_path):
    path = tmp_path / "x.safetensors"
    save_webui_file(path, adapters(), family="sdxl", metadata={**metadata(), "sshs_model_hash": "stale",
                                                               "sshs_legacy_hash": "stale"})
    blob = path.read_bytes()
    assert blob[8:10] == b'{"'
    with safe_open(str(path), "pt") as f:
        stored = f.metadata()
    assert all(isinstance(v, str) for v in stored.values())
    assert "sshs_legacy_hash" not in stored
    # kohya: sha256 of the data section of a re-serialisation with ss_* metadata only; the data section does
    # not depend on the metadata, so it is also the hash of this file's data section
    assert stored["sshs_model_hash"] == data_section_sha256(blob)
    assert len(stored["sshs_model_hash"]) == 64


def test_bad_metadata_values_are_refused():
    with pytest.raises(FormatError, match="ss_dataset_dirs"):
        build_metadata(family="sd1", method="lora", rank=4, alpha=4, output_name="x", resolution=512,
                       dataset_dirs={"a": 3})
    with pytest.raises(FormatError, match="family"):
        build_metadata(family="flux", method="lora", rank=4, alpha=4, output_name="x", resolution=512)


def test_sidecars(tmp_path):
    preview = tmp_path / "p.jpg"
    Image.new("RGB", (32, 32), (0, 0, 255)).save(preview)
    path = tmp_path / "my_style.safetensors"
    written = write_sidecars(path, family="sdxl", preview=preview, activation_text="mystyle", preferred_weight=0.8,
                             description="a test")
    assert [p.name for p in written] == ["my_style.preview.png", "my_style.json"]
    with Image.open(written[0]) as image:
        assert image.format == "PNG"
    user = json.loads(written[1].read_text())
    assert user["activation text"] == "mystyle" and user["preferred weight"] == 0.8
    assert user["description"] == "a test" and user["sd version"] == "SDXL"
    assert write_sidecars(tmp_path / "b.safetensors", family="sd1") == [tmp_path / "b.json"]
