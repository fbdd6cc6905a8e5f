"""patch_embed core: the fused conv-as-GEMM + bias + position embedding + [CLS], forward and backward,
against the eager chain (F.conv2d + flatten + transpose + add + cat) in fp64."""
import importlib

import pytest
import torch
from numerics import assert_close_by_rule, dtype_id, randn
from patch_embed_helpers import check_against_reference, poisoned_outputs  # noqa: F401

from mmfast.kernels import patch_embed

# (P, C, D, grid h x w, B): odd D, K = C*P*P not a multiple of the block (588 for P=14, C=3)
SHAPES = [
    (14, 3, 200, (2, 3), 2),
    (16, 3, 17, (3, 5), 1),
    (14, 1, 33, (3, 2), 3),
    (16, 1, 8, (1, 1), 2),
]


def _shape_id(s):
    P, C, D, (gh, gw), B = s
    return f"P{P}-C{C}-D{D}-{gh}x{gw}-B{B}"


def _tensors(P, C, D, grid, B, *, bias=True, cls=True, pos="cls_row", layout="nchw"):
    H, W = grid[0] * P, grid[1] * P
    images = randn(B, C, H, W, dtype=torch.float64)
    if layout == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a crop of a bigger batch, every stride non-trivial
        images = randn(B + 1, C + 1, H + 3, W + 5, dtype=torch.float64)[1:, 1:, 2 : H + 2, 3 : W + 3]
    N = grid[0] * grid[1]
    return dict(
        images=images,
        weight=randn(D, C, P, P, dtype=torch.float64, scale=(C * P * P) ** -0.5),
        bias=randn(D, dtype=torch.float64) if bias else None,
        pos_embed=randn(N + (pos == "cls_row"), D, dtype=torch.float64, scale=0.5) if pos else None,
        cls_token=randn(1, 1, D, dtype=torch.float64) if cls else None,
    )


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_forward_backward(device, shape, dtype):
    check_against_reference(patch_embed, _tensors(*shape), dtype, device, pos_grid=shape[3])


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_memory_layouts(device, layout):
    check_against_reference(patch_embed, _tensors(14, 3, 40, (2, 3), 2, layout=layout), torch.bfloat16, device,
                            pos_grid=(2, 3))


def test_strided_parameters(device):
    """Weight, bias, table and [CLS] given as non-contiguous views (transposed / every other element)."""
    t = _tensors(14, 3, 24, (2, 3), 2)
    t["weight"] = randn(3, 14, 14, 24, dtype=torch.float64, scale=0.05).permute(3, 0, 1, 2)
    t["bias"] = randn(48, dtype=torch.float64)[::2]
    t["pos_embed"] = randn(24, 7, dtype=torch.float64).t()
    t["cls_token"] = randn(24, 2, dtype=torch.float64)[:, 1]
    check_against_reference(patch_embed, t, torch.float32, device, pos_grid=(2, 3))


def test_fp16(device):
    check_against_reference(patch_embed, _tensors(16, 3, 24, (2, 2), 2), torch.float16, device, pos_grid=(2, 2))


@pytest.mark.parametrize("bias,cls,pos", [(False, False, None), (True, False, "patch_only"), (False, True, "patch_only"),
                                          (True, True, None)], ids=["conv-only", "pos-no-cls", "cls-no-pos-row", "cls-no-pos"])
def test_optional_parts(device, bias, cls, pos):
    out, exact = check_against_reference(patch_embed, _tensors(16, 3, 24, (2, 3), 2, bias=bias, cls=cls, pos=pos),
                                         torch.float32, device, pos_grid=(2, 3) if pos else None)
    assert out.shape == (2, 6 + cls, 24)


def test_realistic_vit_b16_224(device):
    """One full-size row count: ViT-B/16 at 224 (197 tokens), D = 768, [CLS] + table with [CLS] row."""
    t = _tensors(16, 3, 768, (14, 14), 1)
    check_against_reference(patch_embed, t, torch.bfloat16, device, grads=False)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_dynamic_pad(device, layout):
    t = _tensors(14, 3, 24, (2, 3), 2, pos="patch_only")
    t["images"] = t["images"][:, :, : 2 * 14 - 5, : 3 * 14 - 1].contiguous()  # 23 x 41 -> padded to 28 x 42
    if layout == "channels_last":
        t["images"] = t["images"].contiguous(memory_format=torch.channels_last)
    check_against_reference(patch_embed, t, torch.float32, device, dynamic_pad=True, pos_grid=(2, 3))


@pytest.mark.parametrize("P", [14, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_alignment_hint_is_true(P, dtype):
    """The GPU-only vectorization hint (ALIGN, invisible to the interpreter): every pixel-run start the
    kernels form (patch base + c * s_c + py * s_h, channels-last: patch base + py * s_h) must be a
    multiple of the claimed ALIGN."""
    pe_launch = importlib.import_module("mmfast.kernels.patch_embed._launch")
    layouts = {
        "224": torch.empty(2, 3, 224, 224, dtype=dtype),
        "odd-width": torch.empty(2, 3, 3 * P, 5 * P + 3, dtype=dtype)[..., : 5 * P],
        "crop": torch.empty(2, 4, 6 * P, 6 * P, dtype=dtype)[:, 1:, P:, 2:2 + 4 * P],
        "channels-last": torch.empty(2, 3, 2 * P, 2 * P, dtype=dtype).contiguous(memory_format=torch.channels_last),
    }
    for name, img in layouts.items():
        gh, gw = img.shape[-2] // P, img.shape[-1] // P
        plan = pe_launch.Plan(B=2, T=1, C=img.shape[1], P=P, GH=gh, GW=gw, H=img.shape[-2], W=img.shape[-1], N=gh * gw,
                              M=gh * gw, has_cls=False, pad=False, cl_order=img.stride(1) == 1 and img.shape[1] > 1,
                              perm=None, src_idx=None, pos_idx=None, tok_mask=None, tile_used=None, ar_ids=None,
                              keep=None, tiles=False)
        align = pe_launch._align(img, plan)
        sb, sc, sh, sw = img.stride()
        # runs: NCHW one per (c, py) of a patch; channels-last one per py (px and c interleaved)
        channels = range(1) if plan.cl_order else range(img.shape[1])
        starts = {b * sb + gy * P * sh + gx * P * sw + c * sc + py * sh
                  for b in range(2) for gy in range(gh) for gx in range(gw) for c in channels for py in range(P)}
        assert all(v % align == 0 for v in starts), (name, align)
        if name == "224" and P == 16:
            assert align == 16 // img.element_size()  # the common case does get 16-byte vectors


def test_nn_conv2d_weights_drop_in(device):
    conv = torch.nn.Conv2d(3, 40, kernel_size=14, stride=14).to(device)
    x = torch.randn(2, 3, 28, 42, device=device)
    with torch.no_grad():
        same = conv(x).flatten(2).transpose(1, 2)
        exact = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride=14)
        got = patch_embed(x, conv.weight, conv.bias, backend="triton")
    assert_close_by_rule(got, exact.flatten(2).transpose(1, 2), same, what="nn.Conv2d weights")


def test_validation_errors():
    """CPU tensors: argument checks run before any backend is chosen (index ranges on CUDA tensors are
    checked by a device-side assert instead, to keep the training step free of host syncs)."""
    x = torch.randn(2, 3, 28, 28)
    w = torch.randn(8, 3, 14, 14)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        patch_embed(torch.randn(2, 3, 29, 28), w)
    with pytest.raises(ValueError, match="input channels"):
        patch_embed(torch.randn(2, 1, 28, 28), w)
    with pytest.raises(ValueError, match="weight dtype"):
        patch_embed(x, w.bfloat16())
    with pytest.raises(ValueError, match="weight must be"):
        patch_embed(x, torch.randn(8, 3, 14, 7))
    with pytest.raises(ValueError, match="images must be a 4-D"):
        patch_embed(x[0], w)
    with pytest.raises(ValueError, match="bias"):
        patch_embed(x, w, torch.randn(9))
    with pytest.raises(ValueError, match="pass pos_grid"):
        patch_embed(x, w, pos_embed=torch.randn(7, 8))
    with pytest.raises(ValueError, match="cls_token is None"):
        patch_embed(x, w, pos_embed=torch.randn(5, 8))
    with pytest.raises(ValueError, match="together"):
        patch_embed(x, w, token_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_mask must be"):
        patch_embed(x, w, token_mask=torch.zeros(2, 5, dtype=torch.bool), mask_token=torch.randn(8))
    with pytest.raises(ValueError, match="keep_indices values"):
        patch_embed(x, w, keep_indices=torch.tensor([[0, 4], [1, 2]]))
    with pytest.raises(ValueError, match="backend"):
        patch_embed(x, w, backend="cuda")
    with pytest.raises(ValueError, match="cls_token is on meta"):
        patch_embed(x, w, cls_token=torch.randn(8, device="meta"))
    with pytest.raises(ValueError, match="pos_embed must be a floating tensor"):
        patch_embed(x, w, pos_embed=torch.ones(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"pos_embed\[1\] must be a floating tensor"):
        patch_embed(x, w, pos_embed=(torch.randn(2, 4), [[0.0] * 4] * 2))


def test_harness_poisons_kernel_outputs():
    """The autouse fixture makes every launcher allocation NaN, so unwritten elements fail the rule."""
    pe_launch = importlib.import_module("mmfast.kernels.patch_embed._launch")
    assert torch.isnan(pe_launch._empty(3, device="cpu", dtype=torch.float32)).all()
    assert torch.isnan(pe_launch._empty_like(torch.zeros(2, 2))).all()


@pytest.mark.parametrize("case", ["empty-batch", "mae-keeps-none"])
def test_degenerate_sizes(device, case):
    t = _tensors(16, 3, 8, (2, 2), 0 if case == "empty-batch" else 2)
    kw = {"keep_indices": torch.zeros(2, 0, dtype=torch.long, device=device)} if case == "mae-keeps-none" else {}
    out, exact = check_against_reference(patch_embed, t, torch.float32, device, **kw)
    assert out.shape == exact.shape == ((0, 5, 8) if case == "empty-batch" else (2, 1, 8))
