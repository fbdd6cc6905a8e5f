"""`python -m mmfast check` cases for the fused patch embedding (ViT, CLIP-L/14 at another resolution,
masked pre-training, MAE, Llama 3.2 Vision tiles): forward and backward against the eager chain."""
import torch

_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


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
    extra = {}
    if kind == "vit_masked":
        t["mask_token"] = rnd(D)
        extra["token_mask"] = torch.rand(B, 15, generator=g) < 0.4
    if kind == "mae":
        extra["keep_indices"] = torch.rand(B, 15, generator=g).argsort(1)[:, :4]
    if kind == "clip_l14_resampled":
        extra["pos_grid"] = (4, 4)
    return t, extra


def _run(kind, t, extra, dtype, device, backend, grad):
    from mmfast.kernels import patch_embed, tile_patch_embed

    op = tile_patch_embed if kind == "tiles" else patch_embed
    leaves = {k: v.to(device=device, dtype=dtype).requires_grad_() for k, v in t.items()}
    out = op(**leaves, **{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in extra.items()},
             backend=backend)
    out.backward(grad.to(device=device, dtype=dtype))
    return [out.detach()] + [leaves[k].grad for k in t]


_CASES = [("vit_b16", "ViT-B/16-like, D=96, 3x5 patches, [CLS] + table"),
          ("clip_l14_resampled", "CLIP-L/14-like, 4x4 table resampled to 3x5 (bicubic, timm)"),
          ("vit_masked", "ViT masked-patch: 40% [MASK] tokens"),
          ("mae", "MAE: 4 of 15 patches kept"),
          ("tiles", "Llama 3.2 tiles: B=2 x 4 tiles, 4 of 8 used")]


def cases(device):
    for kind, shape in _CASES:
        for dtype in ((torch.float32, torch.bfloat16) if kind == "vit_b16" else (torch.bfloat16,)):

            def run(kind=kind, dtype=dtype):
                g = torch.Generator().manual_seed(0)
                t, extra = _inputs(kind, g)
                quant = {k: v.to(dtype).double() for k, v in t.items()}  # fp64 reference on the same values
                from mmfast.kernels import patch_embed, tile_patch_embed

                op = tile_patch_embed if kind == "tiles" else patch_embed
                with torch.no_grad():  # one upstream gradient (rounded to dtype) for all three runs
                    shape_out = op(**quant, **extra, backend="reference").shape
                grad = torch.randn(shape_out, generator=g, dtype=torch.float64).to(dtype).double()
                exact = _run(kind, quant, extra, torch.float64, "cpu", "reference", grad)
                ours = _run(kind, t, extra, dtype, device, "triton", grad)
                same = _run(kind, t, extra, dtype, device, "reference", grad)
                err = tol = 0.0
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

            yield ("patch_embed" if kind != "tiles" else "tile_patch_embed", "triton", _NAMES[dtype], shape, run)
