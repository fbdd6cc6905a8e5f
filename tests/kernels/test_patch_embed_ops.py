"""The patch_embed custom ops (mmfast::patch_embed_fwd / _bwd) pass torch.library.opcheck: schema,
autograd registration, and fake shapes *and strides* equal to the real outputs (what torch.compile
plans memory with)."""
import pytest
import torch
from numerics import randn
from patch_embed_helpers import pe_launch

from mmfast.kernels import interpreting, patch_embed

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() or interpreting()),
                                reason="the ops run the Triton kernels: CUDA or TRITON_INTERPRET=1 (set by conftest on CPU)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("layout", ["nchw", "channels-last"])
def test_opcheck(layout):
    B, C, S, P, D = 2, 3, 28, 14, 20
    img = randn(B, C, S, S, device=DEVICE)
    if layout == "channels-last":  # d_weight then comes back in (D, P, P, C) memory: the fake op must say so
        img = img.contiguous(memory_format=torch.channels_last)
    w, bias, pos = randn(D, C, P, P, device=DEVICE), randn(D, device=DEVICE), randn(4, D, device=DEVICE)
    plan = pe_launch.Plan(B=B, T=1, C=C, P=P, GH=2, GW=2, H=S, W=S, N=4, M=4, has_cls=False, pad=False,
                          cl_order=layout == "channels-last", perm=None, src_idx=None, pos_idx=None, tok_mask=None,
                          tile_used=None, ar_ids=None, keep=None, tiles=False)
    dims, index = pe_launch._plan_args(plan)
    leaves = [t.requires_grad_() for t in (img, w, bias, pos)]
    torch.library.opcheck(pe_launch._patch_embed_fwd_op,
                          (*leaves, None, None, None, None, None, None, *index, dims, torch.float32))
    gout = randn(B, 4, D, device=DEVICE)
    torch.library.opcheck(pe_launch._patch_embed_bwd_op, (gout, img.detach(), w.detach(), *index, dims, True, True, True))


@pytest.mark.parametrize("trainable", ["images", "weight", "bias", "pos", "images+weight"])
def test_gradient_subsets(trainable):
    """Only some inputs need gradients: the backward op returns placeholders for the others (which must
    not be one shared tensor: a custom op's outputs may not alias) and the needed ones match the
    reference path."""
    B, C, S, P, D = 2, 3, 28, 14, 20
    base = dict(images=randn(B, C, S, S, device=DEVICE), weight=randn(D, C, P, P, device=DEVICE),
                bias=randn(D, device=DEVICE), pos=randn(4, D, device=DEVICE))
    dout = randn(B, 4, D, device=DEVICE)
    grads = {}
    for backend in ("triton", "reference"):
        t = {k: v.clone().requires_grad_(k in trainable.split("+")) for k, v in base.items()}
        out = patch_embed(t["images"], t["weight"], t["bias"], pos_embed=t["pos"], backend=backend)
        out.backward(dout)
        grads[backend] = {k: v.grad for k, v in t.items()}
    for k in base:
        got, want = grads["triton"][k], grads["reference"][k]
        assert (got is None) == (k not in trainable.split("+")) and (want is None) == (got is None), k
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
