"""patch_embed / tile_patch_embed and the op contract: fp32 matmul precision follows
torch.get_float32_matmul_precision(), autocast behaves as the eager chain the op replaces (timm's ViT,
Mllama's), float64 runs on the reference backend only, and every argument is validated, naming it."""
import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close_by_rule, generator, max_abs_error, randn
from optional_deps import optional_import, requires
from patch_embed_helpers import poisoned_outputs  # noqa: F401

from mmfast.kernels import patch_embed, tile_patch_embed
from mmfast.kernels.patch_embed import mae_keep_indices, resample_pos_embed, vit_masked_patch_sampler

timm_vit = optional_import("timm.models.vision_transformer")
# the tests against an eager chain: patch_embed's is timm's ViT (needs timm), tile_patch_embed's is transcribed
EAGER_OPS = [pytest.param("patch_embed", marks=requires("timm.models.vision_transformer")), "tile_patch_embed"]

P, C, D, GRID, B = 14, 3, 24, (2, 3), 2
R, T = 5, 3  # tiles: aspect-ratio ids, tiles per image


class _TimmChain(torch.nn.Module):
    """timm's VisionTransformer up to the blocks: patch_embed (conv, flatten, transpose) + _pos_embed."""

    def __init__(self, grid):
        super().__init__()
        self.vit = timm_vit.VisionTransformer(img_size=(grid[0] * P, grid[1] * P), patch_size=P, in_chans=C,
                                              embed_dim=D, depth=0, num_heads=1, num_classes=0)

    def forward(self, images):
        return self.vit._pos_embed(self.vit.patch_embed(images))


def timm_chain(images, weight, bias, pos_embed, cls_token):
    chain = _TimmChain(GRID).to(images.device)
    params = {"vit.patch_embed.proj.weight": weight, "vit.patch_embed.proj.bias": bias, "vit.pos_embed": pos_embed,
              "vit.cls_token": cls_token}
    return torch.func.functional_call(chain, params, (images,))


def mllama_chain(images, weight, cls_token, pos_embed, pos_gate, tile_pos_embed, tile_embed, tile_embed_gate,
                 aspect_ratio_ids):
    """transformers' MllamaVisionModel up to the pre-layernorm, transcribed (transformers is not installed):
    patch_embedding (bias-free conv), pre_tile_positional_embedding, apply_class_embedding,
    gated_positional_embedding."""
    b, t = images.shape[:2]
    x = F.conv2d(images.flatten(0, 1), weight, stride=weight.shape[-1]).flatten(2).transpose(1, 2)
    n, d = x.shape[1:]
    x = x.reshape(b, t, n, d)
    x = x + F.embedding(aspect_ratio_ids, tile_embed).reshape(b, t, 1, d) * tile_embed_gate.tanh()
    x = torch.cat([cls_token.expand(b * t, 1, d), x.reshape(b * t, n, d)], dim=1).reshape(b, t, n + 1, d)
    x = x + ((1 - pos_gate.tanh()) * pos_embed).view(1, 1, n + 1, d)
    return x + pos_gate.tanh() * F.embedding(aspect_ratio_ids, tile_pos_embed).reshape(b, t, n + 1, d)


def _vit_masters():
    N = GRID[0] * GRID[1]
    return dict(images=randn(B, C, GRID[0] * P, GRID[1] * P, dtype=torch.float64),
                weight=randn(D, C, P, P, dtype=torch.float64, scale=(C * P * P) ** -0.5),
                bias=randn(D, dtype=torch.float64), pos_embed=randn(1, N + 1, D, dtype=torch.float64),
                cls_token=randn(1, 1, D, dtype=torch.float64))


def _tile_masters():
    N = GRID[0] * GRID[1]
    return dict(images=randn(B, T, C, GRID[0] * P, GRID[1] * P, dtype=torch.float64),
                weight=randn(D, C, P, P, dtype=torch.float64, scale=(C * P * P) ** -0.5),
                cls_token=randn(D, dtype=torch.float64), pos_embed=randn(N + 1, D, dtype=torch.float64),
                pos_gate=randn(1, dtype=torch.float64), tile_pos_embed=randn(R, T * (N + 1) * D, dtype=torch.float64),
                tile_embed=randn(R, T * D, dtype=torch.float64), tile_embed_gate=randn(1, dtype=torch.float64))


def _ours(op, backend, **fixed):
    fn = patch_embed if op == "patch_embed" else tile_patch_embed

    def call(**t):
        if op == "patch_embed":
            return fn(t["images"], t["weight"], t["bias"], pos_embed=t["pos_embed"], cls_token=t["cls_token"],
                      pos_grid=GRID, backend=backend)
        return fn(**t, **fixed, backend=backend)
    return call


def _eager(op, **fixed):
    if op == "patch_embed":
        return lambda **t: timm_chain(**t)
    return lambda **t: mllama_chain(**t, **fixed)


def _fwd_bwd(fn, masters, dtypes, device, gout, autocast=None):
    """(output, {name: grad}) of fn on fresh leaves (masters in dtypes[name]), optionally under CPU/CUDA autocast."""
    leaves = {k: v.to(device=device, dtype=dtypes[k]).requires_grad_() for k, v in masters.items()}
    with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
        out = fn(**leaves)
    out.backward(gout.to(device=device, dtype=out.dtype))
    return out, {k: v.grad for k, v in leaves.items()}


def _assert_rule(got, got_g, exact, exact_g, same, same_g, factors=(2.0, 3.0)):
    assert_close_by_rule(got, exact, same, factor=factors[0], what="output")
    for k in exact_g:
        floor = None
        if exact_g[k].numel() == 1:  # a gate: one fp32 sum over every output, in another order than torch's
            floor = 32 * torch.finfo(torch.float32).eps * exact_g[k].abs().item() + 1e-6
        assert_close_by_rule(got_g[k], exact_g[k], same_g[k], factor=factors[1], floor=floor, what=f"d_{k}")


def _upstream_grad(op, masters, fixed):
    """A random dOut of the op's output shape (fp64)."""
    shape = _ours(op, "reference", **{k: v.cpu() for k, v in fixed.items()})(**masters).shape
    return randn(*shape, dtype=torch.float64)


def _fixed(device):
    return dict(aspect_ratio_ids=torch.randint(0, R, (B,), generator=generator()).to(device))


# ----------------------------------------------------------------------------------------------
# fp32 matmul precision


def _tf32(t):
    """Round fp32 values to TF32 (10 mantissa bits, to nearest, ties away), as cvt.rna.tf32.f32 does."""
    bits = t.to(torch.float32).view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32).to(t.dtype)


@pytest.mark.parametrize("op", ["patch_embed", "tile_patch_embed"])
def test_fp32_highest_is_ieee(device, matmul_precision, op):
    """"highest" (torch's default): IEEE fp32 dots, within 2x of PyTorch's fp32 error (TF32 is ~1000x)."""
    matmul_precision("highest")
    masters = _vit_masters() if op == "patch_embed" else _tile_masters()
    fixed = {} if op == "patch_embed" else _fixed(device)
    gout = _upstream_grad(op, masters, fixed)
    fp32 = {k: torch.float32 for k in masters}
    got, got_g = _fwd_bwd(_ours(op, "triton", **fixed), masters, fp32, device, gout.float())
    quantized = {k: v.float().double() for k, v in masters.items()}
    exact, exact_g = _fwd_bwd(_ours(op, "reference", **fixed), quantized, {k: torch.float64 for k in masters}, device,
                              gout.float().double())
    same, same_g = _fwd_bwd(_ours(op, "reference", **fixed), masters, fp32, device, gout.float())
    _assert_rule(got, got_g, exact, exact_g, same, same_g)


@pytest.mark.parametrize("op", ["patch_embed", "tile_patch_embed"])
def test_fp32_high_is_tf32(device, matmul_precision, op):
    """"high": the GEMMs (output, d_images, d_weight) run TF32: their error is TF32's (that of the exact
    computation on TF32-rounded operands), far above fp32's, which proves the setting reaches the kernels."""
    masters = _vit_masters() if op == "patch_embed" else _tile_masters()
    fixed = {} if op == "patch_embed" else _fixed(device)
    gout = _upstream_grad(op, masters, fixed)
    gout = gout.float()
    fp32, fp64 = {k: torch.float32 for k in masters}, {k: torch.float64 for k in masters}
    quantized = {k: v.float().double() for k, v in masters.items()}
    matmul_precision("highest")
    exact, exact_g = _fwd_bwd(_ours(op, "reference", **fixed), quantized, fp64, device, gout.double())
    same, same_g = _fwd_bwd(_ours(op, "reference", **fixed), masters, fp32, device, gout)
    # the TF32 yardstick: exact math on TF32-rounded GEMM operands (images, weight; dOut for the gradients)
    rounded = dict(quantized, images=_tf32(quantized["images"].float()).double(),
                   weight=_tf32(quantized["weight"].float()).double())
    tf32, tf32_g = _fwd_bwd(_ours(op, "reference", **fixed), rounded, fp64, device, _tf32(gout).double())
    matmul_precision("high")
    got, got_g = _fwd_bwd(_ours(op, "triton", **fixed), masters, fp32, device, gout)
    # the GPU's TF32 MMA truncates the operands where the interpreter rounds them: allow twice the error there
    slack = 2.0 if torch.device(device).type == "cuda" else 1.0
    pairs = [("output", got, exact, same, tf32)] + [
        (f"d_{k}", got_g[k], exact_g[k], same_g[k], tf32_g[k]) for k in ("images", "weight")]
    for what, g, e, s, t in pairs:
        err, fp32_err, tf32_err = max_abs_error(g, e), max_abs_error(s, e), max_abs_error(t, e)
        assert err > 8 * fp32_err, f"{what}: error {err:.2e} is at fp32 level ({fp32_err:.2e}): TF32 did not run"
        assert err <= 2 * slack * tf32_err + 1e-6, f"{what}: error {err:.2e} above TF32's {tf32_err:.2e}"


# ----------------------------------------------------------------------------------------------
# Autocast


@pytest.mark.parametrize("params", [torch.float32, torch.bfloat16], ids=["fp32-params", "bf16-params"])
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("op", EAGER_OPS)
def test_autocast_matches_eager_chain(device, op, backend, params):
    """Under autocast(bf16) with fp32 images: the conv operands are cast to bf16 as F.conv2d's autocast does,
    the tables are not; the output dtype is the eager chain's (fp32 tables promote the sum: fp32; a bf16
    model: bf16), its values within the rule of the eager chain's, gradients in the leaves' dtypes."""
    masters = _vit_masters() if op == "patch_embed" else _tile_masters()
    fixed = {} if op == "patch_embed" else _fixed(device)
    dtypes = {k: torch.float32 if k == "images" else params for k in masters}
    conv_args = ("images", "weight", "bias")
    ours, eager = _ours(op, backend, **fixed), _eager(op, **fixed)
    with torch.no_grad(), torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        shape = eager(**{k: v.to(device=device, dtype=dtypes[k]) for k, v in masters.items()}).shape
    gout = randn(*shape, dtype=torch.float64)
    got, got_g = _fwd_bwd(ours, masters, dtypes, device, gout, autocast=torch.bfloat16)
    same, same_g = _fwd_bwd(eager, masters, dtypes, device, gout, autocast=torch.bfloat16)
    assert got.dtype == same.dtype == (torch.float32 if params == torch.float32 else torch.bfloat16)
    for k in masters:
        assert got_g[k].dtype == same_g[k].dtype == dtypes[k], k
    # exact: the autocast math in fp64 (conv operands rounded to bf16, tables in their dtype, dOut as given)
    exact_in = {k: v.to(torch.bfloat16 if k in conv_args else dtypes[k]).double() for k, v in masters.items()}
    exact, exact_g = _fwd_bwd(eager, exact_in, {k: torch.float64 for k in masters}, device,
                              gout.to(got.dtype).double())
    _assert_rule(got, got_g, exact, exact_g, same, same_g)
    if backend == "triton" and got.dtype == torch.float32:
        # fp32 tokens from bf16-rounded conv operands (fp32 accumulation): far closer to the exact math on
        # the rounded operands than to the one on the fp32 operands, so the cast did happen
        unrounded, _ = _fwd_bwd(eager, masters, {k: torch.float64 for k in masters}, device, gout.double())
        assert 10 * max_abs_error(got, exact) < max_abs_error(got, unrounded)


# ----------------------------------------------------------------------------------------------
# float64


@pytest.mark.parametrize("op", EAGER_OPS)
def test_float64_reference_matches_eager_chain(op):
    masters = _vit_masters() if op == "patch_embed" else _tile_masters()
    fixed = {} if op == "patch_embed" else _fixed("cpu")
    fp64 = {k: torch.float64 for k in masters}
    gout = randn(*_eager(op, **fixed)(**masters).shape, dtype=torch.float64)
    got, got_g = _fwd_bwd(_ours(op, "reference", **fixed), masters, fp64, "cpu", gout)
    want, want_g = _fwd_bwd(_eager(op, **fixed), masters, fp64, "cpu", gout)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for k in masters:
        assert got_g[k].dtype == torch.float64
        torch.testing.assert_close(got_g[k], want_g[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("arg", ["images", "bias", "pos_embed", "cls_token", "mask_token"])
def test_triton_rejects_float64_naming_it(device, arg):
    t = {k: v.float().to(device) for k, v in _vit_masters().items()}
    t["mask_token"] = randn(D, device=device)
    if arg == "images":
        t["weight"], t["bias"] = t["weight"].double(), t["bias"].double()
    t[arg] = t[arg].double()
    token_mask = torch.zeros(B, GRID[0] * GRID[1], dtype=torch.bool, device=device)
    kw = dict(pos_embed=t["pos_embed"], cls_token=t["cls_token"], pos_grid=GRID, token_mask=token_mask,
              mask_token=t["mask_token"])
    with pytest.raises(ValueError, match=f"{arg} (must be float16, bfloat16 or float32|dtype)"):
        patch_embed(t["images"], t["weight"], t["bias"], **kw, backend="triton")
    if arg != "bias":  # (a float64 bias beside fp32 images fails F.conv2d too)
        assert patch_embed(t["images"], t["weight"], t["bias"], **kw, backend="reference").dtype == torch.float64


@pytest.mark.parametrize("arg", ["images", "pos_embed", "pos_gate", "tile_pos_embed", "tile_embed", "tile_embed_gate"])
def test_tile_triton_rejects_float64_naming_it(device, arg):
    t = {k: v.float().to(device) for k, v in _tile_masters().items()}
    if arg == "images":
        t["weight"] = t["weight"].double()
    t[arg] = t[arg].double()
    with pytest.raises(ValueError, match=f"{arg} must be float16, bfloat16 or float32"):
        tile_patch_embed(**t, **_fixed(device), backend="triton")


# ----------------------------------------------------------------------------------------------
# Arguments and scalars


def _small():
    x, w = torch.randn(2, 3, 28, 28), torch.randn(8, 3, 14, 14)
    return x, w, torch.randn(5, 8)


def _ids(cases):
    """Readable test ids: the keyword arguments of each (kwargs, expected message) case."""
    def one(kwargs):
        return "-".join(f"{k}={v!r}" if not isinstance(v, torch.Tensor) else f"{k}={str(v.dtype)[6:]}{list(v.shape)}"
                        for k, v in kwargs.items()).replace(" ", "")[:40]
    return [one(kwargs) for kwargs, _ in cases]


_BAD_PATCH_EMBED_ARGS = [
    (dict(dynamic_pad="yes"), "dynamic_pad must be True or False"),
    (dict(interpolation="nearest"), "interpolation must be one of"),
    (dict(pos_resample="mmfast"), "pos_resample must be one of"),
    (dict(pos_grid=(0, 4)), r"pos_grid\[0\] must be in \[1, inf\]"),
    (dict(pos_grid=(2.0, 2)), r"pos_grid\[0\] must be an int"),
    (dict(pos_grid=4), "pos_grid must be a pair"),
    (dict(bias=torch.randn(8, dtype=torch.bfloat16)), "bias dtype"),
    (dict(bias=torch.randn(9)), "bias must be a floating tensor with D = 8"),
    (dict(cls_token=torch.randn(2, 8)), "cls_token must be a floating tensor with D = 8"),
    (dict(backend="cuda"), "backend"),
    (dict(images=torch.ones(2, 3, 28, 28, dtype=torch.long)), "images must be a floating tensor"),
    (dict(weight=torch.randn(8, 3, 14, 7)), "weight must be"),
]


@pytest.mark.parametrize("kwargs,match", _BAD_PATCH_EMBED_ARGS, ids=_ids(_BAD_PATCH_EMBED_ARGS))
def test_patch_embed_arguments_named(kwargs, match):
    x, w, pos = _small()
    args = dict(images=x, weight=w, bias=None, pos_embed=pos, cls_token=torch.randn(8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        patch_embed(args.pop("images"), args.pop("weight"), args.pop("bias"), **args)


@pytest.mark.parametrize("gate", ["pos_gate", "tile_embed_gate"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_tile_gates_checked_on_device(gate, value):
    """The gates are tensor scalars: a non-finite one fails a device-side check (on the CPU at once), no host sync."""
    t = {k: v.float() for k, v in _tile_masters().items()}
    t[gate] = torch.full((1,), value)
    with pytest.raises(RuntimeError, match=f"{gate} must be finite"):
        tile_patch_embed(**t, **_fixed("cpu"), backend="reference")
    with pytest.raises(ValueError, match=f"{gate} must be a 1-element tensor"):
        tile_patch_embed(**dict(t, **{gate: torch.zeros(2)}), **_fixed("cpu"), backend="reference")


_BAD_SAMPLER_ARGS = [
    (dict(mask_ratio=float("nan")), "mask_ratio must be finite"),
    (dict(mask_ratio=1.5), r"mask_ratio must be in \[0.0, 1.0\]"),
    (dict(mask_ratio=torch.tensor(0.5)), "mask_ratio must be a Python number"),
    (dict(p_mask=-0.1), "p_mask must be in"),
    (dict(p_random=float("inf")), "p_random must be finite"),
    (dict(p_mask=0.8, p_random=0.3), r"p_mask \+ p_random must be <= 1"),
    (dict(batch=-1), r"batch must be in \[0, inf\]"),
    (dict(num_patches=0), r"num_patches must be in \[1, inf\]"),
    (dict(num_patches=1), "needs num_patches >= 2"),
    (dict(batch=2.0), "batch must be an int"),
]


@pytest.mark.parametrize("kwargs,match", _BAD_SAMPLER_ARGS, ids=_ids(_BAD_SAMPLER_ARGS))
def test_vit_sampler_arguments(kwargs, match):
    args = dict(batch=2, num_patches=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        vit_masked_patch_sampler(args.pop("batch"), args.pop("num_patches"), **args)


_BAD_MAE_ARGS = [
    (dict(mask_ratio=float("nan")), "mask_ratio must be finite"),
    (dict(mask_ratio=-0.5), "mask_ratio must be in"),
    (dict(num_patches=-3), "num_patches must be in"),
]


@pytest.mark.parametrize("kwargs,match", _BAD_MAE_ARGS, ids=_ids(_BAD_MAE_ARGS))
def test_mae_keep_indices_arguments(kwargs, match):
    args = dict(batch=2, num_patches=16)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        mae_keep_indices(args.pop("batch"), args.pop("num_patches"), **args)


@pytest.mark.parametrize("args,match", [
    (((5, 0), (4, 4)), r"new_grid\[1\] must be in"),
    (((5, 5), (4, 4, 1)), "old_grid must be a pair"),
    (((5, 5), (3, 4)), "table has 16 rows but old_grid"),
], ids=["zero-grid", "not-a-pair", "rows"])
def test_resample_pos_embed_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        resample_pos_embed(torch.randn(16, 8), *args)
    with pytest.raises(ValueError, match="mode must be one of"):
        resample_pos_embed(torch.randn(16, 8), (5, 5), (4, 4), mode="nearest")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_repeated_keep_indices_raise(backend):
    """A patch kept twice: the Triton d_images kernel maps each patch to one kept token, so the second
    token's gradient was silently dropped. MAE keeps each patch at most once: repeats raise, naming them."""
    x, w = torch.randn(2, 3, 28, 28), torch.randn(8, 3, 14, 14)
    with pytest.raises(ValueError, match="keep_indices values must be distinct"):
        patch_embed(x, w, keep_indices=torch.tensor([[0, 3, 0], [1, 2, 3]]), backend=backend)
    out = patch_embed(x, w, keep_indices=torch.tensor([[0, 3, 1], [1, 2, 3]]), backend=backend)  # distinct: fine
    assert out.shape == (2, 3, 8)


@pytest.mark.parametrize("op", ["patch_embed", "tile_patch_embed"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("empty", ["C", "H", "W"])
def test_empty_image_dims_raise(op, backend, empty):
    """An image with no channels or no pixel rows / columns: the reference's F.conv2d crashed (H, W) or
    returned D = 0 features (C), the kernels returned something else; now both raise, naming images."""
    shape = dict(C=3, H=28, W=28)
    shape[empty] = 0
    if op == "patch_embed":
        x, w = torch.randn(2, shape["C"], shape["H"], shape["W"]), torch.randn(8, shape["C"], 14, 14)
        call = lambda: patch_embed(x, w, backend=backend)  # noqa: E731
    else:
        t = {k: v.float() for k, v in _tile_masters().items()}
        B_, T_ = t["images"].shape[:2]
        t["images"] = torch.randn(B_, T_, shape["C"], shape["H"], shape["W"])
        t["weight"] = torch.randn(t["weight"].shape[0], shape["C"], P, P)
        call = lambda: tile_patch_embed(**t, **_fixed("cpu"), backend=backend)  # noqa: E731
    with pytest.raises(ValueError, match=f"{op}: images must have C, H and W >= 1"):
        call()
