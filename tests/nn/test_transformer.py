"""TransformerEncoder's masks: a causal / padding mask is built once per forward for all its layers where the
kernels run (Triton interpreter on CPU), with the reference backend's outputs."""
import copy

import pytest
import torch

import mmfast.nn.attention as nn_attention
from mmfast.nn.transformer import TransformerEncoder
from numerics import randn


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_padding_mask_is_built_once_per_forward(causal, block_mask_builds):
    ref = TransformerEncoder(32, 2, 2, backend="reference").eval()
    tri = copy.deepcopy(ref)
    for layer in tri.layers:
        layer.attn.backend = "triton"
    x = randn(2, 13, 32)
    pad = torch.zeros(2, 13, dtype=torch.bool)
    pad[0, 9:] = True  # a padded tail
    pad[1, 4] = True  # and a key in the middle
    with torch.no_grad():
        expected = ref(x, causal=causal, key_padding_mask=pad)
        assert block_mask_builds == {"per forward": 0, "per layer": 0}  # the reference backend reads the mask itself
        got = tri(x, causal=causal, key_padding_mask=pad)
    assert block_mask_builds == {"per forward": 1, "per layer": 0}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert nn_attention.shared_padding_mask(tri.layers[0].attn, 13, 13, causal=causal, key_padding_mask=None,
                                            device=x.device) is None  # no tensors: flash_attention caches it
