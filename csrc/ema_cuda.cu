// Momentum EMA on CUDA: one launch over every tensor of a list (multi-tensor apply).
//
// Block b updates elements [block_start[b], min(block_start[b] + chunk, numel)) of tensor
// block_tensor[b], whose EMA/source addresses and numel come from the pointer table. Per element, in
// fp32: d = s - e; out = fmaf(coeff, d, base) with (coeff, base) = (w, e) if |w| < 0.5 else (-(1 - w), s),
// i.e. fmaf(w, d, e) or fmaf(-d, 1 - w, s) as torch's lerp; rounded to the EMA dtype with cvt.rn.
// Loads and stores are 16 bytes wide where the two pointers can be aligned together (a scalar head
// first), scalar otherwise; offsets are int64. This file needs only the CUDA toolkit (no torch headers):
// the torch side is csrc/ema_cuda_host.cpp.
#ifdef MMFAST_WITH_CUDA

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ema_cuda.h"

namespace mmfast {
namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 2;  // vectors in flight per thread and operand (4 made ptxas spill on sm_90)

template <typename T>
struct Cvt;

template <>
struct Cvt<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename E, typename S>
__device__ __forceinline__ E lerp_one(E e_raw, S s_raw, float coeff, bool small) {
  const float e = Cvt<E>::to_float(e_raw);
  const float s = Cvt<S>::to_float(s_raw);
  const float d = __fsub_rn(s, e);
  return Cvt<E>::from_float(__fmaf_rn(coeff, d, small ? e : s));
}

template <typename E, typename S, bool kFromPtr>
__global__ void __launch_bounds__(kThreads)
    ema_update_kernel(const int64_t* __restrict__ ema_addrs, const int64_t* __restrict__ src_addrs,
                      const int64_t* __restrict__ numels, const int64_t* __restrict__ block_tensor,
                      const int64_t* __restrict__ block_start, float weight, const float* __restrict__ momentum,
                      int64_t chunk) {
  constexpr int kVec = 16 / (sizeof(E) > sizeof(S) ? sizeof(E) : sizeof(S));
  using EPack = Pack<E, kVec>;
  using SPack = Pack<S, kVec>;

  const int64_t tensor = block_tensor[blockIdx.x];
  const int64_t start = block_start[blockIdx.x];
  const int64_t numel = numels[tensor];
  const int64_t len = (numel - start < chunk) ? numel - start : chunk;
  if (len <= 0) {
    return;
  }
  E* ema = reinterpret_cast<E*>(static_cast<uintptr_t>(ema_addrs[tensor])) + start;
  const S* src = reinterpret_cast<const S*>(static_cast<uintptr_t>(src_addrs[tensor])) + start;
  // Addresses read from the table are generic pointers; say they are global so loads are ld.global.
  __builtin_assume(__isGlobal(ema));
  __builtin_assume(__isGlobal(src));

  const float w = kFromPtr ? __fsub_rn(1.0f, *momentum) : weight;
  const bool small = fabsf(w) < 0.5f;
  const float coeff = small ? w : -__fsub_rn(1.0f, w);  // -(1 - w), not w - 1: they differ in the sign of 0 at w == 1

  // Elements before `ema` reaches a kVec * sizeof(E) boundary; vectors only if `src` is then aligned too.
  constexpr uintptr_t kEAlign = sizeof(E) * kVec;
  constexpr uintptr_t kSAlign = sizeof(S) * kVec;
  const uintptr_t ea = reinterpret_cast<uintptr_t>(ema);
  int64_t head = len;
  if (ea % sizeof(E) == 0) {
    const int64_t to_align = static_cast<int64_t>(((kEAlign - ea % kEAlign) % kEAlign) / sizeof(E));
    if (to_align < len && reinterpret_cast<uintptr_t>(src + to_align) % kSAlign == 0) {
      head = to_align;
    }
  }
  const int64_t vecs = (len - head) / kVec;
  const int64_t tail = head + vecs * kVec;

  for (int64_t i = threadIdx.x; i < head; i += kThreads) {
    ema[i] = lerp_one<E, S>(ema[i], src[i], coeff, small);
  }

  EPack* ev = reinterpret_cast<EPack*>(ema + head);
  const SPack* sv = reinterpret_cast<const SPack*>(src + head);
  for (int64_t base = threadIdx.x; base < vecs; base += static_cast<int64_t>(kThreads) * kUnroll) {
    EPack e[kUnroll];
    SPack s[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + static_cast<int64_t>(u) * kThreads;
      if (j < vecs) {
        e[u] = ev[j];
        s[u] = sv[j];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + static_cast<int64_t>(u) * kThreads;
      if (j < vecs) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          e[u].v[k] = lerp_one<E, S>(e[u].v[k], s[u].v[k], coeff, small);
        }
        ev[j] = e[u];
      }
    }
  }

  for (int64_t i = tail + threadIdx.x; i < len; i += kThreads) {
    ema[i] = lerp_one<E, S>(ema[i], src[i], coeff, small);
  }
}

template <typename E, typename S>
cudaError_t launch_typed(const EmaCudaLaunch& a) {
  const dim3 grid(static_cast<unsigned int>(a.num_blocks));
  cudaStream_t stream = static_cast<cudaStream_t>(a.stream);
  if (a.momentum != nullptr) {
    ema_update_kernel<E, S, true><<<grid, kThreads, 0, stream>>>(a.ema_addrs, a.src_addrs, a.numels, a.block_tensor,
                                                                 a.block_start, a.weight, a.momentum, a.chunk);
  } else {
    ema_update_kernel<E, S, false><<<grid, kThreads, 0, stream>>>(a.ema_addrs, a.src_addrs, a.numels, a.block_tensor,
                                                                  a.block_start, a.weight, a.momentum, a.chunk);
  }
  return cudaGetLastError();
}

template <typename E>
cudaError_t launch_src(const EmaCudaLaunch& a) {
  switch (a.src_dtype) {
    case EmaDtype::kFloat32:
      return launch_typed<E, float>(a);
    case EmaDtype::kFloat16:
      return launch_typed<E, __half>(a);
    case EmaDtype::kBFloat16:
      return launch_typed<E, __nv_bfloat16>(a);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

int ema_update_cuda_launch(const EmaCudaLaunch& a) {
  if (a.num_blocks <= 0) {
    return static_cast<int>(cudaSuccess);
  }
  if (a.num_blocks > 0x7fffffffLL || a.chunk <= 0) {
    return static_cast<int>(cudaErrorInvalidValue);
  }
  switch (a.ema_dtype) {
    case EmaDtype::kFloat32:
      return static_cast<int>(launch_src<float>(a));
    case EmaDtype::kFloat16:
      return static_cast<int>(launch_src<__half>(a));
    case EmaDtype::kBFloat16:
      return static_cast<int>(launch_src<__nv_bfloat16>(a));
  }
  return static_cast<int>(cudaErrorInvalidValue);
}

}  // namespace mmfast

#endif  // MMFAST_WITH_CUDA
