// Momentum EMA kernels (θ_ema ← m·θ_ema + (1−m)·θ, in place): the torch-facing entry points.
//
// Math, bit for bit torch._foreach_lerp_(ema, src, w) with w = 1 − m rounded once to fp32: in fp32,
// d = s − e; out = fma(w, d, e) if |w| < 0.5 else fma(−d, 1 − w, s) (one rounding each), then rounded
// to the EMA dtype to nearest-even. (Not fma(w − 1, d, s), as torch's AVX lerp_vec does: at w == 1 that
// gives the opposite sign of zero to torch's scalar and CUDA paths and to the Triton kernel.)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace mmfast {

// CPU (csrc/ema_cpu.cpp). All EMA tensors share one dtype, all sources one dtype (fp32/fp16/bf16);
// each EMA tensor is non-overlapping and dense and its source has the same layout, so both are flat
// arrays of numel() elements from data_ptr(). One OpenMP region over every tensor's chunks.
void ema_update_cpu(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& src, double weight);

#ifdef MMFAST_WITH_CUDA
// CUDA (csrc/ema_cuda_host.cpp + csrc/ema_cuda.cu; CUDA builds only).
// The five tables are int64 CUDA tensors: per tensor its EMA address, source address and numel; per
// block its tensor index and first element (a block covers [start, min(start + chunk, numel))).
// One launch on the current stream. `momentum` (0-dim fp32 CUDA tensor) is read on the device when
// given: w = 1.0f − m in fp32, no host sync; otherwise w = float(weight).
void ema_update_cuda(const at::Tensor& ema_addrs, const at::Tensor& src_addrs, const at::Tensor& numels,
                     const at::Tensor& block_tensor, const at::Tensor& block_start, at::ScalarType ema_dtype,
                     at::ScalarType src_dtype, double weight, const std::optional<at::Tensor>& momentum,
                     int64_t chunk);
#endif

// Whether this build contains the CUDA kernels.
bool with_cuda();

}  // namespace mmfast
