"""The simulated A1111 / Forge / ComfyUI loaders (spec §1.2, §3-5) and ``lycotrain check``."""

import json

import pytest
import torch
from _formats_models import randomize, tiny_components, tiny_dirs  # noqa: F401 (fixture)
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from lycotrain.cli import main
from lycotrain.formats.compat import LOADERS, check_file, compat_paths, loader_delta, write_compat_report
from lycotrain.formats.kohya import read_adapter_file, save_webui_file
from lycotrain.formats.metadata import build_metadata
from lycotrain.formats.names import model_names
from lycotrain.inject import inject_pipeline


def export(tmp_path, tiny_dirs, arch="sd1", method="lora", params=None, preset="attn-mlp", dtype="fp32",
           components=None, **options):
    components = components or tiny_components(tiny_dirs[arch])
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


def test_alpha_zero_divergence_and_full_preset_loads_everywhere(tmp_path, tiny_dirs):
    components, path = export(tmp_path, tiny_dirs, "sd1", preset="full")
    file = read_adapter_file(path)
    # alpha = 0 disables a module in every WebUI (spec §1.3); lycotrain, like kohya, reads it as alpha = rank
    name = next(iter(file.modules))
    file.modules[name]["alpha"] = torch.tensor(0.0)
    report = check_file(file, components)
    for loader in LOADERS:
        assert report.loaders[loader].max_rel_diff_m1 == pytest.approx(1.0), loader
    # the tiny SD1 has SD1's block order, so every loader (A1111's fixed upsampler slot included) finds all
    # modules of a `full` export, as on SD1.5
    for loader in LOADERS:
        assert report.loaders[loader].matched == report.modules and report.loaders[loader].unmatched == 0, loader


def test_a1111_upsampler_slot_assumes_sd_block_order(tmp_path, tiny_dirs):
    # A1111 puts up block 0's upsampler in slot 1, where SD's attention-less block has it: on a UNet with
    # attention in up block 0 (unlike any SD) only A1111 drops that module
    components = tiny_components(tiny_dirs["sd1"])
    config = dict(components["unet"].config, up_block_types=("CrossAttnUpBlock2D",) * 2)
    components["unet"] = UNet2DConditionModel.from_config(config).eval()
    components, path = export(tmp_path, tiny_dirs, "sd1", preset="full", components=components)
    report = check_file(path, components)
    a1111 = report.loaders["a1111"]
    assert {k.partition(".")[0] for k in a1111.unmatched_keys} == {"lora_unet_up_blocks_0_upsamplers_0_conv"}
    assert report.loaders["forge"].unmatched == 0 and report.loaders["comfyui"].unmatched == 0


def test_file_for_another_model_is_reported_per_loader(tmp_path, tiny_dirs):
    _, path = export(tmp_path, tiny_dirs, "sdxl")
    report = check_file(path, tiny_components(tiny_dirs["sd1"]))
    assert report.lycotrain_unmatched
    forge = report.loaders["forge"]
    assert forge.unmatched > 12 and forge.rejected
    assert report.loaders["a1111"].detected_version == "sdxl" and not report.loaders["a1111"].version_matches
    assert "the file is for another model (its metadata reads as sdxl)" in report.to_text()


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


ATTN_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


def single_module_report(tmp_path, tiny_dirs, tensors, name=ATTN_Q):
    path = tmp_path / "one.safetensors"
    save_file({f"{name}.{k}": v.contiguous() for k, v in tensors.items()}, str(path), metadata={"ss_v2": "False"})
    return check_file(path, tiny_components(tiny_dirs["sd1"]))


def test_oft_multiplier_divergence_and_forge_rejection(tmp_path, tiny_dirs):
    components, path = export(tmp_path, tiny_dirs, "sd1", method="oft", params={"block_size": 4})
    report = check_file(path, components)
    a1111, comfy, forge = (report.loaders[k] for k in ("a1111", "comfyui", "forge"))
    assert a1111.max_rel_diff_m1 < 1e-5 and a1111.max_rel_diff_m05 < 1e-5
    # ComfyUI applies m^2 (R^T - I) W: at 0.5 it gives a quarter of the full delta, half of what we apply
    assert comfy.max_rel_diff_m1 < 1e-5 and comfy.max_rel_diff_m05 == pytest.approx(0.5, abs=1e-4)
    assert forge.rejected and forge.matched == 0
    names = model_names(components)
    for name, tensors in read_adapter_file(path).modules.items():
        weight = names.layers[name].weight
        full = loader_delta("comfyui", "oft", tensors, weight, 1.0)
        torch.testing.assert_close(loader_delta("comfyui", "oft", tensors, weight, 0.5), 0.25 * full)


def test_rescaled_oft_differs_in_comfyui_even_at_weight_1(tmp_path, tiny_dirs):
    components, path = export(tmp_path, tiny_dirs, "sd1", method="oft",
                              params={"block_size": 4, "rescaled": True})
    report = check_file(path, components)
    assert report.loaders["a1111"].max_rel_diff_m1 < 1e-5 and report.loaders["a1111"].max_rel_diff_m05 > 1e-3
    assert report.loaders["comfyui"].max_rel_diff_m1 > 1e-3


def test_third_party_both_full_lokr_is_scale_1_everywhere(tmp_path, tiny_dirs):
    # ComfyUI issue #15114: both factors full with alpha 1, dim 32: every loader ignores alpha (scale 1)
    w1, w2 = torch.randn(4, 4), torch.randn(8, 8)
    report = single_module_report(tmp_path, tiny_dirs, {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(1.0)})
    assert not report.lycotrain_unmatched
    for loader in LOADERS:
        assert report.loaders[loader].max_rel_diff_m1 < 1e-6, loader


def test_old_oft_diag_only_a1111(tmp_path, tiny_dirs):
    q = torch.randn(8, 4, 4) * 0.1
    q = q - q.transpose(1, 2)
    eye = torch.eye(4).expand(8, 4, 4)
    rotation = (eye + q) @ torch.linalg.inv(eye - q)
    report = single_module_report(tmp_path, tiny_dirs, {"oft_diag": rotation})
    assert report.loaders["a1111"].max_rel_diff_m1 < 1e-4 and report.loaders["a1111"].unmatched == 0
    assert report.loaders["comfyui"].unmatched == 1 and report.loaders["forge"].unmatched == 1


def test_lokr_tucker_fails_in_comfyui_and_aborts_forge(tmp_path, tiny_dirs):
    name = "lora_unet_down_blocks_0_resnets_0_conv1"  # 32 -> 32, 3x3
    tensors = {"lokr_w1": torch.randn(4, 4), "lokr_w2_a": torch.randn(2, 8), "lokr_w2_b": torch.randn(2, 8),
               "lokr_t2": torch.randn(2, 2, 3, 3), "alpha": torch.tensor(2.0)}
    report = single_module_report(tmp_path, tiny_dirs, tensors, name)
    assert report.loaders["a1111"].unmatched == 0
    assert report.loaders["comfyui"].unmatched == len(tensors) and not report.loaders["comfyui"].rejected
    assert report.loaders["forge"].rejected


def test_hra_keys_make_a1111_reject_the_file(tmp_path, tiny_dirs):
    report = single_module_report(tmp_path, tiny_dirs, {"hra_u": torch.randn(32, 4)})
    assert report.loaders["a1111"].rejected
    assert not report.loaders["comfyui"].rejected and report.loaders["comfyui"].unmatched == 1


def test_engine_export_writes_file_sidecars_and_report(tmp_path, tiny_dirs):
    from PIL import Image

    from lycotrain.formats.export import export_webui

    components = tiny_components(tiny_dirs["sdxl"])
    adapters = inject_pipeline(components, "sdxl", method="hra", params={"rank": 2}, preset="attn")
    randomize(adapters)
    preview = tmp_path / "step-10.png"
    Image.new("RGB", (64, 64), (1, 2, 3)).save(preview)
    meta = build_metadata(family="sdxl", method="lora", rank=2, alpha=2, output_name="mine", resolution=64,
                          preview=preview)
    done = export_webui(tmp_path / "mine.safetensors", adapters, components, metadata=meta, preview=preview,
                        activation_text="mine")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["mine.compat.json", "mine.compat.txt", "mine.json", "mine.lycotrain.safetensors",
                     "mine.preview.png", "mine.safetensors", "step-10.png"]
    for loader in LOADERS:  # HRA reaches every WebUI as its exact LoRA
        r = done.compat.loaders[loader]
        assert not r.rejected and r.unmatched == 0 and r.max_rel_diff_m1 < 1e-3, loader
