"""Tile selection of tanh_gated_linear (kernels/gated_linear/_configs.py): sm_90's entries for aligned 16-bit
operands, the shared table elsewhere. Table logic only; the compile gate checks that each entry compiles
without spills and that sm_90's 16-bit ones lower to wgmma."""
import pytest
import torch

from mmfast.kernels.gated_linear import _configs as C


class _CudaTensor:
    """What choose() reads of a tensor: its device and its address (no GPU needed)."""

    def __init__(self, ptr):
        self.device = torch.device("cuda", 0)
        self._ptr = ptr

    def data_ptr(self):
        return self._ptr


def _choose(kernel, dtype, cc, monkeypatch, ptr=256, size=512):
    monkeypatch.setattr(C, "_capability", lambda device: cc)
    return C.choose(kernel, dtype, "ieee", [_CudaTensor(ptr)], [size], [1])


@pytest.mark.parametrize("kernel", ["fwd", "da", "dw"])
def test_sm90_gets_its_entries_for_aligned_16bit_operands(kernel, monkeypatch):
    sm90 = C._BY_KEY[(kernel, "16-bit", True, 90)]
    assert _choose(kernel, torch.bfloat16, 90, monkeypatch) == (sm90.tiles, sm90.num_warps, sm90.num_stages)
    shared = C._BY_KEY[(kernel, "16-bit", True, None)]
    for cc in (80, 89, 100):
        assert _choose(kernel, torch.bfloat16, cc, monkeypatch) == (shared.tiles, shared.num_warps, shared.num_stages)
    unaligned = C._BY_KEY[(kernel, "16-bit", False, None)]
    assert _choose(kernel, torch.bfloat16, 90, monkeypatch, size=77)[0] == unaligned.tiles
    assert _choose(kernel, torch.float32, 90, monkeypatch)[0] == C._BY_KEY[(kernel, "ieee", True, None)].tiles


def test_specs_compile_each_entry_for_the_targets_that_choose_it():
    targets = {spec.label: spec.targets for spec in C.compile_specs()}
    for c in C.GPU_CONFIGS:
        label = next(label for label in targets if label.startswith(f"{c.kernel} ") and
                     all(f"{k}={v}" in label for k, v in c.tiles.items()) and f"stages={c.num_stages}" in label
                     and ("unaligned" in label) != c.aligned)
        paired = (c.kernel, c.operands, c.aligned, 90) in C._BY_KEY
        assert targets[label] == ((c.arch,) if c.arch else ((80,) if paired else ())), label
