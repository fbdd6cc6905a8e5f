"""Build and install mmfast.

`kernels/` is installed as the subpackage `mmfast.kernels`, `benchmarks/` as `mmfast.benchmarks` (so that
`python -m mmfast bench` runs the suites outside a source checkout), and `csrc/` ships inside the package
as `mmfast/csrc` so that a missing extension can be JIT-built on first use.

Environment flags (all optional; none of them touches the network or git):
  MMFAST_BUILD_EXT=1        build the C++/CUDA extension `mmfast._C` now (default: skip; it is then
                            built by ninja on first use, see mmfast/_ext.py).
  MMFAST_FORCE_CUDA=1       compile the CUDA sources even when no GPU is visible (needs nvcc/CUDA_HOME).
  MMFAST_SKIP_CUDA=1        build only the CPU C++ part.
  TORCH_CUDA_ARCH_LIST      CUDA archs, e.g. "8.0;9.0" (default: "8.0;9.0" when no GPU is visible).
  MAX_JOBS                  parallel compile jobs for ninja (default: from cores and free memory).
  Install offline with:     pip install -e . --no-deps --no-build-isolation
"""
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _default_max_jobs():
    # nvcc peaks at ~2 GB per job: bound jobs by memory as well as cores.
    cores = os.cpu_count() or 1
    try:
        free_gb = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (ValueError, OSError, AttributeError):
        free_gb = 4
    return str(max(1, min(cores, int(free_gb // 2))))


def _extensions():
    if not _flag("MMFAST_BUILD_EXT"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    os.environ.setdefault("MAX_JOBS", _default_max_jobs())
    csrc = os.path.join(ROOT, "csrc")
    cpp_sources = [os.path.join("csrc", f) for f in sorted(os.listdir(csrc)) if f.endswith(".cpp")]
    cu_sources = [os.path.join("csrc", f) for f in sorted(os.listdir(csrc)) if f.endswith(".cu")]
    with_cuda = (
        not _flag("MMFAST_SKIP_CUDA")
        and CUDA_HOME is not None
        and (torch.cuda.is_available() or _flag("MMFAST_FORCE_CUDA"))
    )
    cxx = ["-O3", "-fopenmp"]  # no -std: torch's BuildExtension adds the one ATen needs (c++20)
    common = dict(include_dirs=[csrc], extra_link_args=["-fopenmp"])
    if with_cuda:
        if not torch.cuda.is_available():
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = CUDAExtension(
            "mmfast._C",
            cpp_sources + cu_sources,
            extra_compile_args={"cxx": cxx + ["-DMMFAST_WITH_CUDA"], "nvcc": ["-O3", "-DMMFAST_WITH_CUDA"]},
            **common,
        )
    else:
        ext = CppExtension("mmfast._C", cpp_sources, extra_compile_args={"cxx": cxx}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="mmfast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for vision-language models",
    python_requires=">=3.10",   # torch 2.11, the oldest release tested, needs 3.10
    # kernels/ is installed as mmfast.kernels (a bare top-level `kernels` would collide with other projects)
    packages=["mmfast", "mmfast.kernels", "mmfast.csrc", "mmfast.benchmarks"]
    + [f"mmfast.{p}" for p in find_packages("mmfast")]
    + [f"mmfast.kernels.{p}" for p in find_packages("kernels")],
    package_dir={"mmfast": "mmfast", "mmfast.kernels": "kernels", "mmfast.csrc": "csrc",
                 "mmfast.benchmarks": "benchmarks"},
    # tuned/*.json: the measured launch configs of `python -m mmfast bench tune` (kernels/_tuned.py)
    package_data={"mmfast.csrc": ["*.cpp", "*.cu", "*.h", "*.cuh"],
                  **{f"mmfast.kernels.{p}": ["tuned/*.json"] for p in find_packages("kernels")}},
    # tested: torch 2.11 (the lent GPU machine's image), 2.14.1 (CI) and 2.15.0 (the full suite, by hand); Triton
    # 3.6, 3.8 and 3.9 (CI's compile gates and interpreters); older releases were never run
    install_requires=["torch>=2.11", "triton>=3.6", "ninja", "numpy"],
    extras_require={
        # timm and open_clip: the tests compare against their PatchEmbed / position resampling / ClipLoss
        "dev": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "rich", "matplotlib", "timm", "open_clip_torch",
                "transformers>=5.17,<6", "einops", "einops-exts", "liger-kernel>=0.5,<0.9",
                # tests/swap/test_peft.py: mmfast.patch keeps PEFT's LoRA adapters (tested with 0.21.2)
                "peft"],
        # mmfast.swap.transformers: tested with 4.57.6, 5.17 and 5.24 (both mask builder contracts; on 4.5x
        # BLIP-2's Q-Former, which does not call AttentionInterface there, is swapped per instance)
        "hf": ["transformers>=4.57,<6", "timm", "open_clip_torch"],
        # mmfast.patch's timm / open_clip integrations (mmfast/swap/timm.py, open_clip.py): tested with timm
        # 1.0.31 and open_clip_torch 3.3.0; a module whose layout differs from the swap table is left alone
        "timm": ["timm>=1.0,<1.1"],
        "open_clip": ["open_clip_torch>=3.0,<3.4", "timm>=1.0,<1.1"],
        # mmfast.nn.liger: Liger-Kernel's RMSNorm / RoPE / SwiGLU / fused linear cross-entropy in the decoder LM on
        # CUDA (tested with 0.8.5; it needs only torch and triton)
        "liger": ["liger-kernel>=0.5,<0.9"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["mmfast=mmfast.__main__:main"]},
)
