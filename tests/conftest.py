import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from fresh_seed import _fresh_seed, pytest_runtest_makereport  # noqa: E402,F401
