"""Writing and reading kohya/LyCORIS files: layout rules of the spec, round trips on the tiny SD1/SDXL models,
third-party variants, and clear errors for bad input."""

import struct

import pytest
import torch
from _formats_models import randomize, tiny_components, tiny_dirs, unet_output  # noqa: F401 (fixture)
from lycoris.functional import diag_oft, locon, loha, lokr
from safetensors import safe_open
from safetensors.torch import save_file

from lycotrain.errors import FormatError
from lycotrain.formats.compat import loader_delta
from lycotrain.formats.kohya import (apply_file, load_webui_file, native_path_for, read_adapter_file,
                                    save_webui_file)
from lycotrain.inject import inject_pipeline

FAMILY = {"sd1": "sd1", "sdxl": "sdxl"}
# every method, with options that exercise its storage variants on the tiny models' 32/48/64-wide layers
METHODS = {
    "lora": ("lora", {"rank": 4, "alpha": 2.0}),  # kxk convs use the Tucker core lora_mid
    "loha": ("loha", {"rank": 4, "alpha": 2.0}),  # kxk convs use hada_t1/t2
    "lokr": ("lokr", {"rank": 2, "alpha": 1.0, "factor": 4}),  # W2 decomposed, 2-D lokr_w2_b
    "lokr-both-full": ("lokr", {"rank": 64, "alpha": 3.0}),
    "oft": ("oft", {"block_size": 4}),
}


def export(tmp_path, arch, tiny_dirs, method="lora", params=None, dtype="fp32", preset="full", export_options=None,
           **options):
    components = tiny_components(tiny_dirs[arch])
    adapters = inject_pipeline(components, FAMILY[arch], method=method, params=params or {"rank": 4, "alpha": 2.0},
                               preset=preset, **options)
    randomize(adapters)
    path = tmp_path / f"{arch}-{method}.safetensors"
    result = save_webui_file(path, adapters, family=FAMILY[arch], unet_config=components["unet"].config,
                             dtype=dtype, **(export_options or {}))
    return components, adapters, path, result


def comparable(adapter):
    """Hyperparameters that shape the adapter. A LoKr ``factor`` is not stored in files: several factors give
    the same layout, so the layout is compared instead."""
    params = adapter.hyperparameters()
    if adapter.method == "lokr":
        params["factor"] = tuple(adapter.layout)
    return params


@pytest.mark.parametrize("variant", list(METHODS))
@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_round_trip_gives_identical_adapters_and_outputs(tmp_path, tiny_dirs, arch, variant):
    method, params = METHODS[variant]
    components, adapters, path, _ = export(tmp_path, arch, tiny_dirs, method, params)
    fresh = tiny_components(tiny_dirs[arch])
    loaded = apply_file(fresh, path)
    assert set(loaded) == set(adapters)
    for name, adapter in adapters.items():
        twin = loaded[name]
        assert twin.method == method and comparable(twin) == comparable(adapter)
        for key, value in adapter.adapter_state_dict().items():
            assert torch.equal(twin.adapter_state_dict()[key], value), (name, key)
    assert torch.equal(unet_output(components["unet"]), unet_output(fresh["unet"]))
    kinds = {type(a.base).__name__ + str(getattr(a.base, "kernel_size", "")) for a in adapters.values()}
    assert {"Linear", "Conv2d(3, 3)"} <= kinds


def test_file_follows_the_export_rules(tmp_path, tiny_dirs):
    _, adapters, path, _ = export(tmp_path, "sdxl", tiny_dirs, dtype="fp16")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        assert f.read(2) == b'{"'
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in keys}
    modules = {k.partition(".")[0] for k in keys}
    assert all("." not in m for m in modules)
    assert not any(k.endswith((".scale", ".bias")) for k in keys)
    for module in modules:
        alpha = tensors[f"{module}.alpha"]
        assert alpha.dim() == 0 and float(alpha) > 0
    assert all(t.dtype == torch.float16 for k, t in tensors.items() if not k.endswith(".alpha"))
    unet = {m for m in modules if m.startswith("lora_unet_")}
    assert unet and all(m.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks"))
                        for m in unet)
    assert any(m.startswith("lora_te1_text_model_encoder_layers_") for m in modules)
    assert any(m.startswith("lora_te2_text_model_encoder_layers_") for m in modules)
    loaded, metadata = load_webui_file(path)
    assert set(loaded) == modules and metadata == {}
    assert all(torch.equal(loaded[k.partition(".")[0]][k.partition(".")[2]], t) for k, t in tensors.items())


def lycoris_delta(method, t, weight):
    """lycoris-lora's functional API on the stored tensors (spec §8.1 recipes), multiplier 1."""
    if method == "lora":
        gamma = float(t["alpha"]) / t["lora_down.weight"].shape[0]
        return locon.diff_weight(t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight"), gamma=gamma)
    if method == "loha":
        gamma = float(t["alpha"]) / t["hada_w1_b"].shape[0]
        return loha.diff_weight(t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t.get("hada_t1"),
                                t.get("hada_t2"), gamma=gamma)
    if method == "lokr":
        w2b = t.get("lokr_w2_b")
        if w2b is not None and weight.dim() == 4:  # the functional API wants the 4-D layout the files avoid
            w2b = w2b.reshape(w2b.shape[0], -1, *weight.shape[2:])
        return lokr.diff_weight(t.get("lokr_w1"), t.get("lokr_w1_a"), t.get("lokr_w1_b"), t.get("lokr_w2"),
                                t.get("lokr_w2_a"), w2b, None, gamma=float(t["alpha"]))
    return diag_oft.diff_weight(weight, t["oft_blocks"], t.get("rescale"),
                                constraint=float(t["alpha"]) * weight.shape[0])


@pytest.mark.parametrize("variant", list(METHODS))
def test_exported_tensors_give_the_adapter_delta_and_lycoris_delta(tmp_path, tiny_dirs, variant):
    method, params = METHODS[variant]
    _, adapters, path, _ = export(tmp_path, "sd1", tiny_dirs, method, params)
    file = read_adapter_file(path)
    for name, adapter in adapters.items():
        t = file.modules[name]  # SD1: file names are the internal names
        weight = adapter.base.weight.detach()
        reference = adapter.delta_weight(1.0).detach()
        scale = float(reference.norm())
        ours = loader_delta("a1111", method, t, weight, 1.0)
        lyco = lycoris_delta(method, t, weight).reshape(weight.shape)
        assert float((ours - reference).norm()) <= 1e-5 * scale, name
        assert float((lyco - reference).norm()) <= 1e-5 * scale, name


def test_lokr_both_full_stores_alpha_rank_and_2d_w2_b(tmp_path, tiny_dirs):
    _, _, path, _ = export(tmp_path, "sd1", tiny_dirs, "lokr", {"rank": 64, "alpha": 3.0})
    for tensors in read_adapter_file(path).modules.values():
        assert "lokr_w1" in tensors and "lokr_w2" in tensors and float(tensors["alpha"]) == 64.0
    _, _, path, _ = export(tmp_path, "sd1", tiny_dirs, "lokr", {"rank": 2, "factor": 4})
    conv = [t for t in read_adapter_file(path).modules.values() if "lokr_w2_b" in t and "lokr_w2" not in t]
    assert conv and all(t["lokr_w2_b"].dim() == 2 and "lokr_t2" not in t for t in conv)


def test_oft_constraint_is_baked_and_native_file_resumes(tmp_path, tiny_dirs):
    params = {"block_size": 4, "constraint": 1e-3}
    components, adapters, path, result = export(tmp_path, "sd1", tiny_dirs, "oft", params)
    file = read_adapter_file(path)
    assert all(float(t["alpha"]) == 0.0 for t in file.modules.values()) and result.baked
    for name, adapter in adapters.items():
        stored = loader_delta("a1111", "oft", file.modules[name], adapter.base.weight.detach(), 1.0)
        reference = adapter.delta_weight(1.0).detach()
        assert float((stored - reference).norm()) <= 1e-5 * float(reference.norm())
    assert result.native_path == native_path_for(path) and result.native_path.is_file()
    resumed = apply_file(tiny_components(tiny_dirs["sd1"]), result.native_path)
    for name, adapter in adapters.items():
        assert resumed[name].hyperparameters() == adapter.hyperparameters()
        assert torch.equal(resumed[name].oft_blocks, adapter.oft_blocks)


def test_text_encoder_2_gets_complete_qkvo_groups(tmp_path, tiny_dirs):
    components, adapters, path, result = export(tmp_path, "sdxl", tiny_dirs, preset="attn",
                                                include=[r"_(q|v)_proj$|to_q$"])
    assert result.padded and all(n.startswith("lora_te2_") for n in result.padded)
    file = read_adapter_file(path)
    for layer in {n.rsplit("_self_attn", 1)[0] for n in file.modules if n.startswith("lora_te2_")}:
        for leaf in ("q", "k", "v", "out"):
            assert f"{layer}_self_attn_{leaf}_proj" in file.modules
    assert not any(n.startswith("lora_te1_") and n.endswith("k_proj") for n in file.modules)
    loaded = apply_file(tiny_components(tiny_dirs["sdxl"]), file)
    assert set(loaded) == set(adapters)  # the zero padding is not imported


def test_third_party_aliases_and_missing_alpha(tmp_path, tiny_dirs):
    components = tiny_components(tiny_dirs["sd1"])
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    layer = components["unet"].down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    up, down = torch.randn(layer.out_features, 2), torch.randn(2, layer.in_features)
    path = tmp_path / "peft-style.safetensors"
    save_file({f"{name}.lora_B.weight": up, f"{name}.lora_A.weight": down}, str(path))
    adapters = apply_file(components, path)
    torch.testing.assert_close(adapters[name].delta_weight(), up @ down, rtol=1e-5, atol=1e-6)


def test_bad_input_raises_clear_errors(tmp_path, tiny_dirs):
    _, _, path, _ = export(tmp_path, "sdxl", tiny_dirs)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(FormatError, match="truncated"):
        read_adapter_file(truncated)
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(FormatError, match="not a .safetensors file"):
        read_adapter_file(pickle)
    unknown = tmp_path / "unknown.safetensors"
    save_file({"lora_unet_x.hra_v": torch.zeros(2)}, str(unknown))
    with pytest.raises(FormatError, match="lora_unet_x.*match no known method"):
        read_adapter_file(unknown)
    with pytest.raises(FormatError, match="another architecture"):
        apply_file(tiny_components(tiny_dirs["sd1"]), path)
    with pytest.raises(FormatError, match="no such file"):
        read_adapter_file(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_hra_is_exported_as_its_exact_lora_and_native_file_resumes(tmp_path, tiny_dirs, arch):
    params = {"rank": 4, "apply_gs": arch == "sdxl"}
    components, adapters, path, result = export(tmp_path, arch, tiny_dirs, "hra", params)
    file = read_adapter_file(path)
    assert set(file.methods()) == {"lora"} and len(file.modules) == len(adapters)
    scale = max(float(a.delta_weight().detach().abs().max()) for a in adapters.values())
    assert set(result.converted) == {result_name for result_name in file.modules}
    assert result.max_conversion_error <= 1e-5 * scale
    # the WebUI file reproduces the HRA layers' outputs
    as_lora = tiny_components(tiny_dirs[arch])
    apply_file(as_lora, path)
    ours, theirs = unet_output(components["unet"]), unet_output(as_lora["unet"])
    assert float((ours - theirs).norm()) <= 1e-5 * float(ours.norm())
    # the native file brings back the HRA adapters themselves
    resumed = apply_file(tiny_components(tiny_dirs[arch]), result.native_path)
    for name, adapter in adapters.items():
        assert resumed[name].method == "hra" and resumed[name].hyperparameters() == adapter.hyperparameters()
        assert torch.equal(resumed[name].hra_u, adapter.hra_u)


def test_oft_can_be_exported_as_exact_lora_for_forge(tmp_path, tiny_dirs):
    components, adapters, path, result = export(tmp_path, "sd1", tiny_dirs, "oft", {"block_size": 4},
                                                export_options={"oft_as_lora": True})
    file = read_adapter_file(path)
    assert set(file.methods()) == {"lora"} and result.native_path.is_file()
    as_lora = tiny_components(tiny_dirs["sd1"])
    apply_file(as_lora, path)
    ours, theirs = unet_output(components["unet"]), unet_output(as_lora["unet"])
    assert float((ours - theirs).norm()) <= 1e-5 * float(ours.norm())
