"""mmfast.nn.PatchEmbed: timm's PatchEmbed + cls_token + pos_embed handling, and from_conv."""
import copy

import pytest
import torch
import torch.nn.functional as F
from numerics import assert_close_by_rule, randn

from mmfast.kernels.reference import resample_pos_embed_reference
from mmfast.nn import PatchEmbed

BACKENDS = ["reference", "triton"]


def _eager(m, x):
    """timm's VisionTransformer: patch_embed (conv, flatten, transpose) then _pos_embed, written out."""
    P = m.patch_size[0]
    if m.dynamic_img_pad:
        x = F.pad(x, (0, (P - x.shape[-1] % P) % P, 0, (P - x.shape[-2] % P) % P))
    y = m.proj(x).flatten(2).transpose(1, 2)
    grid = (x.shape[-2] // P, x.shape[-1] // P)
    prefix = 0 if m.no_embed_class or m.cls_token is None else 1
    pos = m.pos_embed[0]
    pos = torch.cat([pos[:prefix], resample_pos_embed_reference(pos[prefix:], grid, m.grid_size)])
    cls = m.cls_token.expand(x.shape[0], -1, -1) if m.cls_token is not None else None
    if m.no_embed_class:
        y = y + pos
        return torch.cat([cls, y], 1) if cls is not None else y
    y = torch.cat([cls, y], 1) if cls is not None else y
    return y + pos


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw,size", [
    (dict(), (48, 48)),
    (dict(no_embed_class=True), (48, 48)),
    (dict(class_token=False), (48, 48)),
    (dict(dynamic_img_size=True), (64, 80)),
    (dict(dynamic_img_size=True, dynamic_img_pad=True), (50, 61)),
], ids=["vit", "no-embed-class", "no-cls", "dynamic-size", "dynamic-pad"])
def test_matches_eager_timm_chain(device, backend, kw, size):
    m = PatchEmbed(48, 16, 3, 40, backend=backend, **kw).to(device)
    with torch.no_grad():
        if m.cls_token is not None:
            m.cls_token.normal_()
    x = randn(2, 3, *size, dtype=torch.float64, device=device)
    with torch.no_grad():
        exact = _eager(copy.deepcopy(m).double(), x)
        if backend == "reference":
            got = copy.deepcopy(m).double()(x)
            assert got.shape == exact.shape and torch.allclose(got, exact, atol=1e-10)
        else:
            got = m(x.float())
            assert got.shape == exact.shape
            assert_close_by_rule(got, exact, _eager(m, x.float()), what="PatchEmbed")


def test_gradients_reach_parameters(device):
    m = PatchEmbed(32, 16, 3, 24, backend="triton", dynamic_img_size=True).to(device)
    x = torch.randn(2, 3, 48, 32, device=device)
    m(x).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_from_conv_shares_parameters(device):
    conv = torch.nn.Conv2d(3, 24, kernel_size=14, stride=14).to(device)
    m = PatchEmbed.from_conv(conv, img_size=28, backend="triton")
    assert m.proj.weight is conv.weight and m.embed_dim == 24 and m.grid_size == (2, 2)
    x = torch.randn(2, 3, 28, 28, device=device)
    with torch.no_grad():
        assert_close_by_rule(m(x), _eager(copy.deepcopy(m).double(), x.double()), _eager(m, x), what="from_conv")
    with pytest.raises(ValueError, match="stride-P"):
        PatchEmbed.from_conv(torch.nn.Conv2d(3, 8, 14, stride=7))
    with pytest.raises(ValueError, match="stride-P"):
        PatchEmbed.from_conv(torch.nn.Conv2d(3, 8, 14, stride=14, padding=1))


def test_state_dict_uses_timm_names():
    keys = set(PatchEmbed(32, 16, 3, 8).state_dict())
    assert keys == {"proj.weight", "proj.bias", "cls_token", "pos_embed"}
    assert PatchEmbed(32, 16, 3, 8).pos_embed.shape == (1, 5, 8)


def test_masked_tokens_and_errors(device):
    m = PatchEmbed(32, 16, 3, 8, mask_token=True, backend="triton").to(device)
    x = torch.randn(2, 3, 32, 32, device=device)
    mask = torch.tensor([[True, False, False, True], [False, False, False, False]], device=device)
    out = m(x, token_mask=mask)
    expected = (m.mask_token[0, 0] + m.pos_embed[0, 1:])[mask[0]]
    assert torch.allclose(out[0, 1:][mask[0]], expected)
    with pytest.raises(ValueError, match="does not match img_size"):
        m(torch.randn(1, 3, 48, 32, device=device))
    with pytest.raises(ValueError, match="mask_token=True"):
        PatchEmbed(32, 16, 3, 8).to(device)(x, token_mask=mask)


def test_timm_parity_when_installed():
    timm_layers = pytest.importorskip("timm.layers", reason="timm not installed; the eager transcription above covers it")
    ref = timm_layers.PatchEmbed(48, 16, 3, 40)
    m = PatchEmbed.from_conv(ref.proj, img_size=48)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        expected = torch.cat([m.cls_token.expand(2, -1, -1), ref(x)], 1) + m.pos_embed
        assert torch.allclose(m(x), expected, atol=1e-5)


def test_torch_compile_fullgraph(device):
    """torch.compile(fullgraph=True) traces PatchEmbed (the kernels are custom ops with fake shapes), with
    and without a token mask; forward and every gradient equal the eager module's bit for bit."""
    m = PatchEmbed(28, 14, 3, 20, mask_token=True, backend="triton").to(device)
    x = randn(2, 3, 28, 28, device=device)
    token_mask = torch.tensor([[True, False, False, True], [False, False, True, False]], device=device)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for kw in ({}, {"token_mask": token_mask}):
        results = []
        for fn in (compiled, m):
            xi = x.clone().requires_grad_()
            m.zero_grad(set_to_none=True)
            out = fn(xi, **kw)
            out.backward(torch.linspace(-1, 1, out.numel(), device=device).view_as(out))
            results.append([out, xi.grad] + [p.grad for p in m.parameters()])
        for got, want in zip(*results):
            assert (got is None) == (want is None)
            if got is not None:
                assert torch.equal(got, want), kw


def test_double_backward_raises(device):
    """The hand-written backward has no graph: a gradient of a gradient through the convolution raises
    instead of a silently zero Hessian (the first gradient, with create_graph=True, is fine)."""
    m = PatchEmbed(28, 14, 3, 20, backend="triton").to(device)
    x = randn(1, 3, 28, 28, device=device).requires_grad_()
    out = m(x)
    (gx,) = torch.autograd.grad(out.square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.square().sum().backward()


_BAD_CONSTRUCTOR_ARGS = [  # (argument, value, expected message)
    ("img_size", -224, r"img_size must be in \[1, inf\]"),
    ("img_size", (224, 0), r"img_size\[1\] must be in"),
    ("img_size", 224.0, "img_size must be an int"),
    ("img_size", 225, "must be a multiple of patch_size"),
    ("patch_size", 0, r"patch_size must be in \[1, inf\]"),
    ("patch_size", (16, 8), "patch_size must be square"),
    ("patch_size", (16, 16, 1), "patch_size must be an int or a pair"),
    ("in_chans", 0, "in_chans must be in"),
    ("embed_dim", -8, "embed_dim must be in"),
    ("bias", "yes", "bias must be True or False"),
    ("class_token", 1, "class_token must be True or False"),
    ("no_embed_class", None, "no_embed_class must be True or False"),
    ("mask_token", "no", "mask_token must be True or False"),
    ("dynamic_img_size", 0, "dynamic_img_size must be True or False"),
    ("dynamic_img_pad", "", "dynamic_img_pad must be True or False"),
    ("pos_embed", "sincos", "pos_embed must be one of"),
    ("interpolation", "nearest", "interpolation must be one of"),
    ("pos_resample", "torch", "pos_resample must be one of"),
    ("backend", "cuda", "backend must be one of"),
    ("proj", torch.nn.Linear(3, 8), "proj must be None or an nn.Conv2d"),
]


@pytest.mark.parametrize("arg,value,match", _BAD_CONSTRUCTOR_ARGS,
                         ids=[f"{arg}={type(value).__name__ if arg == 'proj' else repr(value)}"
                              for arg, value, _ in _BAD_CONSTRUCTOR_ARGS])
def test_constructor_validates_arguments(arg, value, match):
    """Every constructor argument is checked, naming it (img_size=-224 was accepted, patch_size=0 raised
    ZeroDivisionError)."""
    args = dict(img_size=224, patch_size=16, in_chans=3, embed_dim=8)
    args[arg] = value
    with pytest.raises(ValueError, match=match):
        PatchEmbed(**args)


def test_dynamic_img_pad_allows_any_img_size():
    assert PatchEmbed(225, 16, 3, 8, dynamic_img_pad=True).grid_size == (15, 15)


def test_forward_validates_input():
    m = PatchEmbed(32, 16, 3, 8)
    with pytest.raises(ValueError, match=r"x must be a \(B, C, H, W\) tensor"):
        m(torch.randn(3, 32, 32))
