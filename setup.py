"""Build fused_preact._C: C++ CPU kernels always, CUDA kernels when nvcc is found.

Environment:
  FUSED_PREACT_NO_CUDA=1   build the CPU kernels only, even where nvcc exists
  TORCH_CUDA_ARCH_LIST     GPU architectures (default "8.0;9.0": A100 and H100/H200)
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import os
import shutil
import sysconfig
from pathlib import Path

from setuptools import setup


def _point_cuda_home_at_the_toolkit():
    # torch derives CUDA_HOME from nvcc's location when it is unset; an nvcc
    # wrapper script outside the toolkit (e.g. /usr/local/bin/nvcc) would make
    # it look for headers and libcudart in the wrong tree.
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    toolkit = Path("/usr/local/cuda")
    if nvcc and not (Path(nvcc).resolve().parents[1] / "include" / "cuda_runtime.h").exists() \
            and (toolkit / "bin" / "nvcc").exists():
        os.environ["CUDA_HOME"] = str(toolkit)


_point_cuda_home_at_the_toolkit()
try:
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as err:
    raise SystemExit("fused_preact builds against the installed torch: install torch first, then run "
                     "`pip install --no-build-isolation .`") from err

ROOT = Path(__file__).parent
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def want_cuda():
    if os.environ.get("FUSED_PREACT_NO_CUDA", "0") not in ("", "0"):
        return False, "FUSED_PREACT_NO_CUDA is set"
    if CUDA_HOME is None or not Path(CUDA_HOME, "bin", "nvcc").exists():
        return False, "nvcc was not found"
    return True, ""


def cuda_library_includes():
    # torch's CUDA headers include cusparse.h, cublas_v2.h, ... which pip's CUDA
    # wheels ship under site-packages/nvidia/cu*/include rather than CUDA_HOME.
    site = Path(sysconfig.get_paths()["purelib"])
    return [str(p) for p in sorted(site.glob("nvidia/cu*/include")) if p.is_dir()]


def extension():
    sources = ["csrc/bindings_cpu.cpp", "csrc/bn_relu_conv_autograd.cpp"]
    # No -std flag: torch.utils.cpp_extension picks the standard its headers need
    # (C++17 for older torch, C++20 from torch 2.14 on).
    # -ffp-contract=off: the ReLU mask x * scale + shift is recomputed in several
    # kernels and must round identically in each (no FMA in some places only).
    # -fopenmp: at::parallel_for is a header template that only runs in parallel
    # when the including file is compiled with OpenMP (it binds to the libgomp
    # torch already loaded).
    # -fno-tree-loop-distribute-patterns: the CPU reductions stage each block of
    # terms in a small stack buffer (core/bn_relu_cpu.h); GCC would turn a block
    # that is a plain copy into a memcpy call per 64 elements, 2.5x slower.
    cxx_flags = ["-O3", "-fvisibility=hidden", "-ffp-contract=off", "-fno-tree-loop-distribute-patterns", "-fopenmp"]
    link_flags = ["-fopenmp"]
    include_dirs = [str(ROOT / "csrc")]
    use_cuda, why_not = want_cuda()
    if not use_cuda:
        print(f"fused_preact: building the CPU kernels only ({why_not})")
        return CppExtension("fused_preact._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    print(f"fused_preact: building CPU and CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    # No --use_fast_math: it flushes denormals and approximates the division of
    # the Welford update, which memory-bound kernels do not need.
    nvcc_flags = ["-O3", "-lineinfo"]
    return CUDAExtension("fused_preact._C", sources, include_dirs=include_dirs + cuda_library_includes(),
                         extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)


# Package metadata lives in pyproject.toml; this file only describes the extension.
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
