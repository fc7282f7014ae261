from hypothesis import given, settings
from hypothesis import strategies as st

from lycotrain.adapters.factorization import factorization

# examples computed with lycoris-lora 4.1.3 (specs/webui-formats.md §3.3)
SPEC_EXAMPLES = {(320, -1): (16, 20), (320, 8): (8, 40), (640, -1): (20, 32), (640, 8): (8, 80),
                 (768, -1): (24, 32), (768, 8): (8, 96), (1280, -1): (32, 40), (1280, 8): (8, 160),
                 (2560, -1): (40, 64), (2560, 8): (8, 320), (5120, -1): (64, 80), (5120, 8): (8, 640),
                 (127, 8): (1, 127), (250, 4): (2, 125), (360, 16): (15, 24)}


def test_spec_examples():
    for (dim, factor), expected in SPEC_EXAMPLES.items():
        assert factorization(dim, factor) == expected, (dim, factor)


@settings(max_examples=300, deadline=None)
@given(dim=st.integers(1, 6000), factor=st.integers(-1, 200))
def test_matches_lycoris(dim, factor):
    from lycoris.functional.general import factorization as lycoris_factorization

    m, n = factorization(dim, factor)
    assert (m, n) == lycoris_factorization(dim, factor)
    assert m <= n and m * n == dim
