"""Attention suite: flash attention at the shapes of the models mmfast assembles, bf16, forward and
forward + backward, against the peers a user would otherwise call.

Workloads (``full`` / ``quick`` on CUDA; the issue's shapes):

- ViT-L/14@336 encoder: B=64, L=577, H=16, D=64, no mask;
- ViT-H/14@224 encoder: B=64, L=257, H=16, D=80 (a head dim FlexAttention rejects);
- CLIP text encoder: B=256, L=77, H=8, D=64, causal;
- LLM (LLaVA's decoder): B=4, L=4096, H=32, D=128, causal;
- Flamingo text → image cross-attention: B=4, 2048 text tokens, 5 images x 64 resampler tokens,
  H=32, D=128, each token sees only the most recent image (tokens before the first image see nothing);
- Llama 3.2 Vision cross-attention: B=4, 2048 text tokens, 4 tiles x 1601 visual tokens, 32 query /
  8 KV heads (GQA), D=128, image placeholder after the chat header (the header sees nothing).

Peers, each only where installed and able (skipped with the reason otherwise): SDPA with each of its
flash / cuDNN / memory-efficient / math backends (``torch.nn.attention.sdpa_kernel``) — with the
equivalent dense boolean mask for interval-masked cases —, FlexAttention compiled with the equivalent
BlockMask, flash-attn (``flash_attn_func``) and xformers (``memory_efficient_attention``) for the
masks they express.

TFLOP/s count only visible work: 4·D·H per visible (query, key) pair forward, 2.5x that backward
(flash-attn's convention), so a kernel that skips hidden blocks gets no credit for the skipped ones and
a dense-mask peer gets none for the work it wastes.

``smoke``: tiny shapes on the CPU (reference, Triton through the interpreter when TRITON_INTERPRET=1,
SDPA math, FlexAttention eager), the backward only for CLIP text and Llama 3.2 (the interpreter is slow)
— every case's output is checked against an fp64 computation with the
same mask, which proves the dense masks and BlockMasks given to the peers encode the same attention.
"""
import math
import warnings
import zlib
from dataclasses import dataclass, replace

import torch

from .common import Case, Skip, Workload

DTYPE = torch.bfloat16
IMAGE_TOKEN = -1  # placeholder id in the synthetic token streams


@dataclass(frozen=True)
class Spec:
    name: str
    batch: int
    seqlen_q: int
    seqlen_k: int
    heads: int
    head_dim: int
    kv_heads: int = 0  # 0: same as heads
    mask: str = "none"  # none | causal | media
    image_at: tuple = ()  # media: positions of the image placeholders in every text row
    tokens_per_image: int = 0
    media_mode: str = "most_recent"
    summary: str = ""

    @property
    def hkv(self):
        return self.kv_heads or self.heads


FULL = [
    Spec("vit_l14_336", 64, 577, 577, 16, 64, summary="ViT-L/14@336 self-attention, no mask"),
    Spec("vit_h14_224", 64, 257, 257, 16, 80, summary="ViT-H/14@224 self-attention, head dim 80"),
    Spec("clip_text", 256, 77, 77, 8, 64, mask="causal", summary="CLIP text encoder, causal"),
    Spec("llm_causal", 4, 4096, 4096, 32, 128, mask="causal", summary="LLM decoder (LLaVA), causal"),
    Spec("flamingo_xattn", 4, 2048, 5 * 64, 32, 128, mask="media", image_at=(100, 500, 900, 1300, 1700),
         tokens_per_image=64, summary="Flamingo text→image, 5 images x 64 tokens, most recent image only"),
    Spec("llama32_xattn", 4, 2048, 4 * 1601, 32, 128, kv_heads=8, mask="media", image_at=(6,),
         tokens_per_image=4 * 1601, media_mode="most_recent_group",
         summary="Llama 3.2 Vision text→image, 4 tiles x 1601 tokens, GQA 32/8"),
]

# The FlashAttention-3 paper's benchmark (its Fig. 5 / 6): 16k tokens per batch, hidden size 2048 (H = 2048 / D),
# D = 64 and 128, causal and not; three of its sequence lengths (the tuner's shapes: `bench tune --shapes headline`).
HEADLINE = [
    Spec(f"fa3_L{L}_D{D}" + ("_causal" if causal else ""), 16384 // L, L, L, 2048 // D, D,
         mask="causal" if causal else "none", summary=f"FlashAttention-3 paper's shape, 16k tokens, D={D}"
         + (", causal" if causal else ""))
    for D in (64, 128) for causal in (False, True) for L in (1024, 4096, 16384)
]

SMOKE = [
    Spec("vit_l14_336", 1, 37, 37, 2, 64, summary="tiny ViT-L/14-like, no mask"),
    Spec("vit_h14_224", 1, 29, 29, 2, 80, summary="tiny ViT-H/14-like, head dim 80"),
    Spec("clip_text", 2, 17, 17, 2, 64, mask="causal", summary="tiny CLIP text, causal"),
    Spec("llm_causal", 1, 33, 33, 2, 128, mask="causal", summary="tiny LLM, causal"),
    Spec("flamingo_xattn", 2, 40, 3 * 4, 2, 64, mask="media", image_at=(3, 15, 30), tokens_per_image=4,
         summary="tiny Flamingo text→image, 3 images x 4 tokens"),
    Spec("llama32_xattn", 1, 24, 2 * 9, 4, 64, kv_heads=2, mask="media", image_at=(5,), tokens_per_image=18,
         media_mode="most_recent_group", summary="tiny Llama 3.2 text→image, GQA 4/2"),
]

SMOKE_BACKWARD = ("clip_text", "llama32_xattn")

# `bench --headline` (the GPU check's first step, a short budget in which every case also compiles): the
# FA3 grid's D=64 non-causal L=1024 and 4096, and a CLIP/ViT encoder, each fwd and fwd+bwd with its
# baselines (SDPA flash / cuDNN, FlexAttention); in this order, which the round-robin keeps. The rest of
# the grid and the model shapes are `--rest`.
HEADLINE_BENCH = ("fa3_L1024_D64", "fa3_L4096_D64", "vit_l14_336")


SMOKE_HEADLINE = ("vit_l14_336", "llm_causal")  # at smoke size: D = 64 without a mask, D = 128 causal


def _specs(mode, device):
    if mode == "smoke":
        return SMOKE
    if device.type == "cuda":
        specs = HEADLINE + FULL
        first = [next(s for s in specs if s.name == name) for name in HEADLINE_BENCH]
        return first + [s for s in specs if s.name not in HEADLINE_BENCH]
    # CPU quick/full: the same structure at sizes a CPU finishes (timings are for trends only)
    out = []
    for s in FULL:
        scale = min(1.0, 256 / s.seqlen_q)
        image_at = tuple(int(p * scale) for p in s.image_at)
        tpi = max(1, int(s.tokens_per_image * scale)) if s.mask == "media" else 0
        lk = len(image_at) * tpi if s.mask == "media" else max(1, int(s.seqlen_k * scale))
        out.append(replace(s, batch=1, seqlen_q=max(1, int(s.seqlen_q * scale)), seqlen_k=lk,
                           image_at=image_at, tokens_per_image=tpi))
    return out


# ----------------------------------------------------------------------------------------------
# Inputs and masks


def _intervals(spec, device):
    """(kv_start, kv_end) of shape (B, Lq) for media workloads, else None."""
    if spec.mask != "media":
        return None
    from mmfast.kernels.attention.masks import media_intervals

    ids = torch.arange(spec.seqlen_q).repeat(spec.batch, 1)
    ids[:, list(spec.image_at)] = IMAGE_TOKEN
    s, e = media_intervals(ids, IMAGE_TOKEN, spec.tokens_per_image, mode=spec.media_mode)
    return s.to(device), e.to(device)


def _visible_pairs(spec, intervals):
    if intervals is not None:
        return int((intervals[1].long() - intervals[0].long()).clamp(min=0).sum())
    if spec.mask == "causal":  # bottom-right aligned
        shift = spec.seqlen_k - spec.seqlen_q
        return spec.batch * sum(min(spec.seqlen_k, max(0, i + shift + 1)) for i in range(spec.seqlen_q))
    return spec.batch * spec.seqlen_q * spec.seqlen_k


def _dense(spec, intervals, device):
    """(B, 1, Lq, Lk) bool, True = attend: SDPA's boolean attn_mask convention."""
    j = torch.arange(spec.seqlen_k, device=device)
    if intervals is not None:
        s, e = intervals
        return ((j >= s[..., None]) & (j < e[..., None]))[:, None]
    i = torch.arange(spec.seqlen_q, device=device)[:, None]
    visible = j <= i + (spec.seqlen_k - spec.seqlen_q) if spec.mask == "causal" else torch.ones_like(j <= i)
    return visible.expand(spec.batch, 1, spec.seqlen_q, spec.seqlen_k)


def _build(spec, device, backward, check):
    def build():
        g = torch.Generator(device="cpu").manual_seed(zlib.crc32(spec.name.encode()))

        def rand(*shape):  # random, never zeros
            return torch.randn(*shape, generator=g).to(device=device, dtype=DTYPE).requires_grad_(backward)

        B, Lq, Lk, H, Hkv, D = spec.batch, spec.seqlen_q, spec.seqlen_k, spec.heads, spec.hkv, spec.head_dim
        state = {"spec": spec, "q": rand(B, Lq, H, D), "k": rand(B, Lk, Hkv, D), "v": rand(B, Lk, Hkv, D),
                 "intervals": _intervals(spec, device), "backward": backward, "cache": {}}
        state["do"] = rand(B, Lq, H, D).detach() if backward else None
        if check:
            state["expected"] = _expected(state)
        return state

    return build


def _expected(state):
    """fp64 attention with the dense mask; rows that see nothing are 0."""
    spec = state["spec"]
    q, k, v = (state[n].detach().double().transpose(1, 2) for n in "qkv")
    groups = spec.heads // spec.hkv
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    mask = _dense(spec, state["intervals"], q.device)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(spec.head_dim)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    o = (p @ v).transpose(1, 2)
    if not state["backward"]:
        return o, mask.any(-1)[:, 0]  # (B, Lq) rows with a visible key
    q, k, v = (state[n].detach().double().requires_grad_() for n in "qkv")
    kk, vv = (t.transpose(1, 2).repeat_interleave(groups, 1) for t in (k, v))
    s = (q.transpose(1, 2) @ kk.transpose(-1, -2)) / math.sqrt(spec.head_dim)
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    out = (p @ vv).transpose(1, 2)
    grads = torch.autograd.grad(out, (q, k, v), state["do"].double())
    return grads, mask.any(-1)[:, 0]


# ----------------------------------------------------------------------------------------------
# Cases: (state) -> fn; every layout conversion a peer needs happens here, outside the timed call


def _timed(state, fwd, inputs):
    """fn() for the forward, or forward + backward (autograd.grad: no accumulation into .grad)."""
    if not state["backward"]:
        fn = lambda: fwd(*inputs)  # noqa: E731
    else:
        do = state["do"]
        to_bshd = state.get("to_bshd", lambda o: o)

        def fn():
            return torch.autograd.grad(to_bshd(fwd(*inputs)), inputs, do)

    if "expected" in state:
        _check(state, fn(), state.get("to_bshd", lambda o: o), state.get("grads_to_bshd", lambda g: g))
    return fn


def _check(state, result, to_bshd, grads_to_bshd):
    """Smoke mode: the case computes the same attention (same mask) as the fp64 definition."""
    expected, has_key = state["expected"]
    if state["backward"]:
        got = grads_to_bshd(result)
        pairs = list(zip(("dq", "dk", "dv"), got, expected))
    else:
        out = to_bshd(result)
        # peers may write NaN on rows that see no key (that is their behaviour, not a mask error)
        pairs = [("out", torch.where(has_key[..., None, None], out.double(), 0.0), expected)]
    for what, a, e in pairs:
        err = (a.double() - e).abs().max().item() if a.numel() else 0.0
        if not err <= 0.08 * max(1.0, e.abs().max().item()):
            raise RuntimeError(f"wrong result: {what} differs from the fp64 definition by {err:.3g}")


def _mmfast(backend):
    def make(state):
        from mmfast.kernels import flash_attention

        spec, iv = state["spec"], state["intervals"]
        kwargs = {"causal": spec.mask == "causal", "backend": backend}
        if iv is not None and backend == "reference":
            kwargs.update(kv_start=iv[0], kv_end=iv[1])
        elif iv is not None:
            from mmfast.kernels import build_block_mask

            # the block-skipping metadata, built once outside the timed call and reused, as a model's layers do
            kwargs["block_mask"] = build_block_mask(spec.seqlen_q, spec.seqlen_k, kv_start=iv[0], kv_end=iv[1],
                                                    device=iv[0].device)
        return _timed(state, lambda q, k, v: flash_attention(q, k, v, **kwargs), (state["q"], state["k"], state["v"]))

    return make


SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "math": "MATH"}


def _sdpa(which):
    def make(state):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        spec = state["spec"]
        if which in ("cudnn", "efficient") and state["q"].device.type != "cuda":
            raise Skip(f"SDPA's {which} backend runs only on CUDA")
        backend = getattr(SDPBackend, SDPA_BACKENDS[which], None)
        if backend is None:
            raise Skip(f"this torch has no SDPBackend.{SDPA_BACKENDS[which]}")
        kwargs = {}
        if spec.mask == "media":
            if which == "flash":
                raise Skip("SDPA's flash backend takes no attn_mask (interval masks need the dense-mask backends)")
            kwargs["attn_mask"] = _dense(spec, state["intervals"], state["q"].device)
        elif spec.mask == "causal":
            if spec.seqlen_q != spec.seqlen_k:
                raise Skip("is_causal is top-left aligned for Lq != Lk")
            kwargs["is_causal"] = True
        if spec.hkv != spec.heads:
            kwargs["enable_gqa"] = True
        state["to_bshd"] = lambda o: o.transpose(1, 2)
        inputs = (state["q"], state["k"], state["v"])

        def fwd(q, k, v):
            with sdpa_kernel(backend):  # (B, H, L, D) views of the (B, L, H, D) tensors, as models call it
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)

        return _timed(state, fwd, inputs)

    return make


def _flex(state):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        raise Skip(f"FlexAttention unavailable: {exc}") from None
    spec, device = state["spec"], state["q"].device
    if spec.mask == "media":
        start, end = state["intervals"]

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx >= start[b, q_idx]) & (kv_idx < end[b, q_idx])

        batch = spec.batch
    elif spec.mask == "causal":
        shift = spec.seqlen_k - spec.seqlen_q

        def mask_mod(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + shift

        batch = None
    else:
        mask_mod = None
    block_mask = None
    if mask_mod is not None:
        block_mask = create_block_mask(mask_mod, batch, None, spec.seqlen_q, spec.seqlen_k, device=str(device))
    if device.type == "cuda":
        attend = torch.compile(flex_attention, dynamic=False)
    else:  # eager on the CPU: proves the BlockMask, times nothing useful

        def attend(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
                return flex_attention(*args, **kwargs)
    kwargs = {"block_mask": block_mask}
    if spec.hkv != spec.heads:
        kwargs["enable_gqa"] = True
    state["to_bshd"] = lambda o: o.transpose(1, 2)

    def fwd(q, k, v):
        return attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), **kwargs)

    return _timed(state, fwd, (state["q"], state["k"], state["v"]))


def _flash_attn(state):
    try:
        from flash_attn import flash_attn_func
    except Exception as exc:
        raise Skip(f"flash-attn not importable ({type(exc).__name__}: {exc})") from None
    spec = state["spec"]
    if spec.mask == "media":
        raise Skip("flash-attn has no interval masks (only causal / sliding window)")
    if state["q"].device.type != "cuda":
        raise Skip("flash-attn needs CUDA")
    causal = spec.mask == "causal"
    return _timed(state, lambda q, k, v: flash_attn_func(q, k, v, causal=causal), (state["q"], state["k"], state["v"]))


def _xformers(state):
    try:
        import xformers.ops as xops
    except Exception as exc:
        raise Skip(f"xformers not importable ({type(exc).__name__}: {exc})") from None
    spec = state["spec"]
    if spec.mask == "media":
        raise Skip("xformers has no interval masks (a dense bias is what the SDPA dense-mask cases measure)")
    if spec.hkv != spec.heads:
        raise Skip("xformers GQA needs a 5-D layout; not benchmarked")
    bias = xops.LowerTriangularMask() if spec.mask == "causal" else None
    return _timed(state, lambda q, k, v: xops.memory_efficient_attention(q, k, v, attn_bias=bias),
                  (state["q"], state["k"], state["v"]))


def cases(device):
    from mmfast.kernels._dispatch import interpreting

    out = []
    if device.type == "cuda" or interpreting():
        out.append(Case("mmfast_triton", _mmfast("triton"), "flash_attention(backend='triton')"))
    if device.type != "cuda":
        out.append(Case("mmfast_reference", _mmfast("reference"), "flash_attention(backend='reference')"))
    out += [Case(f"sdpa_{b}", _sdpa(b), f"SDPA, sdpa_kernel({SDPA_BACKENDS[b]})") for b in SDPA_BACKENDS]
    out += [Case("flex_attention", _flex, "FlexAttention " + ("compiled" if device.type == "cuda" else "eager")
                 + " with the equivalent BlockMask"),
            Case("flash_attn", _flash_attn, "flash_attn_func (flash-attn 2/3)"),
            Case("xformers", _xformers, "xformers.ops.memory_efficient_attention")]
    return out


def workloads(mode, device):
    device = torch.device(device)
    out = []
    for spec in _specs(mode, device):
        pairs = _visible_pairs(spec, _intervals(spec, "cpu"))
        total = spec.batch * spec.seqlen_q * spec.seqlen_k
        fwd_flops = 4 * spec.heads * spec.head_dim * pairs
        q_bytes = spec.batch * spec.seqlen_q * spec.heads * spec.head_dim * DTYPE.itemsize
        kv_bytes = spec.batch * spec.seqlen_k * spec.hkv * spec.head_dim * DTYPE.itemsize
        shape = (f"B={spec.batch} Lq={spec.seqlen_q} Lk={spec.seqlen_k} H={spec.heads}"
                 + (f"/{spec.hkv}" if spec.hkv != spec.heads else "") + f" D={spec.head_dim}")
        # smoke: the backward once per mask kind that changes the code path (causal; intervals with GQA)
        directions = (False, True) if mode != "smoke" or spec.name in SMOKE_BACKWARD else (False,)
        for backward in directions:
            direction = "fwd+bwd" if backward else "fwd"
            flops = int(fwd_flops * (3.5 if backward else 1.0))
            # minimal traffic: fwd reads q, k, v and writes o; bwd also reads o, dO and writes dq, dk, dv
            nbytes = (6 if backward else 2) * (q_bytes + kv_bytes)
            info = {"model": spec.name, "direction": direction,
                    "headline": spec.name in (SMOKE_HEADLINE if mode == "smoke" else HEADLINE_BENCH)
                    and (mode == "smoke" or device.type == "cuda"),
                    "mask": spec.mask, "batch": spec.batch,
                    "seqlen_q": spec.seqlen_q, "seqlen_k": spec.seqlen_k, "heads": spec.heads, "kv_heads": spec.hkv,
                    "head_dim": spec.head_dim, "dtype": "bf16", "visible_fraction": pairs / max(1, total),
                    "summary": f"{spec.summary}; {shape}, bf16, {direction}; {100 * pairs / max(1, total):.0f}% of "
                               f"(query, key) pairs visible, {flops / 1e9:.2f} GFLOP counted"}
            dense_peer = "sdpa_efficient" if spec.mask == "media" else "sdpa_flash"
            baselines = {"sdpa": dense_peer, "cudnn": "sdpa_cudnn", "flex": "flex_attention"}
            out.append(Workload(f"{spec.name} {direction}", _build(spec, device, backward, mode == "smoke"), nbytes,
                                info, cases(device), baselines=baselines, flops_per_call=flops))
    return out
