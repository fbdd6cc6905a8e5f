"""transformers config keywords that differ between 4.5x and 5.x, for tests that build tiny HF models."""


def hf_rope_kwargs(config_cls, rope):
    """A transformers text config's keywords for 5.x's ``rope_parameters`` dict `rope`: 4.5x's configs (no
    rope_parameters attribute) take ``rope_theta`` and ``rope_scaling`` (the rest) apart."""
    if hasattr(config_cls(), "rope_parameters"):
        return dict(rope_parameters=rope)
    return dict(rope_theta=rope["rope_theta"], rope_scaling={k: v for k, v in rope.items() if k != "rope_theta"})
