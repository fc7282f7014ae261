import pytest
import torch
from adapter_checks import (assert_rel_close, check_adapter_contract, check_identity_at_init, check_learns,
                            check_matches_peft, check_rank_dropout, input_for, merged_reference, randomize)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lycotrain.adapters import build_adapter
from lycotrain.adapters.loha import LoHaAdapter, prefer_merged
from lycotrain.errors import AdapterError

# (layer, use_tucker): Linear, conv 1x1, conv 3x3 flattened, conv 3x3 Tucker (strided, to cover geometry)
LAYERS = {
    "linear": (lambda: nn.Linear(12, 10), False),
    "conv1x1": (lambda: nn.Conv2d(6, 8, 1), True),
    "conv3x3": (lambda: nn.Conv2d(6, 8, 3, padding=1), False),
    "conv3x3-tucker": (lambda: nn.Conv2d(6, 8, 3, padding=1, stride=2), True),
}
PATHS = ("factored", "merged")


def make(kind: str, rank: int = 3, alpha: float = 2.0, **kw) -> LoHaAdapter:
    factory, tucker = LAYERS[kind]
    return LoHaAdapter(factory(), rank=rank, alpha=alpha, use_tucker=tucker, **kw)


def lycoris_delta(ad: LoHaAdapter, multiplier: float = 1.0) -> torch.Tensor:
    from lycoris.functional.loha import diff_weight

    w1a, w1b, w2a, w2b, t1, t2 = ad.factors()
    gamma = torch.tensor(multiplier * float(ad.alpha) / ad.rank)
    return diff_weight(w1b, w1a, w2b, w2a, t1, t2, gamma=gamma).reshape(ad.base.weight.shape)


def copy_into(ad: LoHaAdapter, target: nn.Module, key: str | None) -> None:
    """Copy our tensors into a peft (``key='default'``) or lycoris (``key=None``) module of the same layout."""
    with torch.no_grad():
        for name, tensor in ad.adapter_state_dict().items():
            if name == "alpha":
                continue
            param = getattr(target, name)
            (param[key] if key else param).copy_(tensor)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_delta_matches_lycoris_functional(kind, multiplier):
    ad = make(kind)
    randomize(ad)
    assert_rel_close(ad.delta_weight(multiplier), lycoris_delta(ad, multiplier))


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("path", PATHS)
def test_forward_matches_lycoris_module(kind, path):
    from lycoris.modules.loha import LohaModule

    ad = make(kind)
    randomize(ad)
    ad.forward_path = path
    ad.multiplier = 0.7
    x = input_for(ad.base)
    theirs_base = LAYERS[kind][0]()
    theirs_base.load_state_dict(ad.base.state_dict())
    theirs = LohaModule("m", theirs_base, multiplier=0.7, lora_dim=ad.rank, alpha=float(ad.alpha),
                        use_tucker=ad.use_tucker)
    copy_into(ad, theirs, None)
    theirs.apply_to()
    with torch.no_grad():
        assert_rel_close(ad(x), theirs_base(x))


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("path", PATHS)
def test_forward_and_delta_match_peft(kind, path):
    from peft import LoHaConfig
    from peft.tuners.loha import layer as peft_loha

    ad = make(kind)
    randomize(ad)
    ad.forward_path = path
    config = LoHaConfig(r=ad.rank, alpha=float(ad.alpha), use_effective_conv2d=ad.use_tucker)
    check_matches_peft(ad, LAYERS[kind][0](), peft_loha, config, copy_into)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("path", PATHS)
def test_contract(kind, path):
    ad = make(kind)
    ad.forward_path = path
    x = input_for(ad.base)
    check_identity_at_init(ad, x)
    check_adapter_contract(ad, x)


@pytest.mark.parametrize("kind", LAYERS)
def test_paths_agree_in_gradients(kind):
    """The factored and merged paths are the same function: equal outputs and input/factor gradients."""
    ad = make(kind)
    randomize(ad)
    x = input_for(ad.base).requires_grad_()
    grads = {}
    for path in PATHS:
        ad.forward_path = path
        out = ad(x)
        grads[path] = torch.autograd.grad(out.square().sum(), [x, *ad.adapter_parameters()])
    for ours, other in zip(grads["factored"], grads["merged"]):
        assert_rel_close(ours, other, rtol=1e-4)


def test_keys_and_shapes_follow_the_spec():
    tucker = make("conv3x3-tucker", rank=4).adapter_state_dict()
    assert {k: tuple(v.shape) for k, v in tucker.items()} == {
        "alpha": (), "hada_w1_a": (4, 8), "hada_w1_b": (4, 6), "hada_w2_a": (4, 8), "hada_w2_b": (4, 6),
        "hada_t1": (4, 4, 3, 3), "hada_t2": (4, 4, 3, 3)}
    flat = make("conv3x3", rank=4).adapter_state_dict()
    assert {k: tuple(v.shape) for k, v in flat.items()} == {
        "alpha": (), "hada_w1_a": (8, 4), "hada_w1_b": (4, 54), "hada_w2_a": (8, 4), "hada_w2_b": (4, 54)}
    assert float(make("linear", rank=4, alpha=None).alpha) == 4.0


@pytest.mark.parametrize("kind", ["linear", "conv3x3-tucker"])
@pytest.mark.parametrize("path", PATHS)
def test_rank_dropout_masks_whole_output_rows_and_rescales(kind, path):
    ad = make(kind, rank=3, rank_dropout=0.5)
    ad.forward_path = path
    randomize(ad)
    check_rank_dropout(ad, input_for(ad.base, batch=4))


def test_auto_path_picks_by_cost():
    # r^2 small against the width: Khatri-Rao; r^2 large against the width: merged
    assert not prefer_merged(positions=4096, out_features=1280, in_features=1280, kernel_numel=1, rank=8,
                             tucker=False)
    assert prefer_merged(positions=4096, out_features=128, in_features=128, kernel_numel=1, rank=32, tucker=False)


def test_bad_parameters_raise_adapter_error():
    with pytest.raises(AdapterError, match="rank"):
        make("linear", rank=0)
    with pytest.raises(AdapterError, match="rank_dropout"):
        make("linear", rank_dropout=1.0)


def test_registry_builds_loha():
    assert isinstance(build_adapter("loha", nn.Linear(4, 4), rank=2), LoHaAdapter)


@settings(max_examples=25, deadline=None)
@given(out_ch=st.integers(1, 9), in_ch=st.integers(1, 9), rank=st.integers(1, 5), kernel=st.sampled_from([1, 2, 3]),
       stride=st.integers(1, 2), tucker=st.booleans(), conv=st.booleans(), path=st.sampled_from(PATHS))
def test_property_forward_equals_merged_and_lycoris(out_ch, in_ch, rank, kernel, stride, tucker, conv, path):
    layer = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2) if conv else nn.Linear(in_ch, out_ch)
    ad = LoHaAdapter(layer, rank=rank, alpha=rank / 2, use_tucker=tucker)
    randomize(ad)
    ad.forward_path = path
    x = input_for(layer, size=5)
    with torch.no_grad():
        assert_rel_close(ad.delta_weight(), lycoris_delta(ad))
        assert_rel_close(ad(x), merged_reference(ad, x))


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("row_scale", [False, True])
def test_gradients_equal_autograd_of_the_merged_weight(kind, path, row_scale):
    """Both paths write their backward out: every gradient (input, factors, and W and the bias when the base
    trains too) equals autograd through W + delta W, also with a per-row scale (rank dropout's mask)."""
    from lycotrain.adapters.loha import loha_delta, loha_factored_forward, loha_merged_forward
    from lycotrain.adapters.functional_common import conv_args_of

    ad = make(kind)
    randomize(ad)
    ad.base.requires_grad_(True)
    x = input_for(ad.base).requires_grad_()
    scale = torch.rand(ad.out_features) + 0.5 if row_scale else 0.7
    params = [x, ad.base.weight, ad.base.bias, *ad.adapter_parameters()]
    if path == "merged":
        out = loha_merged_forward(x, ad.base.weight, ad.base.bias, scale, conv_args_of(ad.base), *ad.factors())
    else:
        out = loha_factored_forward(x, ad.base, *ad.factors(), scale, ad.kernel_size)
    reference = ad.base_op(x, ad.base.weight + loha_delta(*ad.factors(), scale, ad.base.weight.shape),
                           ad.base.bias)
    assert_rel_close(out, reference)
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, params, grad_out)
    expected = torch.autograd.grad(reference, params, grad_out)
    for got, want in zip(ours, expected):
        assert_rel_close(got, want, rtol=1e-5)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("path", PATHS)
def test_learns(kind, path):
    student, teacher = make(kind), make(kind)
    teacher.base.load_state_dict(student.base.state_dict())
    student.forward_path = path
    check_learns(student, teacher, input_for(student.base, batch=8))


@pytest.mark.parametrize("kind", ["linear", "conv3x3-tucker"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype, weight_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float16)],
                         ids=["bf16", "fp16-weights"])
def test_gradients_under_autocast_equal_autograd_of_the_merged_weight(kind, path, dtype, weight_dtype):
    """A GPU run's dtypes: fp32 factors, the base weight in fp32 or in the autocast dtype, grad_out in the autocast
    dtype. The written-out backwards must give every gradient in its input's dtype and with the values autograd
    gives through W + delta W under the same autocast (and the fp32 result, up to the low precision)."""
    ad = make(kind)
    randomize(ad)
    ad.forward_path = path
    x = input_for(ad.base).requires_grad_()
    full_precision = merged_reference(ad, x).detach()
    ad.base.to(weight_dtype)
    params = [x, *ad.adapter_parameters()]
    with torch.autocast("cpu", dtype=dtype):
        out = ad(x)
        reference = ad.base_op(x, ad.base.weight + ad.delta_weight(), ad.base.bias)
    assert out.dtype == reference.dtype == dtype
    assert_rel_close(out.float(), full_precision, rtol=5e-2)
    grad_out = torch.randn_like(out)
    ours = torch.autograd.grad(out, params, grad_out)
    expected = torch.autograd.grad(reference, params, grad_out)
    rtol = 4e-2 if dtype == torch.bfloat16 else 1e-2  # about twice the worst of 30 seeds
    for got, want in zip(ours, expected):
        assert got.dtype == want.dtype
        assert_rel_close(got.float(), want.float(), rtol=rtol)
