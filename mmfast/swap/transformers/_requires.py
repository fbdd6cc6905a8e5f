"""What some model families' swaps need of the installed transformers, checked on its code (not its version).

BLIP-2's Q-Former is reached only through ``AttentionInterface``; transformers 4.5x's Q-Former attention does
not call it. Each check returns None when the installed transformers has what the swap needs, else the
reason; `mmfast.patch` then leaves the whole model unchanged with it (never half-patched).
"""


def blip2():
    from transformers.models.blip_2 import modeling_blip_2 as m

    from . import _uses_interface

    if not _uses_interface(m.Blip2QFormerMultiHeadAttention):
        return ("BLIP-2: this transformers' Q-Former attention (Blip2QFormerMultiHeadAttention) does not call "
                "AttentionInterface (4.5x: eager matmuls), so mmfast would patch the vision tower only")
    return None
