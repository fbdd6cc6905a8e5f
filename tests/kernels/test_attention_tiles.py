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
    tables = (C._GPU_TABLE, C._GPU_IEEE_TABLE, C._GPU_UNALIGNED_TABLE, C._SM90_TABLE, C._SM90_SPLIT_ODD_TABLE,
              C._GPU_SPLIT_TABLE, C._GPU_SPLIT_UNALIGNED_TABLE)
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
        # the launch case, without its tiles and head-dim chunks (the backward splits on sm_90 only, bwd_block_d)
        case = re.sub(r"( as \d+\+\d+)? BLOCK_M=.* stages=\d+( split)?", "", spec.label)
        for cc in targets:
            assert (spec.name, case, cc) not in seen, (spec.label, seen.get((spec.name, case, cc)))
            seen[(spec.name, case, cc)] = spec.label
        dot = "preprocess" not in spec.name
        aligned_16bit = "unaligned" not in spec.label and "fp32" not in spec.label
        assert spec.needs_wgmma == (dot and aligned_16bit and 90 in targets), spec.label
        assert (spec.intensity is not None) == dot, spec.label
    for name, case, cc in seen:
        assert (name, case, 170 - cc) in seen, (name, case)


def test_split_odd_head_dims_get_their_sm90_tile():
    """The split forward, dK/dV and dQ at D % 16 != 0 (no divisibility hint on the head stride) take smaller
    sm_90 tiles (the 128 bucket's spill at D = 72 or 88); D = 96, other targets and unaligned inputs keep theirs."""
    odd = C._SM90_SPLIT_ODD_TABLE[("fwd", 96, "16-bit")]
    assert C.get_config("fwd", 88, torch.bfloat16, "ieee", aligned=True, cc=90) == odd
    assert C.get_config("fwd", 96, torch.bfloat16, "ieee", aligned=True, cc=90) == C._SM90_TABLE[("fwd", 128, "16-bit")]
    assert C.get_config("fwd", 88, torch.bfloat16, "ieee", aligned=True, cc=80) == C._GPU_TABLE[("fwd", 128, "16-bit")]
    assert C.get_config("fwd", 88, torch.bfloat16, "ieee", aligned=False, cc=90) == \
        C._GPU_UNALIGNED_TABLE[("fwd", 128, "16-bit")]
    for pass_, head_dim in (("dkdv", 72), ("dkdv", 88), ("dq", 88)):
        odd = C._SM90_SPLIT_ODD_TABLE[(pass_, C.table_bucket(pass_, head_dim), "16-bit")]
        assert C.get_config(pass_, head_dim, torch.bfloat16, "ieee", aligned=True, cc=90) == odd
        assert C.get_config(pass_, head_dim, torch.bfloat16, "ieee", aligned=True, cc=80) == \
            C._GPU_TABLE[(pass_, 128, "16-bit")]
    assert C.get_config("dq", 72, torch.bfloat16, "ieee", aligned=True, cc=90) == C._SM90_TABLE[("dq", 128, "16-bit")]


def _spec_case(spec):
    """(pass, dtype, precision, aligned) of a spec, from its label."""
    words = spec.label.split()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[words[1]]
    precision = words[2] if dtype == torch.float32 and words[2] in ("tf32", "ieee") else "ieee"
    return words[0], dtype, precision, "unaligned" not in words


def test_compile_specs_cover_the_split_passes():
    """The gate compiles each spec with the head-dim chunks its launch takes (the forward: block_d_split; dK/dV
    and dQ: bwd_block_d, per target), among them the split forward, dK/dV and dQ at D = 72, 80, 88, 96 in bf16
    (the backward on sm_90) and at 80 and 96 in IEEE fp32 (both targets); the Delta pass (no dot) pads."""
    covered = set()
    for spec in C.compile_specs():
        pass_, dtype, precision, aligned = _spec_case(spec)
        if pass_ == "pre":
            assert "BLOCK_D2" not in spec.constexprs, spec.label
            continue
        d = spec.constexprs["HEAD_DIM"]
        for cc in spec.targets or (80, 90):
            want = C.block_d_split(d) if pass_ == "fwd" else C.bwd_block_d(d, dtype, precision, aligned, cc)
            assert (spec.constexprs["BLOCK_D"], spec.constexprs["BLOCK_D2"]) == want, (spec.label, cc)
            if spec.constexprs["BLOCK_D2"]:
                covered.add((pass_, d, "bf16" if dtype != torch.float32 else precision, cc))
    wanted = {(p, d, "bf16", cc) for p in ("fwd", "dkdv", "dq") for d in (72, 80, 88, 96)
              for cc in ((80, 90) if p == "fwd" else (90,))}
    wanted |= {(p, d, "ieee", cc) for p in ("fwd", "dkdv", "dq") for d in (80, 96) for cc in (80, 90)}
    wanted |= {("fwd", d, "tf32", cc) for d in (80, 96) for cc in (80, 90)}
    assert wanted <= covered, wanted - covered


@pytest.mark.parametrize("head_dim", (72, 80, 88, 96))
def test_backward_splits_off_mma_sync_only(head_dim):
    """dK/dV and dQ split the head dim where their dots run on wgmma (aligned 16-bit on sm_90) or as FMA loops
    (IEEE fp32), and pad it on mma.sync (sm_80, unaligned, TF32); outside (64, 96] they never split."""
    split = C.block_d_split(head_dim)
    assert C.bwd_block_d(head_dim, torch.bfloat16, "ieee", True, 90) == split
    assert C.bwd_block_d(head_dim, torch.float32, "ieee", False, 80) == split
    for args in ((torch.bfloat16, "ieee", True, 80), (torch.float16, "ieee", False, 90),
                 (torch.float32, "tf32", True, 90)):
        assert C.bwd_block_d(head_dim, *args) == (128, 0)
    for other in (64, 97, 128):
        assert C.bwd_block_d(other, torch.bfloat16, "ieee", True, 90) == (C.block_d(other), 0)
