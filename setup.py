"""Builds fastprox._C, the C++ CPU kernels, against the torch that is already installed.

Build without isolation so that this torch is the one compiled against:
    pip install --no-build-isolation -e .

The kernels use ATen's vector types (at::vec) compiled for one instruction set, chosen on the
build machine like -march=native: the best of AVX512 / AVX2 / DEFAULT that torch reports there.
FASTPROX_CPU_CAPABILITY=DEFAULT|AVX2|AVX512 overrides it (e.g. for a build that moves between
machines). Importing a build on a CPU that lacks its instruction set fails with a clear message.
"""

import glob
import os
import platform
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:  # pragma: no cover - only reached by a misconfigured build
    sys.exit(
        "fastprox: torch must be importable to build the C++ extension. Install torch first "
        "(pip install torch==2.13.0 on a CPU machine) and build with "
        "`pip install --no-build-isolation .`"
    )

# Flags per capability, as ATen compiles its own per-capability kernels.
_CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": [
        "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
        "-DCPU_CAPABILITY_AVX512",
    ],
}


def _cpu_capability() -> str:
    requested = os.environ.get("FASTPROX_CPU_CAPABILITY")
    if requested:
        if requested not in _CAPABILITY_FLAGS:
            sys.exit(f"fastprox: FASTPROX_CPU_CAPABILITY must be one of {sorted(_CAPABILITY_FLAGS)}")
        return requested
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return "DEFAULT"
    detected = torch.backends.cpu.get_cpu_capability()
    return detected if detected in _CAPABILITY_FLAGS else "DEFAULT"


capability = _cpu_capability()
extra_cxx = [
    "-O3",
    "-std=c++17",
    "-fopenmp",  # at::parallel_for is inline OpenMP; torch's own libgomp serves it at run time
    "-DCPU_CAPABILITY=" + capability,
    f'-DFASTPROX_CPU_CAPABILITY="{capability}"',
    *_CAPABILITY_FLAGS[capability],
]

setup(
    ext_modules=[
        CppExtension(
            name="fastprox._C",
            sources=sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")),
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": extra_cxx},
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildExtension},
)
