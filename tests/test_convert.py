"""merge / extract / resize / inspect (formats/convert.py and their CLI commands) on the tiny SD1 model."""

import json

import pytest
import torch
from _formats_models import randomize, tiny_components, tiny_dirs  # noqa: F401 (fixture)

from lycotrain.cli import main
from lycotrain.diffusion.models import load_pipeline
from lycotrain.errors import FormatError
from lycotrain.formats.convert import extract_from_file, merge_file, resize_lora, summarize
from lycotrain.formats.kohya import apply_file, read_adapter_file, save_webui_file
from lycotrain.formats.metadata import build_metadata
from lycotrain.inject import inject_pipeline


def export(tmp_path, tiny_dirs, method, params, preset="attn-mlp", name="a"):
    components = tiny_components(tiny_dirs["sd1"])
    adapters = inject_pipeline(components, "sd1", method=method, params=params, preset=preset)
    randomize(adapters, std=0.3)  # large enough to change the UNet output visibly
    path = tmp_path / f"{name}.safetensors"
    meta = build_metadata(family="sd1", method=method, rank=4, alpha=2.0, output_name=name, resolution=64)
    save_webui_file(path, adapters, family="sd1", metadata=meta, dtype="fp32")
    return components, adapters, path


def unet_out(unet):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return unet(torch.randn(1, 4, 8, 8, generator=gen), 10, torch.randn(1, 5, 32, generator=gen)).sample


def close(a, b, tol=1e-5):
    a, b = a.detach(), b.detach()
    return float((a - b).norm()) <= tol * float(b.norm())


@pytest.mark.parametrize("out_name", ["merged", "merged.safetensors"])
def test_merge_command_bakes_the_adapter_into_the_model(tmp_path, tiny_dirs, out_name):
    components, _, path = export(tmp_path, tiny_dirs, "loha", {"rank": 4, "alpha": 2.0}, preset="full")
    expected = unet_out(components["unet"])
    out = tmp_path / out_name
    assert main(["merge", str(path), "--model", str(tiny_dirs["sd1"]), "--out", str(out)]) == 0
    merged = load_pipeline(out)
    assert close(unet_out(merged.unet), expected)
    assert not close(unet_out(load_pipeline(tiny_dirs["sd1"]).unet), expected, 1e-3)


def test_merge_file_at_half_strength_for_oft(tmp_path, tiny_dirs):
    components, adapters, path = export(tmp_path, tiny_dirs, "oft", {"block_size": 4})
    adapters.set_multiplier(0.5)
    expected = unet_out(components["unet"])
    fresh = tiny_components(tiny_dirs["sd1"])
    assert merge_file(fresh, path, multiplier=0.5) == len(adapters)
    assert close(unet_out(fresh["unet"]), expected)
    assert not any(type(m).__name__.endswith("Adapter") for m in fresh["unet"].modules())


def test_extract_lora_from_a_loha_file(tmp_path, tiny_dirs):
    components, adapters, path = export(tmp_path, tiny_dirs, "loha", {"rank": 2, "alpha": 1.0})
    exact = extract_from_file(path, tiny_components(tiny_dirs["sd1"]), rank=4)  # LoHa rank 2 -> rank <= 4
    assert exact.max_error < 1e-5
    out = exact.save(tmp_path / "x.safetensors", "fp32")
    loaded = apply_file(tiny_components(tiny_dirs["sd1"]), out)
    for name, adapter in adapters.items():
        assert loaded[name].method == "lora" and close(loaded[name].delta_weight(), adapter.delta_weight(), 1e-4)
    rough = extract_from_file(path, tiny_components(tiny_dirs["sd1"]), rank=1)
    assert 1e-3 < rough.max_error < 1.0
    energy = extract_from_file(path, tiny_components(tiny_dirs["sd1"]), energy=0.9)
    assert all(t["lora_down.weight"].shape[0] <= 4 for t in energy.file.modules.values())


def test_extract_from_two_checkpoints(tmp_path, tiny_dirs):
    _, adapters, path = export(tmp_path, tiny_dirs, "lora", {"rank": 3, "alpha": 3.0})
    tuned = tmp_path / "tuned"
    assert main(["merge", str(path), "--model", str(tiny_dirs["sd1"]), "--out", str(tuned)]) == 0
    out = tmp_path / "diff.safetensors"
    assert main(["extract", "--base", str(tiny_dirs["sd1"]), "--tuned", str(tuned), "--rank", "3",
                 "--out", str(out), "--dtype", "fp32"]) == 0
    file = read_adapter_file(out)
    assert set(file.modules) == set(adapters)
    assert file.metadata["ss_base_model_version"] == "sd_v1" and file.metadata["ss_network_dim"] == "3"
    loaded = apply_file(tiny_components(tiny_dirs["sd1"]), file)
    for name, adapter in adapters.items():
        assert close(loaded[name].delta_weight(), adapter.delta_weight(), 1e-3), name
    with pytest.raises(FormatError, match="identical"):
        from lycotrain.formats.convert import extract_from_checkpoints

        extract_from_checkpoints(tiny_components(tiny_dirs["sd1"]), tiny_components(tiny_dirs["sd1"]), rank=2)


def test_resize_lora(tmp_path, tiny_dirs, capsys):
    _, adapters, path = export(tmp_path, tiny_dirs, "lora", {"rank": 4, "alpha": 2.0})
    same = resize_lora(path, rank=4)
    assert same.max_error < 1e-5
    smaller = tmp_path / "r2.safetensors"
    assert main(["resize", str(path), "--rank", "2", "--out", str(smaller)]) == 0
    assert "relative error max" in capsys.readouterr().out
    file = read_adapter_file(smaller)
    assert {t["lora_down.weight"].shape[0] for t in file.modules.values()} == {2}
    assert all(t["lora_up.weight"].dtype == torch.float16 for t in file.modules.values())
    assert file.metadata["ss_network_module"] == "networks.lora" and file.metadata["ss_output_name"] == "a"
    loha = export(tmp_path, tiny_dirs, "loha", {"rank": 2}, name="h")[2]
    with pytest.raises(FormatError, match="extract"):
        resize_lora(loha, rank=2)


def test_inspect(tmp_path, tiny_dirs, capsys):
    _, adapters, path = export(tmp_path, tiny_dirs, "lokr", {"rank": 2, "factor": 4})
    summary = summarize(path)
    assert summary["methods"] == {"lokr": len(adapters)} and summary["family"] == "sd1"
    assert set(summary["groups"]) == {"lora_unet", "lora_te"}
    assert main(["inspect", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["metadata"]["ss_network_args"]["algo"] == "lokr"
    assert main(["inspect", str(path)]) == 0
    assert "lokr x" in capsys.readouterr().out
