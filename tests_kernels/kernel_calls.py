"""Where the kernel tests run: on a GPU, the dispatcher's CUDA kernels; under the interpreter
(CPU tensors), the public API with its op calls going to the same Triton entries
(harness.served_by_kernels, shared with the GPU benchmark)."""

from __future__ import annotations

import os

from harness import served_by_kernels as _served

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
DEVICE = "cpu" if INTERPRET else "cuda"


def served_by_kernels():
    return _served(INTERPRET)
