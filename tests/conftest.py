import os
import sys

# The repository root holds kernels/ (installed as fastprox.kernels). `python -m pytest` puts the
# working directory on sys.path, where kernels/ would pass for the Hugging Face `kernels` package
# that transformers probes when it is imported: the root stays off sys.path.
# fastprox is imported first, from wherever it is installed (an install that found it through the
# root keeps working).
import fastprox  # noqa: E402,F401

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != ROOT]
sys.path.insert(0, os.path.dirname(__file__))

from fresh_seed import _fresh_seed, pytest_runtest_makereport  # noqa: E402,F401
