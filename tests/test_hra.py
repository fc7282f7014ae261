"""HRA against peft 0.21.2's HRA layers, the explicit product of reflections (fp64), and its exact LoRA export."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lycotrain.adapters.hra import HRAAdapter, hra_factors, hra_orthonormal_basis, hra_to_lora_factors
from lycotrain.adapters.lora import LoRAAdapter
from lycotrain.errors import AdapterError

LAYERS = {
    "linear": lambda: nn.Linear(12, 10),
    "conv1x1": lambda: nn.Conv2d(6, 8, 1),
    "conv3x3": lambda: nn.Conv2d(6, 8, 3, padding=1),
    "conv1x1_narrowing_strided": lambda: nn.Conv2d(8, 6, 1, stride=2),
    "linear_narrowing": lambda: nn.Linear(12, 5),
}


def sample_input(layer: nn.Module) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(2, 3, layer.in_features)
    return torch.randn(2, layer.in_channels, 5, 6)


def randomize(adapter: HRAAdapter) -> None:
    with torch.no_grad():
        adapter.hra_u.normal_()


def explicit_h_fp64(u: torch.Tensor, apply_gs: bool) -> torch.Tensor:
    """H built the slow, obvious way (PEFT's definition) in float64."""
    u = u.double()
    eye = torch.eye(u.shape[0], dtype=torch.float64)
    if apply_gs:
        basis = []
        for i in range(u.shape[1]):
            col = u[:, i]
            for b in basis:
                col = col - (b @ col) * b
            basis.append(col / col.norm())
        q = torch.stack(basis, dim=1)
        return eye - 2 * q @ q.t()
    h = eye
    for i in range(u.shape[1]):
        ui = u[:, i:i + 1] / u[:, i].norm()
        h = h - 2 * (h @ ui) @ ui.t()
    return h


def flat(weight: torch.Tensor) -> torch.Tensor:
    return weight.reshape(weight.shape[0], -1)


def peft_layer(layer: nn.Module, rank: int, apply_gs: bool, u: torch.Tensor) -> nn.Module:
    from peft import HRAConfig, get_peft_model

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.target = layer

        def forward(self, x):
            return self.target(x)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about odd r
        model = get_peft_model(Holder(), HRAConfig(r=rank, apply_GS=apply_gs, target_modules=["target"]))
    hra_layer = model.base_model.model.target
    with torch.no_grad():
        hra_layer.hra_u["default"].copy_(u)
    return hra_layer


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("rank", [4, 3])
def test_hra_matches_peft(kind, apply_gs, rank):
    torch.manual_seed(1)
    layer = LAYERS[kind]()
    original = layer.weight.detach().clone()
    adapter = HRAAdapter(layer, rank=rank, apply_gs=apply_gs)
    randomize(adapter)
    reference = peft_layer(layer, rank, apply_gs, adapter.hra_u.detach())
    x = sample_input(layer)
    out, expected = adapter(x), reference(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (expected * weights).sum().backward()  # the same loss through peft: the training gradients agree too
    torch.testing.assert_close(adapter.hra_u.grad, reference.hra_u["default"].grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        peft_delta = flat(original) @ reference.get_delta_weight("default") - flat(original)
        torch.testing.assert_close(adapter.delta_weight(), peft_delta.reshape(original.shape), rtol=1e-5, atol=1e-6)
        reference.merge()  # peft's merge, W <- W H
        merged = layer.weight.detach().clone()
        reference.unmerge()
        adapter.merge()
        torch.testing.assert_close(layer.weight, merged, rtol=1e-5, atol=1e-6)
        adapter.unmerge()
    torch.testing.assert_close(layer.weight, original, rtol=0, atol=1e-6)


def test_regulariser_is_the_hra_authors_orthogonality_loss():
    """reg_lambda * ||I - ÛᵀÛ||_F with column-normalised Û (HRA reference trainer; peft defines none)."""
    adapter = HRAAdapter(nn.Linear(12, 10), rank=4, reg_lambda=0.25)
    randomize(adapter)
    u = adapter.hra_u.detach()
    u_hat = u / u.norm(dim=0)
    expected = 0.25 * torch.linalg.norm(torch.eye(4) - u_hat.t() @ u_hat)  # Frobenius
    loss = adapter.extra_loss()
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    assert adapter.hra_u.grad is not None and adapter.hra_u.grad.abs().sum() > 0
    with torch.no_grad():  # orthogonal reflection vectors: no penalty
        adapter.hra_u.copy_(torch.linalg.qr(torch.randn(12, 4)).Q * 3.0)
    assert adapter.extra_loss().item() == pytest.approx(0.0, abs=1e-5)
    assert HRAAdapter(nn.Linear(12, 10), rank=4).extra_loss() is None


@pytest.mark.parametrize("kind", LAYERS)
def test_identity_at_init_and_only_adapter_gradients(kind):
    layer = LAYERS[kind]()
    x = sample_input(layer).requires_grad_(True)
    reference = layer(x)
    adapter = HRAAdapter(layer, rank=6)
    u = adapter.hra_u.detach()
    torch.testing.assert_close(u[:, 0::2], u[:, 1::2], rtol=0, atol=0)  # PEFT's symmetric pairs
    torch.testing.assert_close(adapter(x), reference, rtol=1e-5, atol=1e-5)
    randomize(adapter)
    adapter(x).square().sum().backward()
    assert adapter.hra_u.grad is not None and adapter.hra_u.grad.abs().sum() > 0
    assert x.grad is not None and layer.weight.grad is None and layer.bias.grad is None
    assert [n for n, p in adapter.named_parameters() if p.requires_grad] == ["hra_u"]
    assert set(adapter.adapter_state_dict()) == {"hra_u"}
    assert adapter.hra_u.shape == (layer.weight[0].numel(), 6)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("m", [1.0, 0.7, -0.5, 0.0])
def test_multiplier_is_linear_and_merge_roundtrips(kind, m):
    layer = LAYERS[kind]()
    original = layer.weight.detach().clone()
    adapter = HRAAdapter(layer, rank=4, multiplier=m)
    randomize(adapter)
    x = sample_input(layer)
    with torch.no_grad():
        torch.testing.assert_close(adapter.delta_weight(m), m * adapter.delta_weight(1.0), rtol=1e-5, atol=1e-6)
        out = adapter(x)
        torch.testing.assert_close(out, adapter.base_op(x, original + adapter.delta_weight(m), layer.bias),
                                   rtol=1e-5, atol=1e-5)
        adapter.merge()
        torch.testing.assert_close(adapter(x), out, rtol=1e-5, atol=1e-5)
        adapter.unmerge()
    torch.testing.assert_close(layer.weight, original, rtol=0, atol=1e-5)


def test_merge_refuses_a_multiplier_it_could_not_undo():
    adapter = HRAAdapter(nn.Linear(8, 8), rank=3, multiplier=0.5)  # odd r: H has eigenvalue -1, H_0.5 singular
    with pytest.raises(AdapterError, match="0.5"):
        adapter.merge()
    assert not adapter.merged


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("apply_gs", [False, True])
@pytest.mark.parametrize("m", [1.0, 0.5])
def test_lora_factors_reproduce_the_hra_layer(kind, apply_gs, m):
    torch.manual_seed(3)
    layer = LAYERS[kind]()
    adapter = HRAAdapter(layer, rank=4, apply_gs=apply_gs, multiplier=m)
    randomize(adapter)
    up, down = hra_to_lora_factors(layer.weight, adapter.hra_u.detach(), apply_gs, multiplier=m)
    lora = LoRAAdapter(layer, rank=4, alpha=4, use_tucker=False)
    assert lora.lora_up.weight.shape == up.shape and lora.lora_down.weight.shape == down.shape
    with torch.no_grad():
        lora.lora_up.weight.copy_(up)
        lora.lora_down.weight.copy_(down)
        x = sample_input(layer)
        torch.testing.assert_close(lora(x), adapter(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(flat(down) @ flat(down).t(), torch.eye(4), rtol=0, atol=1e-6)


def test_lora_factors_at_identity_init_are_zero():
    """Repeated columns (rank-deficient u) still give an exact, here zero, delta."""
    layer = nn.Linear(12, 10)
    adapter = HRAAdapter(layer, rank=4)
    up, down = hra_to_lora_factors(layer.weight, adapter.hra_u.detach())
    assert up.abs().max() < 1e-6 and down.shape == (4, 12)


def test_bad_arguments_raise():
    with pytest.raises(AdapterError, match="rank"):
        HRAAdapter(nn.Linear(4, 8), rank=5)
    with pytest.raises(AdapterError, match="reg_lambda"):
        HRAAdapter(nn.Linear(4, 8), rank=2, reg_lambda=-1.0)


def test_hra_learns_a_reflection():
    """A trainer must train: the loss towards a reflected target falls within a few dozen steps."""
    torch.manual_seed(0)
    layer = nn.Linear(16, 8)
    target = HRAAdapter(nn.Linear(16, 8), rank=2)
    target.base.load_state_dict(layer.state_dict())
    with torch.no_grad():
        target.hra_u.copy_(torch.randn(16, 2))
    adapter = HRAAdapter(layer, rank=4, reg_lambda=1e-3)
    optimizer = torch.optim.Adam(adapter.adapter_parameters(), lr=0.05)
    x = torch.randn(64, 16)
    with torch.no_grad():
        y = target(x)
    losses = []
    for _ in range(60):
        loss = (adapter(x) - y).square().mean()
        optimizer.zero_grad()
        (loss + adapter.extra_loss()).backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


@settings(max_examples=25, deadline=None)
@given(in_ch=st.integers(1, 6), out=st.integers(1, 6), kernel=st.sampled_from([0, 1, 3]), rank_frac=st.floats(0, 1),
       stride=st.integers(1, 2), apply_gs=st.booleans(), m=st.sampled_from([1.0, 0.3, 2.0]), seed=st.integers(0, 99))
def test_hra_properties(in_ch, out, kernel, rank_frac, stride, apply_gs, m, seed):
    """Any shape, rank and kernel: compact WY == explicit product (fp64), forward == base op with W + ΔW,
    and the orthonormal basis spans u."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_ch, out) if kernel == 0 else nn.Conv2d(in_ch, out, kernel, stride=stride, padding=kernel // 2)
    flat_in = layer.weight[0].numel()
    rank = 1 + int(rank_frac * (flat_in - 1))
    adapter = HRAAdapter(layer, rank=rank, apply_gs=apply_gs, multiplier=m)
    randomize(adapter)
    u = adapter.hra_u.detach()
    with torch.no_grad():
        v, t = hra_factors(u.double(), apply_gs)
        compact = torch.eye(flat_in, dtype=torch.float64) - v @ torch.linalg.solve_triangular(t, v.t(), upper=True)
        torch.testing.assert_close(compact, explicit_h_fp64(u, apply_gs), rtol=0, atol=1e-9)
        expected = m * (flat(layer.weight).double() @ (explicit_h_fp64(u, apply_gs) - torch.eye(flat_in)))
        torch.testing.assert_close(flat(adapter.delta_weight(m)).double(), expected, rtol=1e-5, atol=1e-5)
        x = sample_input(layer)
        reference = adapter.base_op(x, layer.weight + adapter.delta_weight(m), layer.bias)
        torch.testing.assert_close(adapter(x), reference, rtol=1e-5, atol=1e-5)
        q = hra_orthonormal_basis(u.double())
        torch.testing.assert_close(q @ (q.t() @ u.double()), u.double(), rtol=0, atol=1e-9)
