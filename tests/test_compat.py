"""The simulated A1111 / Forge / ComfyUI loaders (spec §1.2, §3-5) and ``lycotrain check``."""

import json

import pytest
import torch
from _formats_models import randomize, tiny_components, tiny_dirs  # noqa: F401 (fixture)
from safetensors.torch import save_file

from lycotrain.cli import main
from lycotrain.formats.compat import LOADERS, check_file, compat_paths, write_compat_report
from lycotrain.formats.kohya import read_adapter_file, save_webui_file
from lycotrain.formats.metadata import build_metadata
from lycotrain.inject import inject_pipeline


def export(tmp_path, tiny_dirs, arch="sd1", method="lora", params=None, preset="attn-mlp", dtype="fp32",
           **options):
    components = tiny_components(tiny_dirs[arch])
    adapters = inject_pipeline(components, arch, method=method, params=params or {"rank": 4, "alpha": 2.0},
                               preset=preset)
    randomize(adapters)
    meta = build_metadata(family=arch, method="lora" if method == "hra" else method, rank=4, alpha=2.0,
                          output_name="t", resolution=64)
    path = tmp_path / f"{arch}-{method}.safetensors"
    save_webui_file(path, adapters, family=arch, unet_config=components["unet"].config, metadata=meta,
                    dtype=dtype, **options)
    adapters.remove()
    return components, path


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_lora_file_loads_identically_everywhere(tmp_path, tiny_dirs, arch):
    components, path = export(tmp_path, tiny_dirs, arch)
    report = check_file(path, components)
    for loader in LOADERS:
        r = report.loaders[loader]
        assert r.matched == report.modules and r.unmatched == 0 and not r.rejected, loader
        assert r.max_rel_diff_m1 < 1e-6 and r.max_rel_diff_m05 < 1e-6, loader
    assert report.loaders["a1111"].detected_version == arch and report.loaders["a1111"].version_matches


def test_documented_divergences_alpha_zero_and_a1111_upsampler_rule(tmp_path, tiny_dirs):
    components, path = export(tmp_path, tiny_dirs, "sd1", preset="full")
    file = read_adapter_file(path)
    # alpha = 0 disables a module in every WebUI (spec §1.3); lycotrain, like kohya, reads it as alpha = rank
    name = next(iter(file.modules))
    file.modules[name]["alpha"] = torch.tensor(0.0)
    report = check_file(file, components)
    for loader in LOADERS:
        assert report.loaders[loader].max_rel_diff_m1 == pytest.approx(1.0), loader
    # A1111's fixed upsampler slot (1 for up block 0) misses the tiny SD1, whose up block 0 has attention
    a1111 = report.loaders["a1111"]
    assert {k.partition(".")[0] for k in a1111.unmatched_keys} == {"lora_unet_up_blocks_0_upsamplers_0_conv"}
    assert report.loaders["comfyui"].unmatched == 0


def test_file_for_another_model_is_reported_per_loader(tmp_path, tiny_dirs):
    _, path = export(tmp_path, tiny_dirs, "sdxl")
    report = check_file(path, tiny_components(tiny_dirs["sd1"]))
    assert report.lycotrain_unmatched
    forge = report.loaders["forge"]
    assert forge.unmatched > 12 and forge.rejected
    assert report.loaders["a1111"].detected_version == "sdxl" and not report.loaders["a1111"].version_matches


def test_missing_version_metadata_is_detected_as_sd1(tmp_path, tiny_dirs):
    components, path = export(tmp_path, tiny_dirs, "sdxl")
    file = read_adapter_file(path)
    file.metadata = {"ss_output_name": "x"}
    report = check_file(file, components)
    assert report.loaders["a1111"].detected_version == "sd1"
    assert "card hidden" in report.to_text()


def test_check_command_and_report_files(tmp_path, tiny_dirs, capsys):
    components, path = export(tmp_path, tiny_dirs, "sd1")
    assert main(["check", str(path), "--model", str(tiny_dirs["sd1"]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for loader in LOADERS:
        entry = data["loaders"][loader]
        assert {"matched", "unmatched", "rejected", "max_rel_diff_m1", "max_rel_diff_m05"} <= set(entry)
    assert main(["check", str(path), "--model", str(tiny_dirs["sd1"])]) == 0
    assert "a1111" in capsys.readouterr().out
    write_compat_report(path, components)
    json_path, text_path = compat_paths(path)
    assert json.loads(json_path.read_text())["loaders"]["forge"]["rejected"] is False
    assert "comfyui" in text_path.read_text()
    bad = tmp_path / "bad.safetensors"
    save_file({"lora_unet_x.weird": torch.zeros(1)}, str(bad))
    assert main(["check", str(bad), "--model", str(tiny_dirs["sd1"])]) == 2
    assert "match no known method" in capsys.readouterr().err
