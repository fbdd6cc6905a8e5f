"""patch_embed position tables: resampling to other grids (timm / Hugging Face math), caching, the 2D
(row, column) variant, and gradients flowing through the resampling."""
import importlib

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close_by_rule, dtype_id, randn
from patch_embed_helpers import check_against_reference, poisoned_outputs  # noqa: F401

from mmfast.kernels import patch_embed
from mmfast.kernels.reference import resample_pos_embed_reference

pe_module = importlib.import_module("mmfast.kernels.patch_embed")


def _timm_resample_abs_pos_embed(posemb, new_size, old_size, num_prefix_tokens=1, interpolation="bicubic", antialias=True):
    """timm.layers.pos_embed.resample_abs_pos_embed, transcribed (timm is not installed here)."""
    num_pos_tokens = posemb.shape[1]
    if new_size[0] * new_size[1] + num_prefix_tokens == num_pos_tokens and new_size[0] == new_size[1]:
        return posemb
    prefix, posemb = posemb[:, :num_prefix_tokens], posemb[:, num_prefix_tokens:]
    dim, orig = posemb.shape[-1], posemb.dtype
    posemb = posemb.float().reshape(1, old_size[0], old_size[1], -1).permute(0, 3, 1, 2)
    posemb = F.interpolate(posemb, size=new_size, mode=interpolation, antialias=antialias)
    posemb = posemb.permute(0, 2, 3, 1).reshape(1, -1, dim).to(orig)
    return torch.cat([prefix, posemb], dim=1)


def _hf_vit_interpolate_pos_encoding(position_embeddings, new_h, new_w):
    """transformers ViTEmbeddings.interpolate_pos_encoding (>= 4.44, size= form), transcribed."""
    class_pos, patch_pos = position_embeddings[:, :1], position_embeddings[:, 1:]
    dim, n = position_embeddings.shape[-1], position_embeddings.shape[1] - 1
    s = int(n**0.5)
    patch_pos = patch_pos.reshape(1, s, s, dim).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(patch_pos, size=(new_h, new_w), mode="bicubic", align_corners=False)
    return torch.cat((class_pos, patch_pos.permute(0, 2, 3, 1).view(1, -1, dim)), dim=1)


def test_timm_parity():
    table = randn(1, 1 + 5 * 5, 12)
    ours = resample_pos_embed_reference(table[0, 1:], (7, 6), (5, 5), mode="timm")
    theirs = _timm_resample_abs_pos_embed(table, (7, 6), (5, 5))[0, 1:]
    assert torch.equal(ours, theirs)


def test_hf_parity_and_difference_from_timm():
    table = randn(1, 1 + 4 * 4, 10)
    ours = resample_pos_embed_reference(table[0, 1:], (6, 6), (4, 4), mode="hf")
    assert torch.equal(ours, _hf_vit_interpolate_pos_encoding(table, 6, 6)[0, 1:])
    # timm's antialias bicubic uses a = -0.5, HF's plain bicubic a = -0.75: the two modes differ
    assert not torch.allclose(ours, resample_pos_embed_reference(table[0, 1:], (6, 6), (4, 4), mode="timm"))


def _hf_legacy_interpolate_pos_encoding(position_embeddings, new_h, new_w):
    """transformers < 4.44 / DINO interpolate_pos_encoding (scale_factor form), transcribed, with Idefics'
    fp32 upcast of a bf16 table."""
    class_pos, patch_pos = position_embeddings[:, :1], position_embeddings[:, 1:]
    dim, n = position_embeddings.shape[-1], position_embeddings.shape[1] - 1
    h0, w0 = new_h + 0.1, new_w + 0.1
    patch_pos = patch_pos.reshape(1, int(n**0.5), int(n**0.5), dim).permute(0, 3, 1, 2)
    upcast = patch_pos.dtype == torch.bfloat16
    patch_pos = F.interpolate(patch_pos.float() if upcast else patch_pos, scale_factor=(h0 / n**0.5, w0 / n**0.5),
                              mode="bicubic", align_corners=False)
    patch_pos = patch_pos.to(torch.bfloat16) if upcast else patch_pos
    return torch.cat((class_pos, patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)), dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_hf_legacy_parity(dtype):
    table = randn(1, 1 + 4 * 4, 10, dtype=dtype)
    ours = resample_pos_embed_reference(table[0, 1:], (7, 5), (4, 4), mode="hf_legacy")
    assert torch.equal(ours, _hf_legacy_interpolate_pos_encoding(table, 7, 5)[0, 1:])
    assert not torch.equal(ours, resample_pos_embed_reference(table[0, 1:], (7, 5), (4, 4), mode="hf"))


def test_hf_legacy_is_idefics_interpolation():
    """The transcription above against transformers' own Idefics vision embeddings, fp32 and bf16."""
    idefics = pytest.importorskip("transformers.models.idefics.vision",
                                  reason="transformers not installed; its math is tested above")
    from transformers import IdeficsConfig

    vision = IdeficsConfig().vision_config
    vision.image_size, vision.patch_size, vision.embed_dim = 16, 4, 8
    embeddings = idefics.IdeficsVisionEmbeddings(vision)
    for dtype in (torch.float32, torch.bfloat16):
        embeddings.to(dtype)
        table = embeddings.position_embedding.weight.detach()[None]
        theirs = embeddings.interpolate_pos_encoding(torch.zeros(1, 1 + 7 * 5, 8, dtype=dtype), 28, 20)
        assert torch.equal(theirs, _hf_legacy_interpolate_pos_encoding(table, 7, 5)), dtype


def test_parity_with_installed_libraries():
    timm_pos = pytest.importorskip("timm.layers.pos_embed", reason="timm not installed; its math is tested above")
    table = randn(1, 1 + 5 * 5, 12)
    assert torch.equal(resample_pos_embed_reference(table[0, 1:], (7, 6), (5, 5), mode="timm"),
                       timm_pos.resample_abs_pos_embed(table, (7, 6), (5, 5), num_prefix_tokens=1)[0, 1:])


# (P, train grid, image grid): a 224-trained 14x14 table at 336 / 448 has 21x21 / 28x28 grids (P = 16:
# 24x24); under the interpreter the grids are scaled down, plus one realistic case below
@pytest.mark.parametrize("train,grid", [((3, 3), (4, 5)), ((4, 4), (2, 3)), ((3, 4), (3, 4))], ids=["up", "down", "same"])
@pytest.mark.parametrize("mode,interp", [("timm", "bicubic"), ("hf", "bicubic"), ("hf_legacy", "bicubic"),
                                       ("timm", "bilinear")],
                         ids=["timm-bicubic", "hf-bicubic", "hf-legacy-bicubic", "timm-bilinear"])
def test_resampled_table_fwd_bwd(device, train, grid, mode, interp):
    P, C, D, B = 14, 3, 24, 2
    t = dict(images=randn(B, C, grid[0] * P, grid[1] * P, dtype=torch.float64),
             weight=randn(D, C, P, P, dtype=torch.float64, scale=0.05), bias=randn(D, dtype=torch.float64),
             pos_embed=randn(1, 1 + train[0] * train[1], D, dtype=torch.float64), cls_token=randn(D, dtype=torch.float64))
    check_against_reference(patch_embed, t, torch.float32, device, pos_grid=train, pos_resample=mode, interpolation=interp)


@pytest.mark.parametrize("image", [224, 336, 448], ids=["224", "336", "448"])
def test_224_table_at_higher_resolution(device, image):
    """A ViT-B/16 224 table (14x14 + [CLS]) used at 224, 336 (21x21 patches) and 448 (28x28); bf16, forward
    (small D keeps the interpreter fast; the full-width row count is covered in test_patch_embed.py)."""
    P, D = 16, 24
    t = dict(images=randn(1, 3, image, image, dtype=torch.float64), weight=randn(D, 3, P, P, dtype=torch.float64, scale=0.04),
             bias=randn(D, dtype=torch.float64), pos_embed=randn(1, 197, D, dtype=torch.float64),
             cls_token=randn(D, dtype=torch.float64))
    out, _ = check_against_reference(patch_embed, t, torch.bfloat16, device, grads=False)
    assert out.shape == (1, 1 + (image // P) ** 2, D)


def test_2d_row_col_tables(device):
    P, D = 16, 20
    t = dict(images=randn(2, 3, 4 * P, 5 * P, dtype=torch.float64), weight=randn(D, 3, P, P, dtype=torch.float64, scale=0.05),
             cls_token=randn(D, dtype=torch.float64))
    rows, cols = randn(4, 8, dtype=torch.float64), randn(4, 12, dtype=torch.float64)  # trained on 4x4, D/2 split 8 + 12

    def op(images, weight, cls_token, rows, cols, backend):
        return patch_embed(images, weight, cls_token=cls_token, pos_embed=(rows, cols), backend=backend)

    out, exact = check_against_reference(op, dict(t, rows=rows, cols=cols), torch.float32, device)
    # token (i, j) = cat(row[i], col[j]) on the image's own grid when no resampling is needed
    same = patch_embed(t["images"][:, :, : 4 * P, : 4 * P], t["weight"], pos_embed=(rows, cols), backend="reference")
    conv = F.conv2d(t["images"][:, :, : 4 * P, : 4 * P], t["weight"], stride=P).flatten(2).transpose(1, 2)
    expected = torch.cat([rows[:, None].expand(4, 4, 8), cols[None].expand(4, 4, 12)], -1).reshape(16, 20)
    assert torch.allclose(same - conv, expected.expand(2, 16, 20))


def test_resampled_table_is_cached_until_updated():
    pe_module._POS_CACHE.clear()
    table = torch.randn(16, 8)
    a = pe_module.resample_pos_embed(table, (5, 5), (4, 4))
    assert pe_module.resample_pos_embed(table, (5, 5), (4, 4)) is a
    table.add_(1.0)  # an optimizer step bumps the version: the cache must not serve the stale table
    b = pe_module.resample_pos_embed(table, (5, 5), (4, 4))
    assert b is not a and not torch.equal(a, b)
    leaf = torch.randn(16, 8, requires_grad=True)
    r = pe_module.resample_pos_embed(leaf, (5, 5), (4, 4))
    assert r.requires_grad and pe_module.resample_pos_embed(leaf, (5, 5), (4, 4)) is not r
    r.sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_cache_not_fooled_by_a_reused_address():
    """A freed table's memory is reused at once by the next one of its size (the next checkpoint of an
    eval sweep): the cache must not serve the old table's resampling for it (it did: same address,
    same version 0, same shape)."""
    pe_module._POS_CACHE.clear()
    for _ in range(8):
        old = torch.randn(16, 8)
        with torch.no_grad():
            pe_module.resample_pos_embed(old, (5, 5), (4, 4))
        del old
        new = torch.randn(16, 8)
        with torch.no_grad():
            got = pe_module.resample_pos_embed(new, (5, 5), (4, 4))
        assert torch.equal(got, resample_pos_embed_reference(new, (5, 5), (4, 4)))


def test_cache_entry_from_inference_mode_not_used_for_training(device):
    """An inference_mode eval then a training step with a frozen table (trainable conv) at the same
    resolution: the cached table of the eval is an inference tensor that autograd may not save (it
    raised 'Inference tensors cannot be saved for backward')."""
    pe_module._POS_CACHE.clear()
    x, w = randn(1, 3, 12, 12, device=device), randn(8, 3, 2, 2, device=device).requires_grad_()
    table = randn(16, 8, device=device)  # a 4 x 4 grid, resampled to the image's 6 x 6
    with torch.inference_mode():
        patch_embed(x, w, pos_embed=table, backend="triton")
    out = patch_embed(x, w, pos_embed=table, backend="triton")
    out.sum().backward()
    assert w.grad is not None


@pytest.mark.parametrize("cls", [False, True], ids=["patch-rows", "cls-row"])
def test_table_grid_not_told_by_its_size_needs_pos_grid(cls):
    """A 4x4 table on a 2x8 image has as many rows as the image's tokens (16, or 17 with a [CLS] row), but
    its grid differs: timm resamples it. Without pos_grid it was used as-is; now it raises, and with
    pos_grid=(4, 4) it is resampled as timm does."""
    P, D = 4, 6
    x, w = randn(2, 3, 2 * P, 8 * P, dtype=torch.float64), randn(D, 3, P, P, dtype=torch.float64)
    table = randn(1, 16 + cls, D, dtype=torch.float64)
    kw = dict(cls_token=randn(D, dtype=torch.float64)) if cls else {}
    with pytest.raises(ValueError, match="pass pos_grid"):
        patch_embed(x, w, pos_embed=table, **kw, backend="reference")
    got = patch_embed(x, w, pos_embed=table, pos_grid=(4, 4), **kw, backend="reference")
    conv = F.conv2d(x, w, stride=P).flatten(2).transpose(1, 2)
    expected = _timm_resample_abs_pos_embed(table, (2, 8), (4, 4), num_prefix_tokens=int(cls))
    if cls:
        expected = torch.cat([expected[:, :1] + kw["cls_token"], expected[:, 1:] + conv[:1]], 1)
    else:
        expected = expected + conv[:1]
    torch.testing.assert_close(got[:1], expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rows,grid,table_grid", [
    (16, (4, 4), None),  # square image grid: a square table of its size is on it
    (17, (4, 4), None),
    (16, (5, 5), None),  # a square table on another grid: resampled
    (15, (3, 5), (3, 5)),  # a non-square table: 3x5, 5x3 or 1x15 cannot be told apart
    (12, (3, 5), (3, 4)),
], ids=["4x4-on-4x4", "4x4+cls-on-4x4", "4x4-on-5x5", "15-on-3x5", "12-on-3x5"])
def test_table_grid_from_size(rows, grid, table_grid):
    """Without pos_grid only a square table (s*s rows, or s*s + 1 with a [CLS] row) tells its grid."""
    P, D = 2, 4
    x, w = randn(1, 3, grid[0] * P, grid[1] * P), randn(D, 3, P, P)
    table, cls = randn(rows, D), randn(D)
    if table_grid is None:
        out = patch_embed(x, w, pos_embed=table, cls_token=cls, backend="reference")
    else:
        with pytest.raises(ValueError, match="pass pos_grid"):
            patch_embed(x, w, pos_embed=table, cls_token=cls, backend="reference")
        out = patch_embed(x, w, pos_embed=table, cls_token=cls, pos_grid=table_grid, backend="reference")
    assert out.shape == (1, 1 + grid[0] * grid[1], D)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_table_made_under_inference_mode_is_resampled(device, backend):
    """A table created inside inference_mode (a sin-cos table built in the forward of an eval pass, or a
    model loaded under it): resampling it raised 'Inference tensors do not track version counter' (the
    cache keys on the table's version). Such a table is resampled without the cache."""
    x, w = randn(1, 3, 12, 12, device=device), randn(8, 3, 2, 2, device=device)
    with torch.inference_mode():
        table = randn(16, 8, device=device)  # a 4 x 4 grid, resampled to the image's 6 x 6
        got = patch_embed(x, w, pos_embed=table, backend=backend)
        want = patch_embed(x, w, pos_embed=resample_pos_embed_reference(table, (6, 6), (4, 4)), backend=backend)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        table.add_(1.0)  # an inference tensor changes without a version bump: nothing may be cached for it
        want = patch_embed(x, w, pos_embed=resample_pos_embed_reference(table, (6, 6), (4, 4)), backend=backend)
        torch.testing.assert_close(patch_embed(x, w, pos_embed=table, backend=backend), want, rtol=0, atol=0)


def test_frozen_table_made_under_inference_mode_trains():
    """A frozen position table made under inference_mode, then a training step (trainable conv): the Triton
    path saved the table for backward, which autograd refuses for an inference tensor (the eager chain only
    adds it, saving nothing, and ran). d_weight matches the reference."""
    x, w = randn(2, 3, 12, 12), randn(8, 3, 2, 2)
    with torch.inference_mode():
        table = randn(36, 8)  # the image's own 6 x 6 grid: used as is, no resampling
    grads = {}
    for backend in ("triton", "reference"):
        leaf = w.clone().requires_grad_()
        patch_embed(x, leaf, pos_embed=table, backend=backend).sum().backward()
        grads[backend] = leaf.grad
    exact = w.double().requires_grad_()
    patch_embed(x.double(), exact, pos_embed=table.double(), backend="reference").sum().backward()
    assert_close_by_rule(grads["triton"], exact.grad, grads["reference"], factor=3.0, what="d_weight")
