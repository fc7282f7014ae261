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
