import pytest
import torch
from adapter_checks import (assert_rel_close, check_adapter_contract, check_identity_at_init, check_learns,
                            check_matches_peft, check_rank_dropout, input_for, merged_reference, randomize)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lycotrain.adapters.lokr as lokr_module
from lycotrain.adapters import build_adapter
from lycotrain.adapters.lokr import LoKrAdapter
from lycotrain.errors import AdapterError

LAYERS = {
    "linear": lambda: nn.Linear(48, 40),
    "conv1x1": lambda: nn.Conv2d(16, 24, 1),
    "conv3x3": lambda: nn.Conv2d(24, 16, 3, padding=1),
    "conv3x3-stride2": lambda: nn.Conv2d(16, 24, 3, padding=1, stride=2),
}
# rank/alpha/factor/decompose_both/full_matrix combinations covering every full-vs-decomposed case
OPTIONS = {
    "w2-decomposed": dict(rank=2, alpha=1.0),
    "both-decomposed": dict(rank=1, alpha=3.0, decompose_both=True, factor=4),
    "full-matrix": dict(rank=4, alpha=2.0, full_matrix=True),
    "forced-full": dict(rank=64, alpha=4.0),
    "factor-8": dict(rank=2, alpha=2.0, factor=8),
}


def make(kind: str, option: str) -> LoKrAdapter:
    return LoKrAdapter(LAYERS[kind](), **OPTIONS[option])


def lycoris_delta(ad: LoKrAdapter, multiplier: float = 1.0) -> torch.Tensor:
    from lycoris.functional.lokr import diff_weight

    w2b = ad.lokr_w2_b
    if w2b is not None and ad.is_conv:  # the functional API wants (r, d, kh, kw)
        w2b = w2b.reshape(ad.rank, -1, *ad.kernel_size)
    delta = diff_weight(ad.lokr_w1, ad.lokr_w1_a, ad.lokr_w1_b, ad.lokr_w2, ad.lokr_w2_a, w2b, None,
                        gamma=torch.tensor(float(ad.alpha)))
    return multiplier * delta.reshape(ad.base.weight.shape)


def lycoris_module(ad: LoKrAdapter, base: nn.Module, **kw):
    from lycoris.modules.lokr import LokrModule

    return LokrModule("m", base, lora_dim=ad.rank, alpha=float(ad.alpha), factor=ad.factor,
                      decompose_both=ad.decompose_both, full_matrix=ad.full_matrix, **kw)


def copy_into(ad: LoKrAdapter, target: nn.Module, key: str | None) -> None:
    with torch.no_grad():
        for name, tensor in ad.adapter_state_dict().items():
            if name != "alpha":
                param = getattr(target, name)
                (param[key] if key else param).copy_(tensor)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("option", OPTIONS)
def test_layout_matches_lycoris_module(kind, option):
    """Same parameter names and shapes as LyCORIS for every full/decomposed rule (and never lokr_t2)."""
    ad = make(kind, option)
    theirs = lycoris_module(ad, LAYERS[kind]())
    ours = {k: tuple(v.shape) for k, v in ad.adapter_state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in theirs.custom_state_dict().items()}
    assert float(ad.alpha) == pytest.approx(float(theirs.alpha))
    assert ad.scale == pytest.approx(theirs.scale)
    assert all(v.dim() == 2 for k, v in ad.adapter_state_dict().items() if k.startswith("lokr_w2_"))


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("multiplier", [1.0, 0.5])
def test_delta_matches_lycoris_functional(kind, option, multiplier):
    ad = make(kind, option)
    randomize(ad)
    assert_rel_close(ad.delta_weight(multiplier), lycoris_delta(ad, multiplier))


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("bypass", [False, True])
def test_forward_matches_lycoris_module(kind, option, bypass):
    ad = make(kind, option)
    randomize(ad)
    ad.multiplier = 0.7
    theirs_base = LAYERS[kind]()
    theirs_base.load_state_dict(ad.base.state_dict())
    theirs = lycoris_module(ad, theirs_base, multiplier=0.7, bypass_mode=bypass)
    copy_into(ad, theirs, None)
    theirs.apply_to()
    x = input_for(ad.base)
    with torch.no_grad():
        assert_rel_close(ad(x), theirs_base(x))


@pytest.mark.parametrize("kind", LAYERS)
# peft has no full_matrix, and its factorization does not sort (m, n) when factor > sqrt(dim) (40, 8 -> (8, 5))
@pytest.mark.parametrize("option", [o for o in OPTIONS if o not in ("full-matrix", "factor-8")])
def test_forward_and_delta_match_peft(kind, option):
    from peft import LoKrConfig
    from peft.tuners.lokr import layer as peft_lokr

    ad = make(kind, option)
    randomize(ad)
    # peft always scales by alpha / r; our stored alpha already encodes LyCORIS's "both full => scale 1"
    config = LoKrConfig(r=ad.rank, alpha=float(ad.alpha), decompose_both=ad.decompose_both,
                        decompose_factor=ad.factor)
    check_matches_peft(ad, LAYERS[kind](), peft_lokr, config, copy_into)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("option", OPTIONS)
def test_contract(kind, option):
    ad = make(kind, option)
    x = input_for(ad.base)
    check_identity_at_init(ad, x)
    check_adapter_contract(ad, x)


@pytest.mark.parametrize("kind", [k for k in LAYERS if k != "linear"])
@pytest.mark.parametrize("first", [True, False])
def test_both_conv_vec_trick_orders_are_exact(kind, first, monkeypatch):
    monkeypatch.setattr(lokr_module, "w1_first", lambda *args, **kw: first)
    ad = make(kind, "both-decomposed")
    randomize(ad)
    x = input_for(ad.base)
    with torch.no_grad():
        assert_rel_close(ad(x), merged_reference(ad, x))


def test_both_full_means_scale_one_and_alpha_equals_rank():
    ad = LoKrAdapter(nn.Linear(64, 64), rank=16, alpha=1.0)  # 64 -> (8, 8): rank 16 >= 8/2 forces W2 full
    assert ad.layout.w1_full and ad.layout.w2_full
    assert ad.scale == 1.0 and float(ad.alpha) == 16.0
    half = LoKrAdapter(nn.Linear(64, 64), rank=2, alpha=1.0)
    assert not half.layout.w2_full and half.scale == 0.5


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_rank_dropout_masks_whole_output_rows_and_rescales(kind):
    ad = make(kind, "w2-decomposed")
    ad.rank_dropout_p = 0.5
    randomize(ad)
    check_rank_dropout(ad, input_for(ad.base, batch=4))


def test_bad_parameters_raise_adapter_error():
    with pytest.raises(AdapterError, match="factor"):
        LoKrAdapter(nn.Linear(8, 8), factor=0)
    with pytest.raises(AdapterError, match="rank"):
        LoKrAdapter(nn.Linear(8, 8), rank=0)


def test_registry_builds_lokr():
    assert isinstance(build_adapter("lokr", nn.Linear(8, 8), rank=2), LoKrAdapter)


@settings(max_examples=25, deadline=None)
@given(out_ch=st.integers(1, 24), in_ch=st.integers(1, 24), rank=st.integers(1, 8),
       factor=st.sampled_from([-1, 2, 3, 4]), kernel=st.sampled_from([1, 3]), stride=st.integers(1, 2),
       conv=st.booleans(), decompose_both=st.booleans(), full_matrix=st.booleans())
def test_property_forward_equals_merged_and_lycoris(out_ch, in_ch, rank, factor, kernel, stride, conv,
                                                    decompose_both, full_matrix):
    layer = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2) if conv else nn.Linear(in_ch, out_ch)
    ad = LoKrAdapter(layer, rank=rank, alpha=rank / 2, factor=factor, decompose_both=decompose_both,
                     full_matrix=full_matrix)
    randomize(ad)
    x = input_for(layer, size=5)
    with torch.no_grad():
        assert_rel_close(ad.delta_weight(), lycoris_delta(ad))
        assert_rel_close(ad(x), merged_reference(ad, x))


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("option", ["w2-decomposed", "both-decomposed", "forced-full"])
def test_learns(kind, option):
    student, teacher = make(kind, option), make(kind, option)
    teacher.base.load_state_dict(student.base.state_dict())
    check_learns(student, teacher, input_for(student.base, batch=8))


@pytest.mark.parametrize("kind", ["linear", "conv3x3"])
def test_trains_under_bf16_autocast(kind):
    ad = make(kind, "both-decomposed")
    randomize(ad)
    x = input_for(ad.base)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ad(x)
    out.float().square().sum().backward()
    assert_rel_close(out.float(), merged_reference(ad, x), rtol=5e-2)
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ad.adapter_parameters())
