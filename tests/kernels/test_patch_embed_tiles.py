"""tile_patch_embed: Llama 3.2 Vision (Mllama) tiles with aspect-ratio tile embeddings (tanh-gated),
[CLS] per tile and unused tiles skipped, against transformers' chain (transcribed in the reference)."""
import pytest
import torch
from numerics import dtype_id, generator, randn
from patch_embed_helpers import check_against_reference, poisoned_outputs  # noqa: F401

from mmfast.kernels import tile_patch_embed
from mmfast.kernels.reference import tile_patch_embed_reference

R = 9  # Mllama: max_aspect_ratio_id + 1 for max_num_tiles = 4


def _tensors(B, T, P=14, C=3, D=24, grid=(2, 3), bias=False):
    N = grid[0] * grid[1]
    return dict(images=randn(B, T, C, grid[0] * P, grid[1] * P, dtype=torch.float64),
                weight=randn(D, C, P, P, dtype=torch.float64, scale=(C * P * P) ** -0.5),
                bias=randn(D, dtype=torch.float64) if bias else None,
                cls_token=randn(D, dtype=torch.float64), pos_embed=randn(N + 1, D, dtype=torch.float64),
                pos_gate=randn(1, dtype=torch.float64), tile_pos_embed=randn(R, T * (N + 1) * D, dtype=torch.float64),
                tile_embed=randn(R, T * D, dtype=torch.float64), tile_embed_gate=randn(1, dtype=torch.float64))


@pytest.mark.parametrize("used", [1, 2, 3, 4], ids=lambda u: f"{u}-tiles-used")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_tiles_fwd_bwd(device, used, dtype):
    B, T = 3, 4
    t = _tensors(B, T)
    counts = torch.tensor([used, max(1, used - 1), 4])  # images use different numbers of tiles
    tile_mask = (torch.arange(T)[None] < counts[:, None]).to(device)
    ar = torch.randint(0, R, (B,), generator=generator()).to(device)
    out, exact = check_against_reference(tile_patch_embed, t, dtype, device, aspect_ratio_ids=ar, tile_mask=tile_mask)
    assert out.shape == (B, T, 1 + 6, 24)
    assert (out[~tile_mask] == 0).all()  # unused tiles: zeros, never computed


def test_tiles_without_mask_with_bias_and_channels_last_like_strides(device):
    B, T = 2, 2
    t = _tensors(B, T, bias=True)
    t["images"] = t["images"].permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)  # channels-last tiles
    ar = torch.tensor([3, 7]).to(device)
    check_against_reference(tile_patch_embed, t, torch.float32, device, aspect_ratio_ids=ar)


def test_llama32_tile_shape_forward(device):
    """One image of 4 tiles at 560 x 560 (40 x 40 = 1600 patches per tile), 2 used, forward only; D kept
    small for the interpreter."""
    t = _tensors(1, 4, grid=(40, 40), D=16)
    tile_mask = torch.tensor([[1, 1, 0, 0]]).to(device)
    out, _ = check_against_reference(tile_patch_embed, t, torch.bfloat16, device, aspect_ratio_ids=torch.tensor([2]).to(device),
                                     tile_mask=tile_mask, grads=False)
    assert out.shape == (1, 4, 1601, 16)


def test_reference_matches_mllama_modules():
    """The reference against the Mllama module math written out (nn.Embedding lookups, gates)."""
    B, T, D, N = 2, 4, 8, 6
    t = _tensors(B, T, D=D)
    ar = torch.tensor([5, 1])
    ref = tile_patch_embed_reference(**{k: v for k, v in t.items()}, aspect_ratio_ids=ar)
    x = torch.nn.functional.conv2d(t["images"].reshape(B * T, 3, 28, 42), t["weight"], stride=14).flatten(2).transpose(1, 2)
    x = x.reshape(B, T, N, D) + t["tile_embed_gate"].tanh() * torch.nn.functional.embedding(ar, t["tile_embed"]).reshape(B, T, 1, D)
    x = torch.cat([t["cls_token"].expand(B, T, 1, D), x], 2)
    x = x + (1 - t["pos_gate"].tanh()) * t["pos_embed"].view(1, 1, N + 1, D)
    x = x + t["pos_gate"].tanh() * torch.nn.functional.embedding(ar, t["tile_pos_embed"]).reshape(B, T, N + 1, D)
    assert torch.allclose(ref, x)


def test_tile_validation():
    t = _tensors(1, 2)
    t = {k: (v.float() if v is not None else None) for k, v in t.items()}
    with pytest.raises(ValueError, match="aspect_ratio_ids values"):
        tile_patch_embed(**t, aspect_ratio_ids=torch.tensor([R]))
    with pytest.raises(ValueError, match="tile_mask"):
        tile_patch_embed(**t, aspect_ratio_ids=torch.tensor([0]), tile_mask=torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="tile_pos_embed"):
        tile_patch_embed(**dict(t, tile_pos_embed=t["tile_pos_embed"][:, :-1]), aspect_ratio_ids=torch.tensor([0]))
    with pytest.raises(ValueError, match="5-D"):
        tile_patch_embed(**dict(t, images=t["images"][0]), aspect_ratio_ids=torch.tensor([0]))
    # tables and gates: floating tensors on the images' device (not an AttributeError, not silently ints)
    for name, bad, msg in (("pos_embed", t["pos_embed"].tolist(), "pos_embed must be a floating tensor"),
                           ("tile_pos_embed", None, "tile_pos_embed must be a floating tensor"),
                           ("tile_embed", t["tile_embed"].long(), "tile_embed must be a floating tensor"),
                           ("pos_gate", torch.ones(1, dtype=torch.long), "pos_gate must be a floating tensor"),
                           ("tile_embed_gate", torch.zeros(1, device="meta"), "tile_embed_gate is on meta")):
        with pytest.raises(ValueError, match=msg):
            tile_patch_embed(**dict(t, **{name: bad}), aspect_ratio_ids=torch.tensor([0]))
