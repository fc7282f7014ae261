"""OFT (LyCORIS diag-OFT) against lycoris-lora 4.1.3 and against the spec formula in fp64."""

import logging

import pytest
import torch
from adapter_checks import assert_rel_close
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lycotrain.adapters.oft import OFTAdapter, oft_block_geometry
from lycotrain.errors import AdapterError

logging.getLogger("LyCORIS").setLevel(logging.WARNING)

LAYERS = {
    "linear": lambda: nn.Linear(40, 24),
    "conv1x1": lambda: nn.Conv2d(6, 24, 1),
    "conv3x3": lambda: nn.Conv2d(6, 24, 3, padding=1),
    "conv3x3_strided": lambda: nn.Conv2d(6, 24, 3, stride=2),
}


def sample_input(layer: nn.Module, batch: int = 2) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(batch, 3, layer.in_features)
    return torch.randn(batch, layer.in_channels, 6, 5)


def randomize(adapter: OFTAdapter, std: float = 0.3) -> None:
    with torch.no_grad():
        adapter.oft_blocks.normal_(0, std)
        if adapter.rescale is not None:
            adapter.rescale.uniform_(0.5, 1.5)


def spec_delta_fp64(weight, blocks, rescale, kappa_eff, m):
    """specs/webui-formats.md §3.4, LyCORIS column, computed independently in float64."""
    b = blocks.double()
    q = b - b.transpose(1, 2)
    norm = q.norm() + 1e-8
    if kappa_eff > 0 and norm > kappa_eff:
        q = q * kappa_eff / norm
    eye = torch.eye(b.shape[1], dtype=torch.float64)
    rot = (eye + q) @ torch.linalg.inv(eye - q)
    rot_m = m * rot + (1 - m) * eye
    n, bs, _ = b.shape
    w = weight.double()
    rotated = torch.einsum("knm,kni->kmi", rot_m, w.reshape(n, bs, -1)).reshape(w.shape)
    if rescale is not None:
        rotated = rescale.double() * rotated
    return rotated - w


def lycoris_delta(layer, adapter: OFTAdapter, m: float) -> torch.Tensor:
    """LyCORIS' delta. Its module computes m != 1 without rescale; with rescale that path crashes in 4.1.3
    (``(rescale - 1) * org_weight`` broadcasts (out,1) against the blocked view), so the rescale is applied
    to LyCORIS' rotated weight as the spec states: s ⊙ (W + ΔW_rot) - W (s is not interpolated by m)."""
    from lycoris.functional.diag_oft import diff_weight
    from lycoris.modules.diag_oft import DiagOFTModule

    kappa = float(adapter.alpha)
    if m == 1.0:
        return diff_weight(layer.weight, adapter.oft_blocks, adapter.rescale, constraint=kappa * adapter.out_features)
    module = DiagOFTModule("t", layer, multiplier=m, lora_dim=adapter.block_size, constraint=kappa)
    with torch.no_grad():
        module.oft_blocks.copy_(adapter.oft_blocks)
    delta, _ = module.get_diff_weight(m)
    if adapter.rescale is not None:
        delta = adapter.rescale * (layer.weight + delta) - layer.weight
    return delta


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("constraint", [0.0, 1e-3])
@pytest.mark.parametrize("rescaled", [False, True])
@pytest.mark.parametrize("m", [1.0, 0.5])
def test_oft_matches_lycoris(kind, constraint, rescaled, m):
    torch.manual_seed(1)
    layer = LAYERS[kind]()
    adapter = OFTAdapter(layer, block_size=4, constraint=constraint, rescaled=rescaled, multiplier=m)
    randomize(adapter)
    if constraint:  # the clamp must actually act
        q = adapter.oft_blocks - adapter.oft_blocks.transpose(1, 2)
        assert q.norm() > constraint * adapter.out_features
    with torch.no_grad():
        expected = lycoris_delta(layer, adapter, m)
        delta = adapter.delta_weight(m)
        assert_rel_close(delta, expected)
        assert_rel_close(delta, spec_delta_fp64(layer.weight, adapter.oft_blocks, adapter.rescale,
                                                constraint * adapter.out_features, m), rtol=1e-6)
        x = sample_input(layer)
        reference = adapter.base_op(x, layer.weight + expected, layer.bias)
        assert_rel_close(adapter(x), reference)


@pytest.mark.parametrize("kind", LAYERS)
def test_oft_forward_equals_lycoris_module_forward(kind):
    """LyCORIS' own weight-mode forward (base + conv/linear with ΔW, bias untouched) and its gradients,
    at m = 1 and m = 0.5."""
    from lycoris.modules.diag_oft import DiagOFTModule

    torch.manual_seed(2)
    layer = LAYERS[kind]()
    for m in (1.0, 0.5):
        adapter = OFTAdapter(layer, block_size=4, constraint=1e-2, multiplier=m)
        randomize(adapter)
        module = DiagOFTModule("t", layer, multiplier=m, lora_dim=4, constraint=1e-2)
        with torch.no_grad():
            module.oft_blocks.copy_(adapter.oft_blocks)
        x = sample_input(layer)
        out, expected = adapter(x), module(x)
        assert_rel_close(out, expected)
        weights = torch.randn_like(out)
        (out * weights).sum().backward()
        (expected * weights).sum().backward()  # the same loss through LyCORIS: the training gradients agree
        assert_rel_close(adapter.oft_blocks.grad, module.oft_blocks.grad, rtol=1e-4)


@pytest.mark.parametrize("out, lora_dim", [(320, 32), (320, 8), (640, 16), (768, 4), (1280, 32), (24, 5), (7, 4)])
def test_block_geometry_is_lycoris(out, lora_dim):
    from lycoris.modules.diag_oft import DiagOFTModule

    module = DiagOFTModule("t", nn.Linear(3, out), lora_dim=lora_dim)
    assert oft_block_geometry(out, lora_dim) == (module.block_size, module.block_num)
    adapter = OFTAdapter(nn.Linear(3, out), block_size=lora_dim)
    assert tuple(adapter.oft_blocks.shape) == tuple(module.oft_blocks.shape)
    rebuilt = OFTAdapter(nn.Linear(3, out), **adapter.hyperparameters())
    assert rebuilt.oft_blocks.shape == adapter.oft_blocks.shape


@pytest.mark.parametrize("kind", LAYERS)
def test_state_dict_keys_and_shapes(kind):
    layer = LAYERS[kind]()
    state = OFTAdapter(layer, block_size=4, constraint=1e-4, rescaled=True).adapter_state_dict()
    assert set(state) == {"oft_blocks", "rescale", "alpha"}
    assert state["alpha"].shape == () and state["alpha"].item() == pytest.approx(1e-4)
    assert state["oft_blocks"].shape == (6, 4, 4)
    assert state["rescale"].shape == (24, *[1] * (layer.weight.dim() - 1))
    assert set(OFTAdapter(layer, block_size=4).adapter_state_dict()) == {"oft_blocks", "alpha"}


@pytest.mark.parametrize("kind", LAYERS)
def test_identity_at_init_merge_roundtrip_and_gradients(kind):
    layer = LAYERS[kind]()
    original = layer.weight.detach().clone()
    x = sample_input(layer).requires_grad_(True)
    reference = layer(x)
    adapter = OFTAdapter(layer, block_size=4, rescaled=True)
    torch.testing.assert_close(adapter(x), reference, rtol=0, atol=1e-6)
    randomize(adapter)
    out = adapter(x)
    out.square().sum().backward()
    assert adapter.oft_blocks.grad is not None and adapter.oft_blocks.grad.abs().sum() > 0
    assert adapter.rescale.grad is not None and x.grad is not None
    assert layer.weight.grad is None and layer.bias.grad is None
    assert [n for n, p in adapter.named_parameters() if p.requires_grad] == ["oft_blocks", "rescale"]
    with torch.no_grad():
        adapter.merge()
        torch.testing.assert_close(adapter(x), out, rtol=1e-5, atol=1e-5)
        adapter.unmerge()
    torch.testing.assert_close(layer.weight, original, rtol=0, atol=1e-6)
    adapter.multiplier = 0.0
    torch.testing.assert_close(adapter(x), reference)


def test_merge_roundtrip_at_fractional_multiplier():
    layer = nn.Linear(16, 12)
    original = layer.weight.detach().clone()
    adapter = OFTAdapter(layer, block_size=4, rescaled=True, multiplier=0.3)
    randomize(adapter, std=1.0)
    x = sample_input(layer)
    with torch.no_grad():
        out = adapter(x)
        adapter.merge()
        torch.testing.assert_close(layer(x), out, rtol=1e-5, atol=1e-5)
        adapter.unmerge()
    torch.testing.assert_close(layer.weight, original, rtol=0, atol=1e-5)


def test_module_dropout_skips_the_rotation_in_training_only():
    layer = nn.Linear(16, 12)
    adapter = OFTAdapter(layer, block_size=4, module_dropout=0.999)
    randomize(adapter)
    x = sample_input(layer)
    with torch.no_grad():
        torch.testing.assert_close(adapter.train()(x), layer(x))
        assert not torch.allclose(adapter.eval()(x), layer(x))


def test_bf16_autocast_forward():
    layer = nn.Linear(32, 16).to(torch.bfloat16)
    adapter = OFTAdapter(layer, block_size=4)
    randomize(adapter, std=0.1)
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = adapter(x)
    expected = adapter.base_op(x.float(), layer.weight.float() + adapter.delta_weight(), layer.bias.float())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


def test_bad_arguments_raise():
    with pytest.raises(AdapterError, match="block_size"):
        OFTAdapter(nn.Linear(4, 8), block_size=0)
    with pytest.raises(AdapterError, match="constraint"):
        OFTAdapter(nn.Linear(4, 8), constraint=-1.0)


def test_oft_learns_a_rotation():
    """A trainer must train: the loss towards a rotated target falls within a few dozen steps."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    target = OFTAdapter(nn.Linear(16, 16), block_size=4)
    target.base.load_state_dict(layer.state_dict())
    randomize(target, std=0.2)
    adapter = OFTAdapter(layer, block_size=4)
    optimizer = torch.optim.Adam(adapter.adapter_parameters(), lr=0.02)
    x = torch.randn(64, 16)
    with torch.no_grad():
        y = target(x)
    losses = []
    for _ in range(40):
        loss = (adapter(x) - y).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0]


@settings(max_examples=25, deadline=None)
@given(
    block_num=st.integers(1, 6), block_arg=st.integers(1, 6), in_ch=st.integers(1, 5),
    kernel=st.sampled_from([0, 1, 3, 5]), stride=st.integers(1, 2), constraint=st.sampled_from([0.0, 1e-3, 0.05]),
    rescaled=st.booleans(), m=st.sampled_from([1.0, 0.5, 0.0, 1.5]), bias=st.booleans(), seed=st.integers(0, 99),
)
def test_oft_properties(block_num, block_arg, in_ch, kernel, stride, constraint, rescaled, m, bias, seed):
    """Any shape, block size, kernel: forward == base op with W + ΔW, and ΔW == the fp64 spec formula."""
    torch.manual_seed(seed)
    out = block_num * block_arg
    layer = (nn.Linear(in_ch, out, bias=bias) if kernel == 0
             else nn.Conv2d(in_ch, out, kernel, stride=stride, padding=kernel // 2, bias=bias))
    adapter = OFTAdapter(layer, block_size=block_arg, constraint=constraint, rescaled=rescaled, multiplier=m)
    assert adapter.block_num * adapter.block_size == out
    randomize(adapter)
    with torch.no_grad():
        delta = adapter.delta_weight(m)
        expected = spec_delta_fp64(layer.weight, adapter.oft_blocks, adapter.rescale, constraint * out, m)
        torch.testing.assert_close(delta.double(), expected, rtol=0, atol=1e-5 * max(1.0, expected.abs().max().item()))
        x = sample_input(layer)
        forward = adapter(x) if m != 0.0 else adapter.adapted_forward(x)
        reference = adapter.base_op(x, layer.weight + delta, layer.bias)
        torch.testing.assert_close(forward, reference, rtol=1e-5, atol=1e-5)
