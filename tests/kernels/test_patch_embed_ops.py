"""The patch_embed custom ops (mmfast::patch_embed_fwd / _bwd) pass torch.library.opcheck: schema,
autograd registration, and fake shapes *and strides* equal to the real outputs (what torch.compile
plans memory with)."""
import pytest
import torch
from numerics import randn
from patch_embed_helpers import pe_launch

from mmfast.kernels import interpreting

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
    torch.library.opcheck(pe_launch._patch_embed_fwd_op, (*leaves, None, None, None, None, None, None, *index, dims))
    gout = randn(B, 4, D, device=DEVICE)
    torch.library.opcheck(pe_launch._patch_embed_bwd_op, (gout, img.detach(), w.detach(), *index, dims, True, True, True))
