"""Cases for `python -m mmfast check`, one module per kernel family (listed in mmfast.check.FAMILIES)."""
