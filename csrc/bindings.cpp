// Python bindings of mmfast._C (TORCH_EXTENSION_NAME: mmfast._C from setup.py, mmfast_C_* when JIT-built).
#include <torch/extension.h>

#include "ema.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "mmfast C++/CUDA kernels (momentum EMA)";
  m.def("ema_update_cpu", &mmfast::ema_update_cpu, py::arg("ema"), py::arg("src"), py::arg("weight"),
        py::call_guard<py::gil_scoped_release>(),
        "In place on CPU tensors: ema[i] <- lerp(ema[i], src[i], weight), bit for bit torch._foreach_lerp_.\n"
        "One EMA dtype and one source dtype per call (float32/float16/bfloat16); each EMA tensor\n"
        "non-overlapping and dense, its source laid out alike. weight = 1 - momentum.");
#ifdef MMFAST_WITH_CUDA
  m.def("ema_update_cuda", &mmfast::ema_update_cuda, py::arg("ema_addrs"), py::arg("src_addrs"), py::arg("numels"),
        py::arg("block_tensor"), py::arg("block_start"), py::arg("ema_dtype"), py::arg("src_dtype"),
        py::arg("weight"), py::arg("momentum"), py::arg("chunk"),
        py::call_guard<py::gil_scoped_release>(),
        "One multi-tensor CUDA launch on the current stream over a pointer table (int64 CUDA tensors:\n"
        "ema_addrs, src_addrs, numels per tensor; block_tensor, block_start per block of `chunk`\n"
        "elements). momentum: optional 0-dim float32 CUDA tensor read on the device (w = 1 - m), else\n"
        "w = float(weight).");
#endif
  m.def("with_cuda", &mmfast::with_cuda, "Whether this build contains the CUDA kernels.");
}
