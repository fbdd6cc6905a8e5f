"""`python -m mmfast check` cases for the fused patch embedding (ViT, CLIP-L/14 at another resolution,
masked pre-training, MAE, Llama 3.2 Vision tiles): forward and backward against the eager chain.

``cases(device)``: Triton in fp32 / bf16 against fp64, within 2x (3x for gradients) of PyTorch's own
error in the same dtype. ``cases(device, torch.float64)``: backend="reference" in float64 against an
independent float64 formulation (timm's / Mllama's eager chains written with F.conv2d, F.interpolate,
F.embedding), output and every gradient within 1e-10 relative."""
import torch
import torch.nn.functional as F

_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


def _inputs(kind, g):
    """fp64 masters of each case (shrunk widths and grids: a few seconds through the interpreter)."""
    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    if kind == "tiles":
        B, T, P, D, N = 2, 4, 14, 48, 6
        return dict(images=rnd(B, T, 3, 2 * P, 3 * P), weight=rnd(D, 3, P, P, scale=0.05), cls_token=rnd(D),
                    pos_embed=rnd(N + 1, D), pos_gate=rnd(1), tile_pos_embed=rnd(9, T * (N + 1) * D),
                    tile_embed=rnd(9, T * D), tile_embed_gate=rnd(1)), dict(
            aspect_ratio_ids=torch.tensor([2, 6]), tile_mask=torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]))
    P = 14 if kind == "clip_l14_resampled" else 16
    D, grid, B = 96, (3, 5), 2
    t = dict(images=rnd(B, 3, grid[0] * P, grid[1] * P), weight=rnd(D, 3, P, P, scale=0.05), bias=rnd(D),
             cls_token=rnd(D), pos_embed=rnd(1 + 4 * 4, D) if kind == "clip_l14_resampled" else rnd(1 + 15, D))
    # the table's grid: a 4x4 one is told by its size, a 3x5 one (16 rows, like 4x4) is named
    extra = {"pos_grid": (4, 4) if kind == "clip_l14_resampled" else grid}
    if kind == "vit_masked":
        t["mask_token"] = rnd(D)
        extra["token_mask"] = torch.rand(B, 15, generator=g) < 0.4
    if kind == "mae":
        extra["keep_indices"] = torch.rand(B, 15, generator=g).argsort(1)[:, :4]
    return t, extra


def _eager(kind, images, weight, cls_token, pos_embed, bias=None, mask_token=None, pos_gate=None,
           tile_pos_embed=None, tile_embed=None, tile_embed_gate=None, *, pos_grid=None, token_mask=None,
           keep_indices=None, aspect_ratio_ids=None, tile_mask=None):
    """The eager chains the ops replace, written independently of kernels/reference.py."""
    P = weight.shape[-1]
    if kind == "tiles":  # transformers' MllamaVisionModel up to the pre-layernorm
        B, T = images.shape[:2]
        x = F.conv2d(images.flatten(0, 1), weight, stride=P).flatten(2).transpose(1, 2)
        N, D = x.shape[1:]
        x = x.reshape(B, T, N, D)
        x = x + F.embedding(aspect_ratio_ids, tile_embed).reshape(B, T, 1, D) * tile_embed_gate.tanh()
        x = torch.cat([cls_token.expand(B * T, 1, D), x.reshape(B * T, N, D)], 1).reshape(B, T, N + 1, D)
        x = x + ((1 - pos_gate.tanh()) * pos_embed).view(1, 1, N + 1, D)
        x = x + pos_gate.tanh() * F.embedding(aspect_ratio_ids, tile_pos_embed).reshape(B, T, N + 1, D)
        return x * tile_mask.view(B, T, 1, 1)
    # timm: PatchEmbed, then VisionTransformer._pos_embed with resample_abs_pos_embed (fp32, antialias)
    x = F.conv2d(images, weight, bias, stride=P)
    grid = tuple(x.shape[-2:])
    x = x.flatten(2).transpose(1, 2)
    B, N, D = x.shape
    cls_pos, patch_pos = pos_embed[:1], pos_embed[1:]
    if tuple(pos_grid) != grid:
        patch_pos = patch_pos.reshape(1, *pos_grid, D).permute(0, 3, 1, 2).float()
        patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", antialias=True)
        patch_pos = patch_pos.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(N, D)
    if token_mask is not None:
        x = torch.where(token_mask[..., None], mask_token, x)
    x = x + patch_pos
    if keep_indices is not None:
        x = torch.gather(x, 1, keep_indices[..., None].expand(-1, -1, D))
    return torch.cat([(cls_token + cls_pos).expand(B, 1, D), x], 1)


def _run(kind, t, extra, dtype, device, backend, grad):
    from mmfast.kernels import patch_embed, tile_patch_embed

    op = tile_patch_embed if kind == "tiles" else patch_embed
    leaves = {k: v.detach().to(device=device, dtype=dtype, copy=True).requires_grad_() for k, v in t.items()}
    out = op(**leaves, **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()},
             backend=backend)
    out.backward(grad.to(device=device, dtype=dtype))
    return [out.detach()] + [leaves[k].grad for k in t]


def _run_eager(kind, t, extra, grad):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
    out = _eager(kind, **leaves, **extra)
    out.backward(grad)
    return [out.detach()] + [leaves[k].grad for k in t]


_CASES = [("vit_b16", "ViT-B/16-like, D=96, 3x5 patches, [CLS] + table"),
          ("clip_l14_resampled", "CLIP-L/14-like, 4x4 table resampled to 3x5 (bicubic, timm)"),
          ("vit_masked", "ViT masked-patch: 40% [MASK] tokens"),
          ("mae", "MAE: 4 of 15 patches kept"),
          ("tiles", "Llama 3.2 tiles: B=2 x 4 tiles, 4 of 8 used")]


def _float64_case(kind):
    def run():
        g = torch.Generator().manual_seed(0)
        t, extra = _inputs(kind, g)
        grad = torch.randn(_eager(kind, **t, **extra).shape, generator=g, dtype=torch.float64)
        ours = _run(kind, t, extra, torch.float64, "cpu", "reference", grad)
        want = _run_eager(kind, t, extra, grad)
        err = 0.0
        ok = True
        for o, w in zip(ours, want):
            scale = max(w.abs().max().item(), 1e-300)
            e = (o - w).abs().max().item() / scale
            ok = ok and o.dtype == torch.float64 and e <= 1e-10
            err = max(err, e)
        return err, 1e-10, False, ok

    return run


def _case(kind, dtype, device):
    def run():
        from mmfast.kernels import patch_embed, tile_patch_embed

        g = torch.Generator().manual_seed(0)
        t, extra = _inputs(kind, g)
        quant = {k: v.to(dtype).double() for k, v in t.items()}  # fp64 reference on the same values
        op = tile_patch_embed if kind == "tiles" else patch_embed
        with torch.no_grad():  # one upstream gradient (rounded to dtype) for all three runs
            shape_out = op(**quant, **extra, backend="reference").shape
        grad = torch.randn(shape_out, generator=g, dtype=torch.float64).to(dtype).double()
        exact = _run(kind, quant, extra, torch.float64, "cpu", "reference", grad)
        ours = _run(kind, t, extra, dtype, device, "triton", grad)
        same = _run(kind, t, extra, dtype, device, "reference", grad)
        err = 0.0
        ok = True
        for i, (o, e, s) in enumerate(zip(ours, exact, same)):
            factor = 2.0 if i == 0 else 3.0  # output 2x, gradients 3x PyTorch's error in dtype
            e_o = (o.double().cpu() - e).abs().max().item()
            floor = 1e-6 if dtype == torch.float32 else 1e-4
            if e.numel() == 1:  # a gate: one scalar summed over every output, a few ulps of its size
                floor += 4 * torch.finfo(dtype).eps * e.abs().item()
            bound = factor * (s.double().cpu() - e).abs().max().item() + floor
            ok = ok and e_o <= bound and not torch.isnan(o).any().item()
            if i == 0:
                err, tol = e_o, bound
        return err, tol, False, ok

    return run


def cases(device, dtype=None):
    for kind, shape in _CASES:
        op = "patch_embed" if kind != "tiles" else "tile_patch_embed"
        if dtype == torch.float64:
            yield (op, "reference", "fp64", shape, _float64_case(kind))
            continue
        for dt in ((torch.float32, torch.bfloat16) if kind == "vit_b16" else (torch.bfloat16,)):
            if dtype is None or dt == dtype:
                yield (op, "triton", _NAMES[dt], shape, _case(kind, dt, device))
