import pytest


@pytest.fixture
def block_mask_builds(monkeypatch):
    """Counts block-mask builds: "per forward" (a stack's shared_padding_mask, which imports mmfast.kernels'
    build_block_mask at call time) and "per layer" (flash_attention's own build for a call's mask arguments)."""
    import mmfast.kernels
    import mmfast.kernels.attention._launch as attention_launch

    builds = {"per forward": 0, "per layer": 0}
    original = mmfast.kernels.build_block_mask

    def counted(key):
        def build(*args, **kwargs):
            builds[key] += 1
            return original(*args, **kwargs)
        return build
    monkeypatch.setattr(mmfast.kernels, "build_block_mask", counted("per forward"))
    monkeypatch.setattr(attention_launch, "build_block_mask", counted("per layer"))
    return builds
