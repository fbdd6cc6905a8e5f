"""Tanh-gated linear: ``out = residual + tanh(gate) · (a @ weightᵀ + bias)`` as one GEMM.

The gated residual of Flamingo's GATED XATTN-DENSE layers, Llama 3.2 Vision's cross-attention layers
and Idefics' gated layers. Eager PyTorch writes the projection, reads it back to scale it, writes the
scaled copy, reads it and the residual to add them (three extra passes over an (M, N) tensor), and the
gate's gradient is one more full reduction over ``dy ⊙ (a Wᵀ + b)``. Here:

- forward: one GEMM whose epilogue adds the bias, scales by tanh(gate) (scalar or per output channel),
  adds the residual and zeroes the update of masked rows (Llama 3.2's full-text-row mask), written once;
- backward: ``d_residual = dy`` (no copy); ``d_a = (dy·tanh g) @ W`` as one GEMM (a vector gate scales
  dy in the prologue, a scalar gate scales the fp32 accumulator in the epilogue); ``d_W = tanh(g)·dyᵀ a``
  as one GEMM whose epilogue also produces ``d_bias`` (the column sums of dy, accumulated by the
  programs of the first K tile) and the gate gradient. The gate gradient needs ``Σ_m dy ⊙ (a Wᵀ + b)``,
  which is never re-materialised: per output channel n,
  ``Σ_m dy[m,n] (Σ_k a[m,k] W[n,k] + b[n]) = Σ_k W[n,k] G[n,k] + b[n] Σ_m dy[m,n]`` with
  ``G = dyᵀ a`` the unscaled weight gradient the dW program already holds in registers. Each
  (n-tile, k-tile) program writes its partial sums to a (K tiles, N) fp32 buffer that is summed in a
  fixed order afterwards: deterministic, no atomics, one extra read of a W tile per program.

Rows whose update is masked out skip their GEMM tiles entirely when a whole tile is masked (text before
the first image in Llama 3.2).

Because the epilogue takes any residual and per-channel or scalar gate, the same op is the FFN
down-projection of a gated block: ``y + tanh(β)·(act(h W₁ᵀ) W₂ᵀ)`` is
``tanh_gated_linear(act(h W₁ᵀ), W₂, None, β, y)``. The activation (GELU for Flamingo, SiLU-gated for
Llama 3.2) stays with the up-projection: it is elementwise on the up-projection's output and belongs in
*that* GEMM's epilogue, not here — fusing it into the down-projection's prologue would recompute it once
per N tile (N/BLOCK_N times) and, in the backward, force keeping or recomputing the pre-activation inside
the d_a GEMM. The down-projection's epilogue is where the gate, residual and row mask live.

That is backend="triton". backend="gemm" (``_gemm.py``; what "auto" runs on CUDA) computes the same math with
cuBLAS for the GEMMs (the forward's product in fp32; d_a; G = dyᵀ a in fp32) and one Triton pass for each
part around them (the forward's epilogue; a pass over dy forming d_a's operand dy·tanh g and the column
sums; a pass over G forming d_W and the gate gradient's partial sums): three more memory-bound passes than
the fused kernels, but cuBLAS's GEMM speed, which the fused Triton GEMMs do not reach on sm_90.

Files: _kernels.py (the Triton kernels), _configs.py (launch configs and compile-gate specs), _launch.py
(checks, launchers, custom ops, autograd of the Triton backend), _gemm.py (the gemm backend), this file
(the public op). The readable spec is ``kernels.reference.tanh_gated_linear_reference``.
"""
from .._common import autocast_op
from .._dispatch import resolve_backend
from ..reference import tanh_gated_linear_reference
from ._configs import compile_specs
from ._gemm import tanh_gated_linear_gemm
from ._launch import OP, check_args, tanh_gated_linear_triton

__all__ = ["tanh_gated_linear", "compile_specs"]


@autocast_op("a", "weight", "bias")
def tanh_gated_linear(a, weight, bias, gate, residual, *, row_mask=None, backend="auto"):
    """Gated residual linear layer: ``out = residual + tanh(gate) · (a @ weightᵀ + bias)``.

    Replaces the eager chain ``residual + torch.tanh(gate) * F.linear(a, weight, bias)`` and returns
    what it returns (shape, dtype, and values up to rounding), gradients included.

    Args:
        a: (..., K) input; any strides (leading dims are flattened to M rows, copied only if they cannot
            be viewed as one dimension).
        weight: (N, K), any strides; bias: (N,) or None; both in a's dtype (as F.linear requires).
        gate: the gate's pre-activation α: a scalar (one element: 0-dim, or (1,) as Flamingo / Mllama store
            it) or a per-output-channel vector of N elements (shape (N,), or (1, 1, N) as Idefics'
            ``alpha_type="vector"``); any floating dtype, or a Python number (a constant). Must be finite:
            a Python number is checked at once (ValueError), a tensor on its device without a host sync
            (``torch._assert_async``: a RuntimeError on the CPU, a device-side assert on CUDA).
            tanh(α) is computed in fp32.
        residual: (..., N), the leading shape of a; any strides; any floating dtype (e.g. an fp32 residual
            stream over 16-bit GEMM inputs: the update is added in fp32 and never rounded to 16 bits; the
            backward rounds dy to a's dtype for its GEMMs, as autocast's matmuls would).
        row_mask: optional bool tensor of shape a.shape[:-1] (e.g. (B, L)) or (M,); True marks a row whose
            update is zeroed (its output is exactly the residual, and it contributes nothing to any
            gradient but d_residual): Llama 3.2's full-text-row mask for tokens that see no image.
        backend: "auto" | "gemm" | "triton" | "reference" (see ``kernels._dispatch``). "gemm": cuBLAS GEMMs
            (``torch.mm``) plus three one-pass Triton kernels (epilogue; dy pass; d_W / gate pass), what "auto"
            runs on CUDA for every dtype (16-bit: cuBLAS's GEMMs run at ~1.8x the Triton backend's on an H100;
            fp32: cuBLAS's SGEMM / TF32 GEMMs are expected to be no slower than Triton's fp32 dots; unmeasured);
            "triton": everything fused into the three GEMM kernels (no intermediate (M, N) tensor); "reference":
            the eager PyTorch chain (CPU default, float64).

    Returns (..., N) in the eager chain's dtype, by torch's type promotion: ``residual.dtype`` promoted
    with the update's dtype (a's), where a gate with dimensions (shape (1,) or (N,)) also promotes the
    update (an fp32 (1,) gate over bf16 a and a bf16 residual gives fp32, as in eager PyTorch) and a 0-dim
    gate does not. At gate = 0 the output is exactly the residual (for finite a Wᵀ + b). All products
    accumulate in fp32 and the output is rounded once.

    Dtypes and precision: a, weight, bias, residual in fp16 / bf16 / fp32 on the gemm and Triton backends (a
    float64 argument raises ValueError naming it; backend="reference" takes float64). fp32 GEMMs follow
    ``torch.get_float32_matmul_precision()`` as torch.matmul does: "highest" (the default) runs IEEE fp32
    dots, "high" / "medium" TF32 tensor cores (the gemm backend's GEMMs are torch.mm's, so whatever torch
    does); 16-bit operands run on the tensor cores with fp32 accumulation (the gemm backend keeps the
    forward's product in fp32 until the epilogue's one rounding).

    Autocast: under ``torch.autocast`` a, weight and bias are cast to the autocast dtype, as F.linear's
    autocast rule does; the gate and the residual are not cast (as in the eager chain), so the result
    follows the promotion above (fp32 for an fp32 residual stream). Gradients come back in the inputs'
    dtypes.

    Gradients: d_residual = dy; d_a = (dy·tanh g) W; d_W = (dy·tanh g)ᵀ a; d_bias = Σ_rows dy·tanh g;
    d_gate = (1 − tanh² g)·Σ dy ⊙ (a Wᵀ + b) (summed over rows, and over channels for a scalar gate),
    computed from dyᵀ a (inside the d_W GEMM on "triton", from cuBLAS's fp32 dyᵀ a on "gemm"; see the module
    docstring) and summed deterministically. No double backward on the gemm and Triton backends (raises).
    Traceable by ``torch.compile(fullgraph=True)`` (the kernels are custom ops with fake shapes).
    """
    gate = check_args(a, weight, bias, gate, residual, row_mask)
    resolved = resolve_backend(OP, backend, a.device)
    if resolved == "reference":
        return tanh_gated_linear_reference(a, weight, bias, gate, residual, row_mask=row_mask)
    run = tanh_gated_linear_gemm if resolved == "gemm" else tanh_gated_linear_triton
    return run(a, weight, bias, gate, residual, row_mask)
