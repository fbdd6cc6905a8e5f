"""mmfast: fused GPU kernels for vision-language models, with a thin model layer on top.

The kernels live in ``mmfast.kernels`` (imported lazily, so that TRITON_INTERPRET can still be set
after ``import mmfast``); modules in ``mmfast.nn``; models in ``mmfast.models``; swapping the kernels
into Hugging Face / timm / open_clip models with ``mmfast.patch`` / ``mmfast.unpatch`` /
``mmfast.verify`` (``mmfast.swap``).
"""
__version__ = "0.1.0"

_SWAP = ("patch", "unpatch", "verify")


def __getattr__(name):
    # lazy: `import mmfast` must stay cheap and must not import the kernels (see above)
    if name in _SWAP:
        from . import swap
        return getattr(swap, name)
    raise AttributeError(f"module 'mmfast' has no attribute {name!r}")
