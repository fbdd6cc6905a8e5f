"""Flash attention (forward + backward) with interval, causal and padding masks, varlen and GQA.

- :func:`flash_attention` — the public op (its docstring: shapes, masks, math, dtypes, backends);
- :func:`build_block_mask` / :class:`AttentionBlockMask` — precomputed block-sparse metadata for one
  mask, reusable across calls and layers (``flash_attention(..., block_mask=bm)``);
- ``masks`` — builders for the interval masks of the seed models;
- :func:`compile_specs` — every kernel x launch config, for the GPU-readiness gate.

Layout: ``_kernels.py`` the Triton kernels, ``_configs.py`` launch configs and compile specs, ``_launch.py``
validation, launchers, custom ops and autograd; ``_blockmask.py`` the block-sparse metadata, ``masks.py``
the mask builders.
"""
from .._common import autocast_op
from .._dispatch import resolve_backend
from . import _launch, masks
from ._blockmask import AttentionBlockMask, build_block_mask
from ._configs import compile_specs

__all__ = ["AttentionBlockMask", "build_block_mask", "compile_specs", "flash_attention", "masks"]


@autocast_op("q", "k", "v")
def flash_attention(q, k, v, *, causal=False, softmax_scale=None, kv_start=None, kv_end=None, key_padding_mask=None,
                    cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, return_lse=False,
                    backend="auto", block_mask=None):
    """Exact softmax attention with interval, causal and padding masks; skips the KV blocks a mask hides.

    ``out[b, i, h] = Σ_j p_ij v[b, j, h // g]``, ``p_ij = softmax_j(scale · q[b, i, h] · k[b, j, h // g])``
    over the keys j that query row i sees, g = Hq / Hkv (GQA / MQA), scale = `softmax_scale` or 1/√D.

    Shapes:
        q (B, Lq, Hq, D), k and v (B, Lk, Hkv, D) — Lq ≠ Lk allowed (cross-attention); or packed varlen
        q (total_q, Hq, D), k / v (total_k, Hkv, D) with `cu_seqlens_q` / `cu_seqlens_k` (int32, B + 1
        offsets starting at 0; separate, so varlen cross-attention works) and `max_seqlen_q` / `max_seqlen_k`.
        Any strides with a contiguous last dim (views of a fused QKV projection, (B, H, L, D) permuted to
        (B, L, H, D)) are read in place. D ≤ 256, any value (40, 72, 80, 96 ...): padded internally
        to a power of two, except 65 - 96: a 64-column chunk + a 16- or 32-column one in the forward, and
        in the backward where its dots run on Hopper's wgmma (aligned fp16 / bf16) or in IEEE fp32.

    Masks (intersected; a key is visible only if every given condition allows it):
        kv_start / kv_end: int32 (B, Lq) or (Lq,) — (total_q,) for varlen, relative to each sequence's
            start: row i sees keys ``kv_start[i] <= j < kv_end[i]`` (values in [0, Lk]; start ≥ end: none).
            Builders for every model mask live in ``mmfast.kernels.attention.masks``.
        causal: True / False; row i sees ``j <= i + Lk - Lq`` — bottom-right aligned, as flash-attn ≥ 2.1::

                Lq = 2, Lk = 5:   1 1 1 1 0        Lq = 5, Lk = 2:   0 0
                                  1 1 1 1 1                          0 0
                                                                     0 0
                                                                     1 0
                                                                     1 1

        key_padding_mask: bool (B, Lk), True marks a padded key (torch.nn.MultiheadAttention's convention).
            Not with varlen (pack only the valid keys instead).
        block_mask: an AttentionBlockMask from ``build_block_mask(...)`` built from the same mask arguments;
            pass it instead of them to reuse the precomputed block lists across calls and layers.

    Rows that see no key at all get output exactly 0, LSE −inf and zero gradients (never NaN).

    softmax_scale: None (1/√D) or a finite number (any sign); a one-element tensor is checked on its device
        (no sync) and, on the Triton backend, read with one host sync; there it is a constant (one that
        requires grad raises ValueError; the reference backend differentiates it).

    Returns out (shape and dtype of q, contiguous), and with `return_lse` also lse (B, Hq, Lq) — (Hq,
    total_q) for varlen — the natural-log log-sum-exp of the scaled scores (differentiable), float32
    (float64 for float64 inputs).

    dtypes: float16, bfloat16, float32 on every backend; float64 on backend="reference" only (the Triton
    backend raises ValueError). Accumulation is fp32 (float64 for float64). fp32 matmuls follow
    ``torch.get_float32_matmul_precision()`` as torch.matmul does: "highest" (the default) runs IEEE fp32,
    "high" / "medium" TF32 tensor cores.

    Autocast: like ``F.scaled_dot_product_attention`` — under ``torch.autocast`` q, k and v (unless
    float64) are cast to the autocast dtype and the output comes back in it; gradients return in the
    inputs' dtypes.

    backend: "auto" (Triton on CUDA, the PyTorch reference on CPU), "triton" (CUDA, or CPU with
    TRITON_INTERPRET=1), "reference" (``kernels.reference.attention_reference``). Backward: dq, dk, dv in
    the input dtype, deterministic (no atomics); no double backward on the Triton backend (raises; the
    reference supports it). Traceable by ``torch.compile(fullgraph=True)``: the kernels are the custom ops
    ``mmfast::flash_attention_fwd`` / ``mmfast::flash_attention_bwd``.
    """
    varlen, scale, mask = _launch.check_args(q, k, v, causal, softmax_scale, kv_start, kv_end, key_padding_mask,
                                             cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, return_lse,
                                             block_mask)
    if resolve_backend("flash_attention", backend, q.device) == "reference":
        out, lse = _launch.reference(q, k, v, scale, mask)
    else:
        out, lse = _launch.triton_path(q, k, v, scale, varlen, mask)
    return (out, lse) if return_lse else out
