"""Launch configurations of the contrastive kernels, and the compile gate's specs derived from them.

Every entry compiles without spills for sm_80 and sm_90 on Triton 3.6, 3.8 and 3.9 (the compile gate:
``python -m mmfast compile-report --specs mmfast.kernels.contrastive:compile_specs``).
"""
import torch

from .._common import DTYPE_NAMES, next_power_of_2
from .._registry import CompileSpec, derive_signature, step
from ._kernels import (MODE_SIGMOID, MODE_SOFTMAX, _contrastive_bwd_da_kernel, _contrastive_bwd_db_kernel,
                       _contrastive_colreduce_kernel, _contrastive_fwd_kernel, _contrastive_grad_kernel)

# Per operand width. R = flattened (image, query) rows of a tile, BN = its columns, BK = its K step (one
# per dtype and teacher, shared by the forward and the backward, so the backward recomputes the forward's
# logits bit for bit), BD_MAX = the backward's widest D chunk.
CONFIGS = {
    "16bit": dict(
        BK=64,  # 64-wide K steps of the bf16 / fp16 tensor-core dots
        BK_TEACHER=32,  # with a teacher (two logits tiles) 64 spills on sm_80 with Triton 3.6
        # the tile and its fp32 temporaries stay in registers (150-250 a thread): one program fills an SM,
        # so the forward runs one persistent program per SM, each looping over row blocks
        fwd=dict(R=128, BN=64, num_warps=8, num_stages=2, PER_SM=1,
                 BN_TEACHER=32),  # the teacher's tile and column merge: 64 columns spill on sm_90
        # 64 x 512 fp32 accumulator over 8 warps (128 registers a thread): CLIP's D = 512 in one pass;
        # maxnreg=255: Triton 3.6's ptxas otherwise caps some at 128 registers (for 2 programs / SM) and spills
        # BD_MAX_TEACHER: with a teacher's tile too, 512 spills on sm_80 with Triton 3.9 once FMA contraction is
        # off (NO_FP_FUSION); D = 512 then takes two chunks (ALBEF / BLIP distillation only)
        bwd=dict(R=64, BN=32, BD_MAX=512, BD_MAX_TEACHER=256, num_warps=8, num_stages=2, maxnreg=255),
    ),
    # fp32 operands (IEEE FMA dots, or TF32 under "high"): twice the operand bytes, half-size tiles
    "fp32": dict(
        BK=16,  # 32 spills on Triton 3.6
        BK_TEACHER=16,
        fwd=dict(R=64, BN=32, num_warps=8, num_stages=2, PER_SM=2,  # 128 registers: two programs per SM
                 BN_TEACHER=32),
        # maxnreg=255: without it ptxas spills (IEEE db on sm_80, TF32 da on sm_90 with Triton 3.9)
        bwd=dict(R=32, BN=32, BD_MAX=128, BD_MAX_TEACHER=128, num_warps=4, num_stages=2, maxnreg=255),
    ),
}
# The "gemm" backend: cuBLAS writes the raw similarities of a chunk of rows against all of b (fp32), the
# forward kernel reads them (FROM_MEMORY) and the gradient kernel turns them into G for cuBLAS's gradient
# GEMMs. A chunk holds at most GEMM_CHUNK_ELEMENTS similarities (128 MiB of fp32, plus 64 MiB of 16-bit G in
# the backward): at N = 32k, chunks of 1024 rows, GEMMs of 1024 x 32768 x D, large enough for cuBLAS's
# full rate. The kernels only stream (no dots), with 8-16 fp32 values a thread so that the heaviest variants
# (teacher + smoothing) compile without spills at 3-4 programs an SM; the forward's programs also split the
# columns of a chunk (gemm_programs), as a chunk has only 32 row blocks at N = 32k.
GEMM = dict(
    CHUNK_ELEMENTS=1 << 25,
    fwd=dict(R=32, BN=32, num_warps=4, num_stages=1, PER_SM=4),
    grad=dict(BI=32, BN=64, num_warps=4),
)
# Every kernel that forms probabilities from logits compiles without FMA contraction: the forward's max is of
# the rounded logits s·raw, and the backward's exp((s·raw − max) − log_sum) must subtract that same rounded
# value. Fused into fma(s, raw, −max) the product is unrounded, so at a row's largest logit (≥ 1e4 for
# unnormalised features at scale 100) L − max is off by an ulp of L and every gradient of the row by up to
# 0.5% (measured on an H100, 2026-11-28: da error 0.5-1.2 of max |da| ~250, fp32, both Triton backends,
# against 2e-5 for the chunked path; Triton's interpreter never fuses, so the CPU tests could not see it).
NO_FP_FUSION = dict(enable_fp_fusion=False)
COLREDUCE_BLOCK = 512  # columns per program of the partial-merging kernel (a stream, 4 warps)
# Under the interpreter (tests), two forward programs: a test-sized batch already makes a program loop over
# several row blocks and merge its column partials.
INTERPRETER_ROW_PROGRAMS = 2
INTERPRETER_GEMM_PROGRAMS = 6


def gemm_chunk_rows(Na, Nb):
    """Rows of a per chunk of the "gemm" backend: a multiple of the forward's row block, at least one block."""
    R = GEMM["fwd"]["R"]
    return min(Na, max(R, GEMM["CHUNK_ELEMENTS"] // max(1, Nb) // R * R))


def gemm_programs(device, fwd):
    """The "gemm" forward's target program count (row programs x column splits): what the GPU runs at once;
    under the interpreter (tests) INTERPRETER_GEMM_PROGRAMS, so test-sized chunks split their columns too."""
    if device.type != "cuda":
        return INTERPRETER_GEMM_PROGRAMS
    return fwd["PER_SM"] * torch.cuda.get_device_properties(device).multi_processor_count


def config(dtype):
    return CONFIGS["fp32" if dtype == torch.float32 else "16bit"]


def row_programs(n_row_blocks, device, fwd):
    """Forward programs: as many as fit on the GPU at once (capped by the row blocks there are)."""
    if device.type != "cuda":
        return min(n_row_blocks, INTERPRETER_ROW_PROGRAMS)
    return min(n_row_blocks, fwd["PER_SM"] * torch.cuda.get_device_properties(device).multi_processor_count)


def fwd_block_n(fwd, teacher):
    return fwd["BN_TEACHER"] if teacher else fwd["BN"]


def block_k(dtype, teacher):
    cfg = config(dtype)
    return cfg["BK_TEACHER"] if teacher else cfg["BK"]


def row_block(R, QP):
    """Images per block: R flattened rows, at least one image (QP > R: one image of QP rows)."""
    return max(1, R // QP)


def bwd_block_d(D, bwd, teacher=False):
    return max(16, min(bwd["BD_MAX_TEACHER" if teacher else "BD_MAX"], next_power_of_2(D)))


# ----------------------------------------------------------------------------------------------
# Compile-gate specs

# (label, mode, cols, smooth, teacher, Q): CLIP, MoCo (rows only), the heaviest softmax variant (smoothing +
# teacher), BLIP-2 (Q = 32) and SigLIP, in bf16; CLIP also in fp16 and fp32 (IEEE and TF32). Other flag
# combinations only remove work.
VARIANTS = (
    ("clip", MODE_SOFTMAX, True, False, False, 1),
    ("moco", MODE_SOFTMAX, False, False, False, 1),
    ("smooth+teacher", MODE_SOFTMAX, True, True, True, 1),
    ("blip2-q32", MODE_SOFTMAX, True, False, False, 32),
    ("siglip", MODE_SIGMOID, False, False, False, 1),
)
DTYPES = ((torch.bfloat16, "ieee"), (torch.float16, "ieee"), (torch.float32, "ieee"), (torch.float32, "tf32"))

# What Triton's JIT specialises for contiguous features with D a multiple of 16 (the shapes that matter:
# 512, 768, 1024): unit feature strides become constexpr 1, pointers and the other strides are 16-aligned.
_UNIT_STRIDES = dict(stride_ad=1, stride_bd=1, stride_atd=1, stride_btd=1)
_DIVISIBLE = ("a_ptr", "b_ptr", "at_ptr", "bt_ptr", "params_ptr", "row_ptr", "part_ptr", "col_ptr", "da_ptr", "db_ptr",
              "red_ptr", "raw_ptr", "traw_ptr", "g_ptr", "stride_an", "stride_aq", "stride_bn", "stride_atn",
              "stride_atq", "stride_btn", "D")
_FP32_POINTERS = ("params_ptr", "row_ptr", "part_ptr", "col_ptr", "red_ptr", "raw_ptr", "traw_ptr")
_FEATURE_POINTERS = ("a_ptr", "b_ptr", "at_ptr", "bt_ptr", "da_ptr", "db_ptr", "g_ptr")
_INTS = ("Na", "Nb", "Q", "D", "n_row_blocks", "n_row_terms", "n_col_terms", "diag_off", "n_part", "row0", "row_end",
         "split_cols")


def _spec(kernel, constexprs, dtype, label, **launch):
    types = {"stride_*": "i64", **{n: "i64" for n in _INTS}, **{n: "*fp32" for n in _FP32_POINTERS},
             **{n: "*" + DTYPE_NAMES[dtype] for n in _FEATURE_POINTERS}, **{n: "constexpr" for n in _UNIT_STRIDES}}
    signature = derive_signature(kernel, types)
    constexprs = {**constexprs, **{n: v for n, v in _UNIT_STRIDES.items() if n in signature}}
    # every dot kernel is compiled for aligned features: its 16-bit dots must run on wgmma on sm_90
    needs_wgmma = (dtype != torch.float32 and kernel not in (_contrastive_colreduce_kernel, _contrastive_grad_kernel)
                   and not constexprs.get("FROM_MEMORY"))
    if kernel is not _contrastive_colreduce_kernel:  # compiled as the launchers run them
        launch["options"] = {**launch.get("options", {}), **NO_FP_FUSION}
    return CompileSpec(kernel=kernel, signature=signature, constexprs=constexprs, label=label,
                       divisibility={n: 16 for n in _DIVISIBLE if n in signature}, needs_wgmma=needs_wgmma, **launch)


def compile_specs():
    """The forward, da and db kernels of every variant above at the launch configs the launchers use (the
    largest D chunk, and for plain bf16 CLIP the smaller chunks small D picks), and the column merge."""
    for smooth, teacher in ((False, False), (True, True)):
        yield _spec(_contrastive_colreduce_kernel, dict(SMOOTH=smooth, TEACHER=teacher, BLOCK=COLREDUCE_BLOCK),
                    torch.float32, f"smooth={smooth} teacher={teacher} BLOCK={COLREDUCE_BLOCK}", num_warps=4)
    for dtype, precision in DTYPES:
        cfg = config(dtype)
        fwd, bwd = cfg["fwd"], cfg["bwd"]
        for label, mode, cols, smooth, teacher, Q in VARIANTS:
            if dtype != torch.bfloat16 and label != "clip":
                continue
            QP = next_power_of_2(Q)
            tag = f"{label} {DTYPE_NAMES[dtype]}" + (f" {precision}" if dtype == torch.float32 else "")
            flags = dict(MODE=mode, COLS=cols, TEACHER=teacher, QP=QP, BK=block_k(dtype, teacher), PRECISION=precision,
                         EMULATE=False)
            fwd_c = dict(flags, SMOOTH=smooth, BI=row_block(fwd["R"], QP), BN=fwd_block_n(fwd, teacher),
                         FROM_MEMORY=False)
            R, BN, BK = fwd["R"], fwd_c["BN"], fwd_c["BK"]
            yield _spec(_contrastive_fwd_kernel, fwd_c, dtype, f"{tag} R={R} BN={BN} BK={BK}",
                        num_warps=fwd["num_warps"], num_stages=fwd["num_stages"],
                        **step(dots=[(R, BN, BK)], loads=[(R, BK, dtype), (BN, BK, dtype)]))
            launch = dict(num_warps=bwd["num_warps"], num_stages=bwd["num_stages"],
                          options={"maxnreg": bwd["maxnreg"]} if bwd["maxnreg"] else {})
            widest = bwd["BD_MAX_TEACHER" if teacher else "BD_MAX"]
            chunks = (widest, 64, 128, 256) if (label, dtype) == ("clip", torch.bfloat16) else (widest,)
            for bd in chunks:
                c = dict(flags, BI=row_block(bwd["R"], QP), BN=bwd["BN"], BD=bd)
                what = f"{tag} R={bwd['R']} BN={bwd['BN']} BK={c['BK']} BD={bd}"
                # one partner block at D = BD: the logits recomputed from both feature tiles, then the gradient
                # dot; the intensity of a D = BD problem (wider D adds K steps of the recompute)
                R, BN = bwd["R"], bwd["BN"]
                loads = [(R, bd, dtype), (BN, bd, dtype)]
                yield _spec(_contrastive_bwd_da_kernel, c, dtype, what, **launch,
                            **step(dots=[(R, BN, bd), (R, bd, BN)], loads=loads))
                yield _spec(_contrastive_bwd_db_kernel, c, dtype, what, **launch,
                            **step(dots=[(R, BN, bd), (bd, BN, R)], loads=loads))
    yield from gemm_compile_specs()


def gemm_compile_specs():
    """The "gemm" backend's two streaming kernels (no dots): the forward reading the similarities
    (FROM_MEMORY) and the gradient kernel, for every 2-D variant in bf16, and CLIP in fp16 / fp32."""
    fwd, grad = GEMM["fwd"], GEMM["grad"]
    for dtype, precision in DTYPES[:3]:
        for label, mode, cols, smooth, teacher, Q in VARIANTS:
            if Q > 1 or (dtype != torch.bfloat16 and label != "clip"):
                continue
            tag = f"gemm {label} {DTYPE_NAMES[dtype]}"
            flags = dict(MODE=mode, COLS=cols, TEACHER=teacher, EMULATE=False)
            yield _spec(_contrastive_fwd_kernel, dict(flags, SMOOTH=smooth, QP=1, BI=fwd["R"], BN=fwd["BN"], BK=16,
                                                      PRECISION=precision, FROM_MEMORY=True), dtype,
                        f"{tag} R={fwd['R']} BN={fwd['BN']}", num_warps=fwd["num_warps"], num_stages=fwd["num_stages"])
            yield _spec(_contrastive_grad_kernel, dict(flags, BI=grad["BI"], BN=grad["BN"]), dtype,
                        f"{tag} BI={grad['BI']} BN={grad['BN']}", num_warps=grad["num_warps"])
