"""patch_embed masked-patch pre-training: token_mask + mask_token, the ViT recipe's random other patch
(patch_index), MAE keep indices, and the sampler helpers."""
import importlib

import pytest
import torch
from numerics import dtype_id, generator, randn
from patch_embed_helpers import check_against_reference, poisoned_outputs  # noqa: F401

from mmfast.kernels import patch_embed

pe_module = importlib.import_module("mmfast.kernels.patch_embed")


def _tensors(P=16, C=3, D=24, grid=(3, 5), B=3):
    return dict(images=randn(B, C, grid[0] * P, grid[1] * P, dtype=torch.float64),
                weight=randn(D, C, P, P, dtype=torch.float64, scale=(C * P * P) ** -0.5),
                bias=randn(D, dtype=torch.float64), pos_embed=randn(1 + grid[0] * grid[1], D, dtype=torch.float64),
                cls_token=randn(D, dtype=torch.float64), mask_token=randn(D, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("ratio", [0.0, 0.4, 1.0], ids=["none-masked", "40pct", "all-masked"])
def test_token_mask(device, dtype, ratio):
    t = _tensors()
    mask = torch.rand(3, 15, generator=generator()) < ratio
    out, _ = check_against_reference(patch_embed, t, dtype, device, token_mask=mask.to(device), pos_grid=(3, 5))


def test_token_mask_tiles_skip_gemm(device):
    """Many rows: masked rows are sorted after the GEMM rows, so whole tiles of them skip the K loop;
    the outputs of the masked rows are exactly mask_token + pos (no pixel contributes)."""
    t = _tensors(P=14, D=16, grid=(6, 7), B=4)
    mask = torch.rand(4, 42, generator=generator()) < 0.6
    out, exact = check_against_reference(patch_embed, t, torch.float32, device, token_mask=mask.to(device), grads=False,
                                         pos_grid=(6, 7))
    expected = (t["mask_token"] + t["pos_embed"][1:][None]).expand(4, 42, 16)[mask]
    assert torch.allclose(out[:, 1:][mask.to(device)].double().cpu(), expected, atol=1e-6)


def test_random_other_patch(device):
    t = _tensors()
    token_mask, patch_index, target = pe_module.vit_masked_patch_sampler(3, 15, generator=generator())
    check_against_reference(patch_embed, t, torch.float32, device, token_mask=token_mask.to(device),
                            patch_index=patch_index.to(device), pos_grid=(3, 5))


def test_patch_index_duplicates_accumulate_image_grads(device):
    """Every token reads patch 0: d_images of patch 0 is the sum over tokens, the rest is zero."""
    t = _tensors(grid=(2, 2), B=2)
    del t["mask_token"]
    check_against_reference(patch_embed, t, torch.float32, device, patch_index=torch.zeros(2, 4, dtype=torch.long).to(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_mae_keep_indices(device, dtype):
    t = _tensors(grid=(4, 5))
    del t["mask_token"]
    keep, restore = pe_module.mae_keep_indices(3, 20, mask_ratio=0.75, generator=generator())
    out, _ = check_against_reference(patch_embed, t, dtype, device, keep_indices=keep.to(device), pos_grid=(4, 5))
    assert out.shape == (3, 1 + 5, 24)


def test_mae_without_cls(device):
    t = _tensors(grid=(3, 3), B=2)
    del t["mask_token"], t["cls_token"]
    t["pos_embed"] = t["pos_embed"][1:]
    keep = torch.tensor([[8, 0, 4], [1, 2, 3]])
    check_against_reference(patch_embed, t, torch.float32, device, keep_indices=keep.to(device))


def test_vit_sampler_recipe():
    """The ViT recipe: half the patches are targets; of those ~80% [MASK], ~10% another patch, ~10% unchanged."""
    B, N = 64, 196
    token_mask, patch_index, target = pe_module.vit_masked_patch_sampler(B, N, generator=torch.Generator().manual_seed(0))
    assert (target.sum(1) == 98).all()
    own = torch.arange(N).expand(B, N)
    swapped = patch_index != own
    assert not (token_mask & ~target).any() and not (swapped & ~target).any() and not (token_mask & swapped).any()
    total = target.sum().item()
    assert abs(token_mask.sum().item() / total - 0.8) < 0.02
    assert abs(swapped.sum().item() / total - 0.1) < 0.02
    assert ((patch_index >= 0) & (patch_index < N)).all()
    # two calls draw different masks
    again = pe_module.vit_masked_patch_sampler(B, N)[2]
    assert not torch.equal(again, target)


def test_mae_keep_indices_helper():
    keep, restore = pe_module.mae_keep_indices(4, 196, mask_ratio=0.75, generator=torch.Generator().manual_seed(1))
    assert keep.shape == (4, 49)
    assert all(len(set(row.tolist())) == 49 for row in keep)
    # ids_restore inverts the shuffle whose first N_keep entries are the kept patches
    assert torch.equal(torch.gather(restore, 1, keep), torch.arange(49).expand(4, 49))


def test_masking_validation():
    x, w = torch.randn(2, 3, 32, 32), torch.randn(8, 3, 16, 16)
    with pytest.raises(ValueError, match="cannot be combined"):
        patch_embed(x, w, keep_indices=torch.zeros(2, 1, dtype=torch.long), token_mask=torch.zeros(2, 4, dtype=torch.bool),
                    mask_token=torch.zeros(8))
    with pytest.raises(ValueError, match="patch_index"):
        patch_embed(x, w, patch_index=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="mask_token"):
        patch_embed(x, w, token_mask=torch.zeros(2, 4, dtype=torch.bool), mask_token=torch.zeros(9))
