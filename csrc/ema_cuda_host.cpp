// Torch side of the CUDA EMA kernel (csrc/ema_cuda.cu): validation, device guard, current stream.
// Its body is compiled into CUDA builds only (MMFAST_WITH_CUDA); CPU builds get with_cuda() == false.
#include "ema.h"

#include <c10/util/Exception.h>

#ifdef MMFAST_WITH_CUDA
// c10's CUDA headers only (not ATen/cuda/CUDAContext.h, which also wants cuBLAS/cuSPARSE headers):
// c10::cuda::getCurrentCUDAStream is what at::cuda::getCurrentCUDAStream names.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "ema_cuda.h"
#endif

namespace mmfast {

#ifdef MMFAST_WITH_CUDA
namespace {

EmaDtype to_ema_dtype(at::ScalarType t, const char* what) {
  switch (t) {
    case at::kFloat:
      return EmaDtype::kFloat32;
    case at::kHalf:
      return EmaDtype::kFloat16;
    case at::kBFloat16:
      return EmaDtype::kBFloat16;
    default:
      TORCH_CHECK(false, "ema_update_cuda: ", what, " dtype must be float32, float16 or bfloat16, got ", t);
  }
}

void check_table(const at::Tensor& t, const char* name, const at::Device& device) {
  TORCH_CHECK(t.defined(), "ema_update_cuda: ", name, " is undefined");
  TORCH_CHECK(t.device() == device, "ema_update_cuda: ", name, " is on ", t.device(), " but ema_addrs is on ", device);
  TORCH_CHECK(t.scalar_type() == at::kLong, "ema_update_cuda: ", name, " must be int64, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "ema_update_cuda: ", name, " must be a contiguous 1-D tensor");
}

}  // namespace

void ema_update_cuda(const at::Tensor& ema_addrs, const at::Tensor& src_addrs, const at::Tensor& numels,
                     const at::Tensor& block_tensor, const at::Tensor& block_start, at::ScalarType ema_dtype,
                     at::ScalarType src_dtype, double weight, const std::optional<at::Tensor>& momentum,
                     int64_t chunk) {
  TORCH_CHECK(ema_addrs.defined() && ema_addrs.is_cuda(), "ema_update_cuda: ema_addrs must be a CUDA tensor");
  const at::Device device = ema_addrs.device();
  check_table(ema_addrs, "ema_addrs", device);
  check_table(src_addrs, "src_addrs", device);
  check_table(numels, "numels", device);
  check_table(block_tensor, "block_tensor", device);
  check_table(block_start, "block_start", device);
  TORCH_CHECK(src_addrs.numel() == ema_addrs.numel() && numels.numel() == ema_addrs.numel(),
              "ema_update_cuda: ema_addrs, src_addrs and numels must have one entry per tensor, got ",
              ema_addrs.numel(), ", ", src_addrs.numel(), " and ", numels.numel());
  TORCH_CHECK(block_start.numel() == block_tensor.numel(), "ema_update_cuda: block_tensor and block_start differ in length (",
              block_tensor.numel(), " vs ", block_start.numel(), ")");
  TORCH_CHECK(chunk > 0, "ema_update_cuda: chunk must be positive, got ", chunk);
  TORCH_CHECK(block_tensor.numel() <= 0x7fffffffLL, "ema_update_cuda: too many blocks (", block_tensor.numel(), ")");
  const float* momentum_ptr = nullptr;
  if (momentum.has_value() && momentum->defined()) {
    const at::Tensor& m = *momentum;
    TORCH_CHECK(m.device() == device, "ema_update_cuda: momentum is on ", m.device(), " but the tables are on ", device);
    TORCH_CHECK(m.scalar_type() == at::kFloat, "ema_update_cuda: momentum must be float32, got ", m.scalar_type());
    TORCH_CHECK(m.numel() == 1, "ema_update_cuda: momentum must hold one value, got ", m.numel());
    momentum_ptr = m.const_data_ptr<float>();
  }
  EmaCudaLaunch args{};
  args.ema_addrs = ema_addrs.const_data_ptr<int64_t>();
  args.src_addrs = src_addrs.const_data_ptr<int64_t>();
  args.numels = numels.const_data_ptr<int64_t>();
  args.block_tensor = block_tensor.const_data_ptr<int64_t>();
  args.block_start = block_start.const_data_ptr<int64_t>();
  args.num_blocks = block_tensor.numel();
  args.chunk = chunk;
  args.ema_dtype = to_ema_dtype(ema_dtype, "EMA");
  args.src_dtype = to_ema_dtype(src_dtype, "source");
  args.weight = static_cast<float>(weight);
  args.momentum = momentum_ptr;
  if (args.num_blocks == 0) {
    return;
  }
  const c10::cuda::CUDAGuard guard(device);
  args.stream = static_cast<void*>(c10::cuda::getCurrentCUDAStream(device.index()).stream());
  C10_CUDA_CHECK(static_cast<cudaError_t>(ema_update_cuda_launch(args)));
}

bool with_cuda() { return true; }

#else  // CPU-only build

bool with_cuda() { return false; }

#endif  // MMFAST_WITH_CUDA

}  // namespace mmfast
