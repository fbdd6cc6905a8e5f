"""gated_linear suite: the tanh-gated residual GEMM and whole gated cross-attention blocks, bf16, fwd and
fwd+bwd.

Workloads (``full`` / ``quick`` on CUDA; the issue's shapes):

- ``tanh_gated_linear`` at the out-projection and FFN down-projection of a Flamingo-3B-like block
  (M = 8 x 2048 tokens, d 2048, FFN 8192) and the out-projection of a Llama-3.2-11B-like layer (d 4096):
  ours (``mmfast_gemm``: backend="gemm", cuBLAS GEMMs + one-pass Triton kernels, what "auto" runs on CUDA;
  ``mmfast_triton``: the fused Triton GEMMs) vs a plain ``F.linear`` of the same shape (cuBLAS; the epilogue-free floor, target: within
  1.1x) and vs ``F.linear`` + the eager epilogue ``residual + tanh(g)·(·)`` (target: >= 1.3x);
- the Flamingo-3B-like GATED XATTN-DENSE block (d 2048, 16 heads, 2048 text tokens, 5 images x 64
  resampler latents, batch 8, GELU FFN x4) and a Llama-3.2-11B-like cross-attention layer (d 4096,
  32/8 heads, SwiGLU 14336, 2048 text tokens, 4 tiles x 1601 vision tokens, batch 1): ours
  (``mmfast.nn.GatedCrossAttentionBlock``; ``mmfast_auto``: its gated GEMMs on backend="gemm", attention on
  Triton; ``mmfast_triton``: everything on Triton) vs the eager reference block
  (``mmfast.nn.gated_cross_attention.gated_xattn_dense_reference``: dense masked softmax, as
  lucidrains / Hugging Face write it) and vs that reference under ``torch.compile`` (skipped with the reason when it fails;
  CUDA only). Targets (fwd+bwd): >= 1.5x eager, >= 1.15x torch.compile.

FLOPs count useful work: 2·M·N·K per GEMM (x3 for fwd+bwd), attention 4·D·H per visible
(query, key) pair (x3.5 for fwd+bwd, the attention suite's convention).

``smoke``: tiny shapes on the CPU; our cases run through the reference path (or the Triton kernels
through the interpreter when TRITON_INTERPRET=1), peers in eager PyTorch.
"""
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import Case, Skip, Workload

DTYPE = torch.bfloat16


@dataclass(frozen=True)
class GemmSpec:
    name: str
    M: int
    K: int
    N: int
    summary: str


@dataclass(frozen=True)
class BlockSpec:
    name: str
    variant: str
    batch: int
    text: int
    dim: int
    heads: int
    kv_heads: int
    images: int
    tokens_per_image: int
    hidden: int
    summary: str


GEMM_FULL = [
    GemmSpec("flamingo3b_out_proj", 8 * 2048, 2048, 2048, "Flamingo-3B-like xattn out-projection"),
    GemmSpec("flamingo3b_ffn_down", 8 * 2048, 8192, 2048, "Flamingo-3B-like FFN down-projection"),
    GemmSpec("llama32_11b_out_proj", 4 * 2048, 4096, 4096, "Llama-3.2-11B-like xattn out-projection"),
]
GEMM_SMOKE = [GemmSpec("flamingo3b_out_proj", 77, 64, 80, "tiny out-projection")]
BLOCK_FULL = [
    BlockSpec("flamingo3b_block", "flamingo", 8, 2048, 2048, 16, 16, 5, 64, 4 * 2048,
              "Flamingo-3B-like GATED XATTN-DENSE block"),
    BlockSpec("llama32_11b_xattn", "mllama", 1, 2048, 4096, 32, 8, 1, 4 * 1601, 14336,
              "Llama-3.2-11B-like cross-attention layer"),
]
HEADLINE = ("flamingo3b_out_proj", "flamingo3b_block")  # `bench --headline`: one GEMM, one block
BLOCK_SMOKE = [
    BlockSpec("flamingo3b_block", "flamingo", 2, 40, 64, 4, 4, 3, 4, 128, "tiny Flamingo-like block"),
    BlockSpec("llama32_11b_xattn", "mllama", 1, 24, 64, 4, 2, 1, 18, 96, "tiny Llama-3.2-like layer"),
]


def _rand(g, *shape, device, scale=1.0, grad=False):
    t = (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=DTYPE)  # random, never zeros
    return t.requires_grad_(grad)


def _timed(fn, backward, inputs):
    """fn() -> output; with backward, time output.backward(dy) too (dy fixed, grads reset each call)."""
    if not backward:
        def run():
            with torch.no_grad():
                fn()
        return run
    out = fn()
    dy = torch.randn_like(out)

    def run():
        for t in inputs:
            t.grad = None
        fn().backward(dy)
    return run


# ----------------------------------------------------------------------------------------------
# tanh_gated_linear


def _gemm_build(spec, device, backward):
    def build():
        g = torch.Generator().manual_seed(zlib.crc32(spec.name.encode()))
        return {"a": _rand(g, spec.M, spec.K, device=device, grad=backward),
                "w": _rand(g, spec.N, spec.K, device=device, scale=spec.K ** -0.5, grad=backward),
                "b": _rand(g, spec.N, device=device, grad=backward),
                # the gate in the model's dtype, as a bf16 model holds it (Flamingo's / Mllama's (1,) alpha): an
                # fp32 gate would make our output fp32 by torch's promotion (twice the eager chain's bytes out
                # and in dy, one more rounding pass in the backward) while the eager case casts it to bf16;
                # the 2026-11-28 H100 runs compared those two, not like with like
                "gate": torch.full((1,), 0.3, device=device, dtype=DTYPE, requires_grad=backward),
                "res": _rand(g, spec.M, spec.N, device=device, grad=backward), "backward": backward}
    return build


def _params(s):
    return [s[k] for k in ("a", "w", "b", "gate", "res")]


def _gemm_plain(s):
    return _timed(lambda: F.linear(s["a"], s["w"]), s["backward"], [s["a"], s["w"]])


def _gemm_eager(s):
    return _timed(lambda: s["res"] + torch.tanh(s["gate"]) * F.linear(s["a"], s["w"], s["b"]),
                  s["backward"], _params(s))


def _gemm_mmfast(backend):
    def make(s):
        from mmfast.kernels import tanh_gated_linear

        return _timed(lambda: tanh_gated_linear(s["a"], s["w"], s["b"], s["gate"], s["res"], backend=backend),
                      s["backward"], _params(s))
    return make


def _our_backends(device):
    from mmfast.kernels._dispatch import interpreting

    if device.type == "cuda":
        return ("gemm", "triton")
    return ("gemm", "triton", "reference") if interpreting() else ("reference",)


def _block_backends(device):
    """The block takes "auto" | "triton" | "reference"; on CUDA "auto" runs its gated GEMMs on backend="gemm"
    (and attention on Triton), on the CPU it is the reference."""
    from mmfast.kernels._dispatch import interpreting

    if device.type == "cuda":
        return ("auto", "triton")
    return ("triton", "reference") if interpreting() else ("reference",)


def _gemm_cases(device):
    out = [Case(f"mmfast_{b}", _gemm_mmfast(b), f"tanh_gated_linear(backend={b!r})") for b in _our_backends(device)]
    return out + [Case("torch_gemm", _gemm_plain, "F.linear(a, W) alone: same GEMM, no epilogue (cuBLAS)"),
                  Case("torch_gemm_eager_epilogue", _gemm_eager, "residual + tanh(g) * F.linear(a, W, b)")]


# ----------------------------------------------------------------------------------------------
# Blocks


def _block_build(spec, device, backward):
    def build():
        from mmfast.kernels.attention.masks import media_intervals
        from mmfast.nn import GatedCrossAttentionBlock

        torch.manual_seed(zlib.crc32(spec.name.encode()))
        blk = GatedCrossAttentionBlock(spec.dim, spec.heads, variant=spec.variant, kv_heads=spec.kv_heads,
                                       hidden=spec.hidden).to(device=device, dtype=DTYPE)
        with torch.no_grad():  # gates away from 0, so nothing is trivially the identity
            blk.attn_gate.fill_(0.5)
            blk.ff_gate.fill_(0.5)
        blk.requires_grad_(backward)
        g = torch.Generator().manual_seed(1)
        x = _rand(g, spec.batch, spec.text, spec.dim, device=device, grad=backward)
        media = _rand(g, spec.batch, spec.images, spec.tokens_per_image, spec.dim, device=device, grad=backward)
        loc = torch.zeros(spec.batch, spec.text, dtype=torch.bool)
        first = 6 if spec.variant == "mllama" else spec.text // (2 * spec.images)  # Llama: after the chat header
        loc[:, torch.linspace(first, spec.text - 1, spec.images + 1)[:-1].long()] = True
        loc = loc.to(device)
        kv_start, kv_end = media_intervals(loc.to(torch.int32), 1, spec.tokens_per_image, mode=blk.media_mode)
        return {"blk": blk, "x": x, "media": media, "loc": loc, "kv": (kv_start, kv_end), "backward": backward,
                "params": dict(blk.named_parameters())}
    return build


def _block_inputs(s):
    return [s["x"], s["media"]] + list(s["params"].values())


def _block_reference_fn(s):
    from mmfast.nn.gated_cross_attention import gated_xattn_dense_reference

    blk = s["blk"]
    return lambda: gated_xattn_dense_reference(s["x"], s["media"], s["loc"], s["params"], heads=blk.heads,
                                               kv_heads=blk.kv_heads, variant=blk.variant)


def _block_eager(s):
    return _timed(_block_reference_fn(s), s["backward"], _block_inputs(s))


def _block_compiled(s):
    if s["x"].device.type != "cuda":
        raise Skip("torch.compile case runs on CUDA only (on the CPU the inductor build would dominate the run)")
    from mmfast.nn.gated_cross_attention import gated_xattn_dense_reference

    blk = s["blk"]
    compiled = torch.compile(gated_xattn_dense_reference)
    fn = lambda: compiled(s["x"], s["media"], s["loc"], s["params"], heads=blk.heads,  # noqa: E731
                          kv_heads=blk.kv_heads, variant=blk.variant)
    try:
        fn()
    except Exception as exc:
        raise Skip(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}") from None
    return _timed(fn, s["backward"], _block_inputs(s))


def _block_mmfast(backend):
    def make(s):
        blk = s["blk"]
        blk.backend = backend
        kv_start, kv_end = s["kv"]
        return _timed(lambda: blk(s["x"], s["media"], kv_start=kv_start, kv_end=kv_end), s["backward"],
                      _block_inputs(s))
    return make


def _block_cases(device):
    out = [Case(f"mmfast_{b}", _block_mmfast(b), f"GatedCrossAttentionBlock(backend={b!r})")
           for b in _block_backends(device)]
    return out + [Case("eager_reference", _block_eager, "reference block, eager (dense masked softmax)"),
                  Case("compiled_reference", _block_compiled, "reference block under torch.compile")]


def _block_flops(spec):
    B, L, D, H, Hkv = spec.batch, spec.text, spec.dim, spec.heads, spec.kv_heads
    dh = D // H
    lk = spec.images * spec.tokens_per_image
    M = B * L
    proj = 2 * M * D * D * 2 + 2 * B * lk * D * 2 * Hkv * dh  # q, out; k, v
    ffn = 2 * M * D * spec.hidden * (3 if spec.variant == "mllama" else 2)
    # visible pairs: every token at or after the first image sees one image (tokens_per_image keys)
    pairs = B * L * spec.tokens_per_image  # an upper bound: the few tokens before the first image see none
    return proj + ffn, 4 * dh * H * pairs


def workloads(mode, device):
    device = torch.device(device)
    smoke = mode == "smoke"
    out = []
    for spec in GEMM_SMOKE if smoke else GEMM_FULL:
        for backward in (False, True):
            direction = "fwd+bwd" if backward else "fwd"
            flops = 2 * spec.M * spec.N * spec.K * (3 if backward else 1)
            nbytes = DTYPE.itemsize * (spec.M * spec.K + spec.N * spec.K + 2 * spec.M * spec.N) * (3 if backward else 1)
            info = {"model": spec.name, "direction": direction, "M": spec.M, "K": spec.K, "N": spec.N, "dtype": "bf16",
                    "headline": spec.name in HEADLINE,
                    "summary": f"{spec.summary}: tanh_gated_linear M={spec.M} K={spec.K} N={spec.N}, bf16, {direction}"}
            out.append(Workload(f"{spec.name} {direction}", _gemm_build(spec, device, backward), nbytes, info,
                                _gemm_cases(device), baselines={"gemm": "torch_gemm", "eager": "torch_gemm_eager_epilogue"},
                                flops_per_call=flops))
    for spec in BLOCK_SMOKE if smoke else BLOCK_FULL:
        gemm_flops, attn_flops = _block_flops(spec)
        for backward in (False, True):
            direction = "fwd+bwd" if backward else "fwd"
            flops = int(gemm_flops * (3 if backward else 1) + attn_flops * (3.5 if backward else 1))
            acts = spec.batch * (spec.text + spec.images * spec.tokens_per_image) * spec.dim
            weights = spec.dim * spec.dim * 4 + spec.dim * spec.hidden * (3 if spec.variant == "mllama" else 2)
            nbytes = DTYPE.itemsize * (2 * acts + weights) * (3 if backward else 1)
            info = {"model": spec.name, "direction": direction, "variant": spec.variant, "batch": spec.batch,
                    "headline": spec.name in HEADLINE and not smoke,  # the block through the interpreter: ~30 s
                    "text": spec.text, "dim": spec.dim, "heads": spec.heads, "kv_heads": spec.kv_heads,
                    "visual_tokens": spec.images * spec.tokens_per_image, "dtype": "bf16",
                    "summary": f"{spec.summary}: B={spec.batch} L={spec.text} d={spec.dim} H={spec.heads}/{spec.kv_heads} "
                               f"{spec.images}x{spec.tokens_per_image} visual tokens, bf16, {direction}"}
            out.append(Workload(f"{spec.name} {direction}", _block_build(spec, device, backward), nbytes, info,
                                _block_cases(device), baselines={"eager": "eager_reference", "compile": "compiled_reference"},
                                flops_per_call=flops))
    return out
