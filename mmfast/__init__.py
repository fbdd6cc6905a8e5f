"""mmfast: fused GPU kernels for vision-language models, with a thin model layer on top.

The kernels live in ``mmfast.kernels`` (imported lazily, so that TRITON_INTERPRET can still be set
after ``import mmfast``); modules in ``mmfast.nn``.
"""
__version__ = "0.1.0"
