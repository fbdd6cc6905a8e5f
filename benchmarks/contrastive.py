"""Contrastive suite: the CLIP loss (symmetric InfoNCE on unit features, learnable log temperature),
forward + backward, bf16, at the batch sizes CLIP trains with.

Workloads: N = 4k, 16k, 32k, 64k x D = 512, 768 (``full`` on CUDA; ``quick``: 4k and 16k at D = 512;
``smoke``: N = 200, D = 64 on the CPU). Cases:

- ``mmfast``: ``contrastive_loss`` in one call: what "auto" runs (on CUDA the "gemm" backend: cuBLAS for
  the GEMMs, Triton for the statistics and G; the chunked path on CPU);
- ``mmfast_triton``: ``backend="triton"``, the fused kernels that recompute every tile (O(N) memory);
- ``open_clip_ClipLoss``: open_clip's ClipLoss where installed, else the same naive computation
  written inline (logits = s·a·bᵀ materialised, (CE(logits) + CE(logitsᵀ)) / 2) — the note says which;
- ``mmfast_gemm_8warps`` (CUDA): the "gemm" backend with ``GEMM_CANDIDATE``'s launch configs, a tuning candidate
  for its streaming kernels (see there), timed beside the default;
- ``inf_cl_2calls``: Inf-CL's ``cal_inf_loss`` called once per direction (it computes one direction),
  where installed;
- the floor is not a case: "% roof" is the time of three N×N×D GEMMs (logits, da, db) at the measured
  bf16 matmul rate over the case's time.

TFLOP/s count the three-GEMM floor's 6·N²·D flops for every case; "extra MiB" (CUDA) is the peak a call
allocates beyond its inputs, so it includes the gradients da, db (2·N·D bf16: 32 MiB at N = 32k, D = 512)
and, for the naive loss, the N×N logits, softmax and their gradients. Speed targets live here, not in
tests: at N = 32k, D = 512 extra memory ≤ 64 MiB beyond the gradients, time ≤ 1.5x the floor, ≥ 2x
faster than the naive loss, ≥ 1.5x faster than two Inf-CL calls; N = 64k runs where the naive loss
runs out of memory (its case is then skipped with the OutOfMemoryError as the reason).

The first H100 run (2026-11-28, N = 32k) measured the fused Triton kernels at 67.6 ms against open_clip's
32.1 ms (about 80 TFLOP/s: tiles small enough to keep the statistics in registers run the tensor cores
far below their rate). The "gemm" backend that auto now runs does 4 N·N·D GEMMs at cuBLAS's rate (the
forward's similarities, their recomputation, da, db) and streams 4-10 bytes per similarity between
them, in chunks of 2^25 similarities (128 MiB fp32 + 64 MiB of G + two N·D fp32 db accumulators: ~320
MiB beyond the gradients at N = 32k, D = 512, against the naive loss's ~10 GiB): expected ~12-15 ms at
N = 32k on an H100, not yet measured. "triton" keeps the memory target below at that speed.

What to expect of "≤ 1.5x the floor" (the fused kernels): mmfast_triton does 5 N·N·D GEMM-equivalents (the forward's logits; each
backward kernel recomputes them and does its own GEMM) against the floor's 3, so it would need 111% of
the measured matmul rate; no kernel that keeps the memory target can meet it. Without the N×N matrix the
backward must recompute the logits (4 GEMM-equivalents at least), and doing so once for both da and db
needs an fp32 N·D accumulator shared by all programs through atomics (64 MiB at N = 32k, D = 512, which
alone fills the memory budget, and not deterministic) at ≥ 89% of the matmul rate. The benchmark
reports the ratio as measured.
"""
import math

import torch

from .common import Case, Skip, Workload

DTYPE = torch.bfloat16


def _sizes(mode, device):
    if mode == "smoke":
        return [(200, 64)]
    if device.type != "cuda":
        return [(1024, 512), (4096, 512)] if mode == "full" else [(1024, 512)]
    if mode == "quick":
        return [(4096, 512), (16384, 512), (32768, 512)]
    return [(n, d) for d in (512, 768) for n in (4096, 16384, 32768, 65536)]


def _naive_loss():
    try:
        from open_clip.loss import ClipLoss

        loss = ClipLoss()
        return (lambda a, b, s: loss(a, b, s)), "open_clip.loss.ClipLoss"
    except Exception:  # not installed (or its imports fail): the same math inline
        def clip_loss(a, b, s):
            logits = s * a @ b.T
            labels = torch.arange(a.shape[0], device=a.device)
            ce = torch.nn.functional.cross_entropy
            return (ce(logits, labels) + ce(logits.T, labels)) / 2

        return clip_loss, "naive ClipLoss inline (open_clip not installed)"


def _features(state):
    a, b, t = state
    return (a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_(),
            t.detach().clone().requires_grad_())


def _step(loss_fn, a, b, t):
    def fn():
        a.grad = b.grad = t.grad = None
        loss_fn(a, b, t).backward()

    return fn


def _mmfast(case, backend=None):
    def make(state):
        from mmfast.kernels import contrastive_loss, interpreting

        a, b, t = _features(state)
        # on the CPU auto would run the naive reference; the chunked path is what the kernels compute
        chosen = backend or ("auto" if a.is_cuda else "chunked")
        if chosen == "triton" and not a.is_cuda and not interpreting():
            raise Skip("backend='triton' needs CUDA, or TRITON_INTERPRET=1 on the CPU")
        fn = _step(lambda x, y, s: contrastive_loss(x, y, s, backend=chosen), a, b, t)
        return fn

    return make


# A tuning candidate for the "gemm" backend's two streaming kernels, timed beside the default so that one GPU
# run decides: 8 warps over the same tiles halve the values each thread holds (the gate, Triton 3.8: the CLIP
# gradient kernel 146-152 -> 77-88 registers, 12 -> 16-24 warps an SM; the forward 124-128 -> 75-77, 16 -> 24
# warps; no spills in any 2-D variant). Whether more warps a tile beat the default is the GPU's to say.
GEMM_CANDIDATE = {"fwd": {"num_warps": 8}, "grad": {"num_warps": 8}}


def _with_gemm_config(fn, overrides):
    """fn with the gemm backend's launch configs overridden for the duration of each call."""
    from mmfast.kernels.contrastive._configs import GEMM

    def run():
        saved = {k: dict(GEMM[k]) for k in overrides}
        for k, v in overrides.items():
            GEMM[k].update(v)
        try:
            fn()
        finally:
            for k, v in saved.items():
                GEMM[k].clear()
                GEMM[k].update(v)
    return run


def _mmfast_candidate(case):
    def make(state):
        from mmfast.kernels import interpreting

        if not state[0].is_cuda and not interpreting():
            raise Skip("backend='gemm' needs CUDA, or TRITON_INTERPRET=1 on the CPU")
        return _with_gemm_config(_mmfast(case, "gemm")(state), GEMM_CANDIDATE)

    return make


def _naive(case):
    def make(state):
        loss, which = _naive_loss()
        case.note = which
        a, b, t = _features(state)
        fn = _step(lambda x, y, s: loss(x, y, s.exp().clamp(max=100)), a, b, t)
        return fn

    return make


def _inf_cl(case):
    def make(state):
        try:
            from inf_cl import cal_inf_loss
        except Exception as exc:
            raise Skip(f"Inf-CL not installed ({type(exc).__name__}: {exc})") from None
        a, b, t = _features(state)
        if a.device.type != "cuda":
            raise Skip("Inf-CL runs on CUDA only")
        labels = torch.arange(a.shape[0], device=a.device)

        def loss(x, y, s):
            s = s.exp().clamp(max=100)
            # Inf-CL computes one direction per call (and wants fp32 features)
            return (cal_inf_loss(x.float(), y.float(), labels=labels, scale=s).mean()
                    + cal_inf_loss(y.float(), x.float(), labels=labels, scale=s).mean()) / 2

        fn = _step(loss, a, b, t)
        return fn

    return make


def cases():
    mm = Case("mmfast", None, "contrastive_loss, one call (auto: 'gemm' on CUDA)")
    fused = Case("mmfast_triton", None, "contrastive_loss(backend='triton'): the fused kernels, O(N) memory")
    naive = Case("open_clip_ClipLoss", None, "")
    inf = Case("inf_cl_2calls", None, "Inf-CL cal_inf_loss x 2 directions")
    cand = Case("mmfast_gemm_8warps", None, "backend='gemm' with GEMM_CANDIDATE's launch configs (tuning candidate)")
    mm.make, fused.make, naive.make, inf.make = _mmfast(mm), _mmfast(fused, "triton"), _naive(naive), _inf_cl(inf)
    cand.make = _mmfast_candidate(cand)
    return [mm, cand, naive, fused, inf]


def workloads(mode, device):
    device = torch.device(device)
    out = []
    for seed, (n, d) in enumerate(_sizes(mode, device)):
        floor_flops = 6.0 * n * n * d

        def build(n=n, d=d, seed=seed):
            g = torch.Generator(device=device).manual_seed(seed)
            # unit features, as the encoders hand them to the loss (open_clip normalises in the model)
            nf = torch.nn.functional
            a = nf.normalize(torch.randn(n, d, generator=g, device=device), dim=-1).to(DTYPE)
            b = nf.normalize(torch.randn(n, d, generator=g, device=device), dim=-1).to(DTYPE)
            return a, b, torch.tensor(math.log(1 / 0.07), device=device)

        nbytes = 4 * n * d * DTYPE.itemsize  # read a, b; write da, db
        info = {"N": n, "D": d, "dtype": "bf16", "floor_flops": floor_flops,
                "headline": mode == "smoke" or (n, d) == (32768, 512),  # `bench --headline`: CLIP at 32k
                "summary": f"CLIP loss fwd+bwd, N={n}, D={d}, bf16; 3-GEMM floor {floor_flops / 1e12:.2f} TFLOP"}
        out.append(Workload(f"clip_loss N={n} D={d}", build, nbytes, info, cases(),
                            baselines={"naive": "open_clip_ClipLoss", "inf_cl": "inf_cl_2calls"},
                            flops_per_call=int(floor_flops)))
    return out
