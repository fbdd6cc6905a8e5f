// Momentum EMA on the CPU: every tensor of a list updated in one OpenMP region.
//
// The host flattens the list into chunks of at most kChunk elements (a chunk never spans two tensors)
// and the threads share them out, so hundreds of small tensors cost one parallel region, not one each.
// The inner loop is AVX-512 or AVX2 + FMA (+F16C for fp16) on x86-64 CPUs that have them, chosen at run time, so
// the build itself needs no -mavx2/-march flags; elsewhere a portable loop uses std::fma (a single
// instruction on aarch64). Both compute exactly what torch._foreach_lerp_ computes (see ema.h).
#include "ema.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

// -DMMFAST_EMA_PORTABLE_ONLY builds just the portable loop (for testing it on x86).
#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__)) && \
    !defined(MMFAST_EMA_PORTABLE_ONLY)
#define MMFAST_EMA_X86 1
#include <immintrin.h>
#define MMFAST_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MMFAST_AVX512 __attribute__((target("avx512f,avx512bw,avx2,fma,f16c")))
#endif

namespace mmfast {
namespace {

constexpr int64_t kChunk = 1 << 16;  // elements per work item
constexpr int64_t kMinParallel = 1 << 15;  // below this many elements in all, stay on one thread

using ChunkFn = void (*)(void* ema, const void* src, int64_t n, float w);

// ------------------------------------------------------------------------------------------------
// Portable loop: std::fma is exact everywhere (a libm call on x86 without FMA, which the dispatcher
// only picks on CPUs without AVX2/FMA). c10::Half/BFloat16 convert to nearest-even.

template <typename E, typename S, bool kSmall>
void ema_chunk_portable(void* ema_v, const void* src_v, int64_t n, float w) {
  E* ema = static_cast<E*>(ema_v);
  const S* src = static_cast<const S*>(src_v);
  const float coeff = kSmall ? w : -(1.0f - w);  // fma(coeff, d, s) == fma(-d, 1 - w, s), signed zeros included
  for (int64_t i = 0; i < n; ++i) {
    const float e = static_cast<float>(ema[i]);
    const float s = static_cast<float>(src[i]);
    ema[i] = static_cast<E>(std::fma(coeff, s - e, kSmall ? e : s));
  }
}

#ifdef MMFAST_EMA_X86
// ------------------------------------------------------------------------------------------------
// AVX2 + FMA + F16C: 8 fp32 lanes, one vfmadd per element group, exact conversions.

template <typename T>
struct Avx2Io;

template <>
struct Avx2Io<float> {
  MMFAST_AVX2 static inline __m256 load(const float* p) { return _mm256_loadu_ps(p); }
  MMFAST_AVX2 static inline void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
};

template <>
struct Avx2Io<c10::Half> {
  MMFAST_AVX2 static inline __m256 load(const c10::Half* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  MMFAST_AVX2 static inline void store(c10::Half* p, __m256 v) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

template <>
struct Avx2Io<c10::BFloat16> {
  MMFAST_AVX2 static inline __m256 load(const c10::BFloat16* p) {
    const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
  }
  // c10::detail::round_to_nearest_even, 8 lanes at a time: NaN -> 0x7FC0, else (u + 0x7FFF + lsb) >> 16.
  MMFAST_AVX2 static inline void store(c10::BFloat16* p, __m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
    // r holds 8 values in [0, 0xFFFF]: pack to 16 bits (per 128-bit lane) and gather qwords 0 and 2.
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
};

template <typename E, typename S, bool kSmall>
MMFAST_AVX2 static inline void ema_vec8(E* ema, const S* src, __m256 coeff) {
  const __m256 e = Avx2Io<E>::load(ema);
  const __m256 s = Avx2Io<S>::load(src);
  const __m256 d = _mm256_sub_ps(s, e);
  Avx2Io<E>::store(ema, _mm256_fmadd_ps(coeff, d, kSmall ? e : s));
}

template <typename E, typename S, bool kSmall>
MMFAST_AVX2 void ema_chunk_avx2(void* ema_v, const void* src_v, int64_t n, float w) {
  E* ema = static_cast<E*>(ema_v);
  const S* src = static_cast<const S*>(src_v);
  const __m256 coeff = _mm256_set1_ps(kSmall ? w : -(1.0f - w));  // not w - 1: the sign of 0 differs at w == 1
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    ema_vec8<E, S, kSmall>(ema + i, src + i, coeff);
    ema_vec8<E, S, kSmall>(ema + i + 8, src + i + 8, coeff);
    ema_vec8<E, S, kSmall>(ema + i + 16, src + i + 16, coeff);
    ema_vec8<E, S, kSmall>(ema + i + 24, src + i + 24, coeff);
  }
  for (; i + 8 <= n; i += 8) {
    ema_vec8<E, S, kSmall>(ema + i, src + i, coeff);
  }
  if (i < n) {  // the last 1..7 elements go through the same vector code via zero-padded buffers
    const int64_t rest = n - i;
    E e_buf[8];
    S s_buf[8];
    std::memset(static_cast<void*>(e_buf), 0, sizeof(e_buf));
    std::memset(static_cast<void*>(s_buf), 0, sizeof(s_buf));
    std::memcpy(static_cast<void*>(e_buf), ema + i, rest * sizeof(E));
    std::memcpy(static_cast<void*>(s_buf), src + i, rest * sizeof(S));
    ema_vec8<E, S, kSmall>(e_buf, s_buf, coeff);
    std::memcpy(static_cast<void*>(ema + i), e_buf, rest * sizeof(E));
  }
}

// ------------------------------------------------------------------------------------------------
// AVX-512 (F + BW): 16 fp32 lanes, the same arithmetic and the same rounding as the AVX2 path. With
// half-width dtypes the loop is bound by conversions, not memory, so twice the lanes pay (bf16 EMA:
// 0.69x -> see benchmarks/ema.py on an AVX-512 CPU). The last 0..15 elements go through the AVX2 path.

template <typename T>
struct Avx512Io;

template <>
struct Avx512Io<float> {
  MMFAST_AVX512 static inline __m512 load(const float* p) { return _mm512_loadu_ps(p); }
  MMFAST_AVX512 static inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
};

template <>
struct Avx512Io<c10::Half> {
  MMFAST_AVX512 static inline __m512 load(const c10::Half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  MMFAST_AVX512 static inline void store(c10::Half* p, __m512 v) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
};

template <>
struct Avx512Io<c10::BFloat16> {
  MMFAST_AVX512 static inline __m512 load(const c10::BFloat16* p) {
    const __m512i x = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
  }
  // c10::detail::round_to_nearest_even, 16 lanes: NaN -> 0x7FC0, else (u + 0x7FFF + lsb) >> 16.
  MMFAST_AVX512 static inline void store(c10::BFloat16* p, __m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));  // values fit in 16 bits
  }
};

template <typename E, typename S, bool kSmall>
MMFAST_AVX512 static inline void ema_vec16(E* ema, const S* src, __m512 coeff) {
  const __m512 e = Avx512Io<E>::load(ema);
  const __m512 s = Avx512Io<S>::load(src);
  const __m512 d = _mm512_sub_ps(s, e);
  Avx512Io<E>::store(ema, _mm512_fmadd_ps(coeff, d, kSmall ? e : s));
}

template <typename E, typename S, bool kSmall>
MMFAST_AVX512 void ema_chunk_avx512(void* ema_v, const void* src_v, int64_t n, float w) {
  E* ema = static_cast<E*>(ema_v);
  const S* src = static_cast<const S*>(src_v);
  const __m512 coeff = _mm512_set1_ps(kSmall ? w : -(1.0f - w));  // as in the AVX2 path
  int64_t i = 0;
  for (; i + 64 <= n; i += 64) {
    ema_vec16<E, S, kSmall>(ema + i, src + i, coeff);
    ema_vec16<E, S, kSmall>(ema + i + 16, src + i + 16, coeff);
    ema_vec16<E, S, kSmall>(ema + i + 32, src + i + 32, coeff);
    ema_vec16<E, S, kSmall>(ema + i + 48, src + i + 48, coeff);
  }
  for (; i + 16 <= n; i += 16) {
    ema_vec16<E, S, kSmall>(ema + i, src + i, coeff);
  }
  if (i < n) {
    ema_chunk_avx2<E, S, kSmall>(ema + i, src + i, n - i, w);
  }
}

bool cpu_has_avx512() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
}

bool cpu_has_avx2_fma() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
}
#endif  // MMFAST_EMA_X86

template <typename E, typename S>
ChunkFn pick(bool small) {
#ifdef MMFAST_EMA_X86
  // MMFAST_EMA_NO_AVX512=1 keeps the AVX2 path (to test it, or to compare the two)
  static const bool avx512 = cpu_has_avx512() && std::getenv("MMFAST_EMA_NO_AVX512") == nullptr;
  if (avx512) {
    return small ? &ema_chunk_avx512<E, S, true> : &ema_chunk_avx512<E, S, false>;
  }
  if (cpu_has_avx2_fma()) {
    return small ? &ema_chunk_avx2<E, S, true> : &ema_chunk_avx2<E, S, false>;
  }
#endif
  return small ? &ema_chunk_portable<E, S, true> : &ema_chunk_portable<E, S, false>;
}

template <typename E>
ChunkFn pick_src(at::ScalarType src_dtype, bool small) {
  switch (src_dtype) {
    case at::kFloat:
      return pick<E, float>(small);
    case at::kHalf:
      return pick<E, c10::Half>(small);
    case at::kBFloat16:
      return pick<E, c10::BFloat16>(small);
    default:
      TORCH_CHECK(false, "ema_update_cpu: unsupported source dtype ", src_dtype);
  }
}

ChunkFn pick_kernel(at::ScalarType ema_dtype, at::ScalarType src_dtype, bool small) {
  switch (ema_dtype) {
    case at::kFloat:
      return pick_src<float>(src_dtype, small);
    case at::kHalf:
      return pick_src<c10::Half>(src_dtype, small);
    case at::kBFloat16:
      return pick_src<c10::BFloat16>(src_dtype, small);
    default:
      TORCH_CHECK(false, "ema_update_cpu: unsupported EMA dtype ", ema_dtype);
  }
}

bool supported(at::ScalarType t) { return t == at::kFloat || t == at::kHalf || t == at::kBFloat16; }

// Same element order: strides equal on every dimension of size > 1 (a size-1 dim's stride is moot).
bool same_layout(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) {
      return false;
    }
  }
  return true;
}

struct WorkItem {
  char* ema;
  const char* src;
  int64_t n;
};

}  // namespace

void ema_update_cpu(const std::vector<at::Tensor>& ema, const std::vector<at::Tensor>& src, double weight) {
  TORCH_CHECK(ema.size() == src.size(), "ema_update_cpu: got ", ema.size(), " EMA tensors but ", src.size(),
              " source tensors");
  if (ema.empty()) {
    return;
  }
  const at::ScalarType ema_dtype = ema[0].scalar_type();
  const at::ScalarType src_dtype = src[0].scalar_type();
  TORCH_CHECK(supported(ema_dtype) && supported(src_dtype),
              "ema_update_cpu: tensors must be float32, float16 or bfloat16, got ", ema_dtype, " and ", src_dtype);
  const int64_t ema_size = c10::elementSize(ema_dtype);
  const int64_t src_size = c10::elementSize(src_dtype);

  std::vector<WorkItem> work;
  int64_t total = 0;
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& s = src[i];
    TORCH_CHECK(e.defined() && s.defined(), "ema_update_cpu: tensor ", i, " is undefined");
    TORCH_CHECK(e.layout() == at::kStrided && s.layout() == at::kStrided, "ema_update_cpu: tensor ", i,
                " must be strided (dense)");
    TORCH_CHECK(e.device().is_cpu() && s.device().is_cpu(), "ema_update_cpu: tensor ", i,
                " must be on the CPU, got ", e.device(), " and ", s.device());
    TORCH_CHECK(e.scalar_type() == ema_dtype, "ema_update_cpu: EMA tensor ", i, " is ", e.scalar_type(),
                " but EMA tensor 0 is ", ema_dtype, "; one dtype per call");
    TORCH_CHECK(s.scalar_type() == src_dtype, "ema_update_cpu: source tensor ", i, " is ", s.scalar_type(),
                " but source tensor 0 is ", src_dtype, "; one dtype per call");
    TORCH_CHECK(e.sizes() == s.sizes(), "ema_update_cpu: EMA tensor ", i, " has shape ", e.sizes(),
                " but its source has ", s.sizes());
    const int64_t n = e.numel();
    if (n == 0) {
      continue;
    }
    TORCH_CHECK(e.is_non_overlapping_and_dense(), "ema_update_cpu: EMA tensor ", i,
                " must be non-overlapping and dense (it is updated through its storage), got strides ",
                e.strides());
    TORCH_CHECK(same_layout(e, s), "ema_update_cpu: source tensor ", i, " has strides ", s.strides(),
                " but its EMA tensor has ", e.strides(), "; they must match");
    char* e_ptr = static_cast<char*>(e.mutable_data_ptr());  // materialises a copy-on-write storage
    const char* s_ptr = static_cast<const char*>(s.const_data_ptr());
    for (int64_t start = 0; start < n; start += kChunk) {
      work.push_back({e_ptr + start * ema_size, s_ptr + start * src_size, std::min(kChunk, n - start)});
    }
    total += n;
  }
  if (work.empty()) {
    return;
  }

  for (const at::Tensor& e : ema) {
    e.unsafeGetTensorImpl()->bump_version();  // an in-place update, as torch's own in-place ops record
  }
  const float w = static_cast<float>(weight);  // rounded once, as Scalar::to<float>() does in torch
  const ChunkFn fn = pick_kernel(ema_dtype, src_dtype, std::abs(w) < 0.5f);
  const int64_t items = static_cast<int64_t>(work.size());

  int64_t threads = 1;
  if (total >= kMinParallel && !at::in_parallel_region()) {
    threads = std::min<int64_t>(at::get_num_threads(), items);
  }
#ifdef _OPENMP
  if (threads > 1) {
    // Contiguous blocks of chunks per thread (static): equal-sized chunks balance, and each thread
    // streams through neighbouring memory.
#pragma omp parallel for schedule(static) num_threads(static_cast<int>(threads))
    for (int64_t k = 0; k < items; ++k) {
      fn(work[k].ema, work[k].src, work[k].n, w);
    }
    return;
  }
#endif
  for (int64_t k = 0; k < items; ++k) {
    fn(work[k].ema, work[k].src, work[k].n, w);
  }
}

}  // namespace mmfast
