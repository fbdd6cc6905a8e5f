"""Masked-patch pre-training helpers (pure PyTorch, on the device of their output): the ViT recipe's
corruption (mask token / random other patch / unchanged) and MAE's random keep indices, in the form
``patch_embed`` takes (token_mask, patch_index, keep_indices)."""
import torch

from .._common import check_int, check_scalar


def _gen_device(op, generator, device):
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}")
    return generator.device if generator is not None else (device or "cpu")


def vit_masked_patch_sampler(batch, num_patches, *, mask_ratio=0.5, p_mask=0.8, p_random=0.1, generator=None,
                             device=None):
    """The ViT paper's masked-patch prediction corruption (BERT's recipe on patches).

    Per image, round(mask_ratio * N) patches are chosen (drawn afresh per call); of those, each
    independently becomes the [MASK] embedding with probability p_mask, another patch's embedding
    (a uniformly drawn *different* patch of the same image, keeping its own position) with probability
    p_random, and stays unchanged otherwise. Returns (token_mask (B, N) bool, patch_index (B, N) int64,
    target_mask (B, N) bool = the chosen patches, whose pixels the model predicts); pass token_mask,
    patch_index to patch_embed. Python numbers only: mask_ratio, p_mask, p_random in [0, 1] with
    p_mask + p_random <= 1; batch >= 0; num_patches >= 1 (>= 2 when p_random > 0).
    """
    op = "vit_masked_patch_sampler"
    check_int(op, "batch", batch, lo=0)
    check_int(op, "num_patches", num_patches, lo=1)
    for name, value in (("mask_ratio", mask_ratio), ("p_mask", p_mask), ("p_random", p_random)):
        if isinstance(value, torch.Tensor):
            raise ValueError(f"{op}: {name} must be a Python number (it sets how many patches are drawn), got a tensor")
        check_scalar(op, name, value, lo=0.0, hi=1.0)
    if p_mask + p_random > 1:
        raise ValueError(f"{op}: p_mask + p_random must be <= 1, got {p_mask} + {p_random}")
    if num_patches < 2 and p_random > 0:
        raise ValueError(f"{op}: the random-other-patch replacement (p_random > 0) needs num_patches >= 2, "
                         f"got {num_patches}")
    gen_device = _gen_device(op, generator, device)
    n_pick = int(round(mask_ratio * num_patches))
    noise = torch.rand(batch, num_patches, generator=generator, device=gen_device)
    order = noise.argsort(dim=1)
    target = torch.zeros(batch, num_patches, dtype=torch.bool, device=gen_device)
    target.scatter_(1, order[:, :n_pick], True)
    u = torch.rand(batch, num_patches, generator=generator, device=gen_device)
    token_mask = target & (u < p_mask)
    swap = target & (u >= p_mask) & (u < p_mask + p_random)
    offset = torch.randint(1, max(num_patches, 2), (batch, num_patches), generator=generator, device=gen_device)
    own = torch.arange(num_patches, device=gen_device).expand(batch, num_patches)
    patch_index = torch.where(swap, (own + offset) % num_patches, own)
    out = (token_mask, patch_index, target)
    return tuple(t.to(device) for t in out) if device is not None else out


def mae_keep_indices(batch, num_patches, *, mask_ratio=0.75, generator=None, device=None):
    """MAE's random masking: (keep_indices (B, N_keep), ids_restore (B, N)) from per-image noise, as
    MAE's random_masking does; N_keep = int(N * (1 - mask_ratio)), mask_ratio a Python number in [0, 1]."""
    op = "mae_keep_indices"
    check_int(op, "batch", batch, lo=0)
    check_int(op, "num_patches", num_patches, lo=1)
    if isinstance(mask_ratio, torch.Tensor):
        raise ValueError(f"{op}: mask_ratio must be a Python number (it sets how many patches are kept), got a tensor")
    check_scalar(op, "mask_ratio", mask_ratio, lo=0.0, hi=1.0)
    gen_device = _gen_device(op, generator, device)
    keep = int(num_patches * (1 - mask_ratio))
    ids_shuffle = torch.rand(batch, num_patches, generator=generator, device=gen_device).argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    out = (ids_shuffle[:, :keep].contiguous(), ids_restore)
    return tuple(t.to(device) for t in out) if device is not None else out
