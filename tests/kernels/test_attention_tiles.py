"""Tile selection of flash_attention (kernels/attention/_configs.py): which table entry a launch gets.

Pure table logic, no kernel runs; whether each entry compiles without spills and lowers to wgmma on sm_90
is the compile gate's job (tests/mmfast/test_compile_gate.py, `python -m mmfast compile-report`).
"""
import re

import pytest
import torch

from mmfast.kernels.attention import _configs as C
from mmfast.kernels.attention._blockmask import MASK_TILE_GPU

BUCKETS = (64, 128, 256)


@pytest.mark.parametrize("head_dim", BUCKETS)
def test_sm90_aligned_16bit_tiles_are_the_throughput_ones(head_dim):
    fwd = C.get_config("fwd", head_dim, torch.bfloat16, "ieee", aligned=True, cc=90)
    dkdv = C.get_config("dkdv", head_dim, torch.bfloat16, "ieee", aligned=True, cc=90)
    dq = C.get_config("dq", head_dim, torch.bfloat16, "ieee", aligned=True, cc=90)
    # wgmma runs 64 rows per warpgroup: the resident side (fwd / dQ: query rows, dK/dV: keys) is >= 64
    assert fwd.block_m == 128 and dq.block_m == 128
    assert dkdv.block_n >= 64
    if head_dim <= 128:
        assert fwd.block_n >= 64  # the bar: forward >= 128 x 64 at D <= 128
        assert dkdv.block_n == 128  # the tutorial's 128 keys per dK/dV program
    for cfg in (fwd, dkdv, dq):
        assert MASK_TILE_GPU[0] % cfg.block_m == 0 and MASK_TILE_GPU[1] % cfg.block_n == 0, cfg


@pytest.mark.parametrize("pass_", ["fwd", "dkdv", "dq", "pre"])
@pytest.mark.parametrize("head_dim", BUCKETS)
def test_sm90_entries_apply_to_aligned_16bit_inputs_only(pass_, head_dim):
    shared = C.get_config(pass_, head_dim, torch.bfloat16, "ieee", aligned=True, cc=80)
    assert C.get_config(pass_, head_dim, torch.bfloat16, "ieee", aligned=True, cc=86) == shared
    unaligned = C.get_config(pass_, head_dim, torch.bfloat16, "ieee", aligned=False, cc=90)
    assert unaligned == C.get_config(pass_, head_dim, torch.bfloat16, "ieee", aligned=False, cc=80)
    for precision in ("tf32", "ieee"):
        fp32 = C.get_config(pass_, head_dim, torch.float32, precision, aligned=True, cc=90)
        assert fp32 == C.get_config(pass_, head_dim, torch.float32, precision, aligned=True, cc=80)


def test_every_table_entry_divides_the_mask_tile():
    tables = (C._GPU_TABLE, C._GPU_IEEE_TABLE, C._GPU_UNALIGNED_TABLE, C._SM90_TABLE, C._SM90_SPLIT_ODD_TABLE)
    for cfg in (cfg for table in tables for cfg in table.values()):
        assert MASK_TILE_GPU[0] % cfg.block_m == 0, cfg
        assert cfg.block_n == 0 or MASK_TILE_GPU[1] % cfg.block_n == 0, cfg


def test_split_dkdv_only_where_both_accumulators_spill():
    split = {key for table in (C._GPU_TABLE, C._SM90_TABLE) for key, cfg in table.items() if cfg.split}
    assert split == {("dkdv", 256, "16-bit")}
    assert not C._GPU_TABLE[("dkdv", 256, "16-bit")].split  # sm_80 keeps one program per KV tile


@pytest.mark.parametrize("head_dim, split", [(16, False), (40, False), (64, True), (128, True)])
def test_interpreter_steps_through_both_dkdv_orders(head_dim, split):
    cfg = C.launch_config("dkdv", None, (), head_dim, torch.bfloat16, "ieee", interpreter=True)
    assert cfg.split is split
    assert C.launch_config("dq", None, (), head_dim, torch.bfloat16, "ieee", interpreter=True).split is False


def test_compile_specs_cover_both_targets_once():
    """Each launch case compiles once per target (one spec for both, or an sm_80 and an sm_90 one); the aligned
    16-bit dot specs must run on wgmma on sm_90, and every dot spec declares its step for the intensity."""
    seen = {}
    for spec in C.compile_specs():
        targets = spec.targets or (80, 90)
        case = re.sub(r" BLOCK_M=.* stages=\d+( split)?", "", spec.label)  # the launch case, without its tiles
        for cc in targets:
            assert (spec.name, case, cc) not in seen, (spec.label, seen.get((spec.name, case, cc)))
            seen[(spec.name, case, cc)] = spec.label
        dot = "preprocess" not in spec.name
        aligned_16bit = "unaligned" not in spec.label and "fp32" not in spec.label
        assert spec.needs_wgmma == (dot and aligned_16bit and 90 in targets), spec.label
        assert (spec.intensity is not None) == dot, spec.label
    for name, case, cc in seen:
        assert (name, case, 170 - cc) in seen, (name, case)


def test_split_forward_odd_head_dims_get_their_sm90_tile():
    """The split forward at D % 16 != 0 (no divisibility hint on the head stride) takes the smaller sm_90 tile
    (128 x 64 spills at D = 88); D = 96, other targets, unaligned inputs and the backward keep theirs."""
    odd = C._SM90_SPLIT_ODD_TABLE[("fwd", 96, "16-bit")]
    assert C.get_config("fwd", 88, torch.bfloat16, "ieee", aligned=True, cc=90) == odd
    assert C.get_config("fwd", 96, torch.bfloat16, "ieee", aligned=True, cc=90) == C._SM90_TABLE[("fwd", 128, "16-bit")]
    assert C.get_config("fwd", 88, torch.bfloat16, "ieee", aligned=True, cc=80) == C._GPU_TABLE[("fwd", 128, "16-bit")]
    assert C.get_config("fwd", 88, torch.bfloat16, "ieee", aligned=False, cc=90) == \
        C._GPU_UNALIGNED_TABLE[("fwd", 128, "16-bit")]
    assert C.get_config("dq", 88, torch.bfloat16, "ieee", aligned=True, cc=90) == C._SM90_TABLE[("dq", 128, "16-bit")]


def test_compile_specs_cover_the_split_forward():
    """The gate compiles the split forward (BLOCK_D2 > 0) at D = 80 and 96 in bf16, TF32 and IEEE fp32 for both
    targets, and no backward spec carries BLOCK_D2 (the backward pads to block_d)."""
    covered = set()
    for spec in C.compile_specs():
        if "fwd" not in spec.label:
            assert "BLOCK_D2" not in spec.constexprs, spec.label
            continue
        d = spec.constexprs["HEAD_DIM"]
        assert (spec.constexprs["BLOCK_D"], spec.constexprs["BLOCK_D2"]) == C.block_d_split(d), spec.label
        kind = "bf16" if " bf16 " in spec.label else "tf32" if " tf32 " in spec.label else "ieee"
        for cc in spec.targets or (80, 90):
            covered.add((d, kind, cc))
    assert {(d, kind, cc) for d in (80, 96) for kind in ("bf16", "tf32", "ieee") for cc in (80, 90)} <= covered
