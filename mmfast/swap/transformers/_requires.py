"""What some model families' swaps need of the installed transformers, checked on its code (not its version).

The per-instance swaps of BLIP (v1) and Mllama reproduce transformers 5.x's module code; transformers 4.5x,
recognised by its mask-builder contract (query positions as ``cache_position``, not q_length / q_offset),
has other code there (below). BLIP-2's Q-Former is only reached through ``AttentionInterface``, which
4.5x's does not call. Each check returns None when the installed transformers has what the swap needs,
else the reason; `mmfast.patch` then leaves the whole model unchanged with it (never half-patched).
"""
import inspect


def _mask_contract_4x():
    from transformers import masking_utils

    return "cache_position" in inspect.signature(masking_utils.sdpa_mask).parameters


def blip():
    if _mask_contract_4x():
        return ("BLIP (v1): mmfast's swap reproduces transformers 5.x's BlipTextSelfAttention; 4.5x's differs "
                "(its cross-attention applies encoder_attention_mask, which 5.x drops; past_key_values / "
                "cache_position caching)")
    return None


def blip2():
    from transformers.models.blip_2 import modeling_blip_2 as m

    from . import _uses_interface

    if not _uses_interface(m.Blip2QFormerMultiHeadAttention):
        return ("BLIP-2: this transformers' Q-Former attention (Blip2QFormerMultiHeadAttention) does not call "
                "AttentionInterface (4.5x: eager matmuls), so mmfast would patch the vision tower only")
    return None


def mllama():
    if _mask_contract_4x():
        return ("Mllama: mmfast's swaps reproduce transformers 5.x's cross-attention layers and vision encoder "
                "code; 4.5x's differ (past_key_values / cache_position caching, rope_scaling config) and "
                "were not verified")
    return None
