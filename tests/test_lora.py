import pytest
import torch
from torch import nn

from lycotrain.adapters.lora import LoRAAdapter


@pytest.mark.parametrize("layer", [nn.Linear(12, 10), nn.Conv2d(6, 8, 3, padding=1), nn.Conv2d(6, 8, 1)])
def test_lora_identity_at_init_and_delta_matches_forward(layer):
    x = torch.randn(2, 12) if isinstance(layer, nn.Linear) else torch.randn(2, 6, 5, 5)
    ref = layer(x)
    ad = LoRAAdapter(layer, rank=4, alpha=2)
    assert torch.equal(ad(x), ref)
    nn.init.normal_(ad.lora_up.weight)
    out = ad(x)
    merged = ad.base_op(x, ad.base.weight + ad.delta_weight(), ad.base.bias)
    torch.testing.assert_close(out, merged, rtol=1e-5, atol=1e-5)
    ad.merge()
    torch.testing.assert_close(ad(x), out, rtol=1e-5, atol=1e-5)
    ad.unmerge()
    torch.testing.assert_close(ad.base.weight, layer.weight)


def test_loaded_alpha_reaches_the_forward_scale():
    source = LoRAAdapter(nn.Linear(6, 5), rank=4, alpha=2)
    nn.init.normal_(source.lora_up.weight)
    target = LoRAAdapter(nn.Linear(6, 5), rank=4, alpha=4)
    target.load_state_dict(source.state_dict())
    assert target.scale == source.scale == 0.5
    x = torch.randn(3, 6)
    torch.testing.assert_close(target(x), source(x))
