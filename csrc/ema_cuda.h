// Plain-C++ interface of the CUDA EMA launcher (csrc/ema_cuda.cu). Deliberately free of torch and CUDA
// headers, so that ema_cuda.cu compiles with nvcc alone (any -std >= c++17, no ATen) and the torch side
// (csrc/ema_cuda_host.cpp) does the validation, device guard and stream lookup.
#pragma once

#include <cstdint>

namespace mmfast {

enum class EmaDtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct EmaCudaLaunch {
  const int64_t* ema_addrs;     // [T] device addresses of the EMA tensors
  const int64_t* src_addrs;     // [T] device addresses of the source tensors
  const int64_t* numels;        // [T]
  const int64_t* block_tensor;  // [num_blocks] tensor index of each block
  const int64_t* block_start;   // [num_blocks] first element of each block's chunk
  int64_t num_blocks;
  int64_t chunk;                // elements per block: [start, min(start + chunk, numel))
  EmaDtype ema_dtype;
  EmaDtype src_dtype;
  float weight;                 // w = 1 - m, used when momentum is null
  const float* momentum;        // device pointer to m (fp32) or nullptr
  void* stream;                 // cudaStream_t
};

// Enqueues one kernel launch; returns the cudaError_t of the launch (0 == cudaSuccess).
int ema_update_cuda_launch(const EmaCudaLaunch& args);

}  // namespace mmfast
