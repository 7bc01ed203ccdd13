"""Where the kernel tests run, and on which backends. Every backend is reached through the
dispatcher (fastprox._registry.serve), by the public API as users call it:

    under TRITON_INTERPRET=1 (no GPU)   CPU tensors: the Triton kernels (interpreted), the C++
                                        kernels, the float64 reference
    on a CUDA machine                   CUDA tensors: the Triton kernels, the default backend
                                        (C++ on a host copy), the float64 reference
"""

from __future__ import annotations

import os

from fastprox import _registry

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
DEVICE = "cpu" if INTERPRET else "cuda"
BACKENDS = ("triton", "cpp", "reference") if INTERPRET else ("triton", "host", "reference")
# FASTPROX_TEST_BACKENDS=cpp,reference (a comma-separated subset): only those (the fast lane,
# `make test-fast`, leaves out the interpreted Triton kernels)
_ONLY = os.environ.get("FASTPROX_TEST_BACKENDS")
if _ONLY:
    BACKENDS = tuple(b for b in BACKENDS if b in _ONLY.split(","))


def served_by(backend: str):
    return _registry.serve(backend, DEVICE)


def on_triton_paths(request) -> bool:
    """Whether a test forcing an engine path of the Triton kernels (tile sizes) means anything
    here: it runs on the Triton backend (or calls the kernels directly)."""
    return "backend" not in request.fixturenames or request.getfixturevalue("backend") == "triton"
