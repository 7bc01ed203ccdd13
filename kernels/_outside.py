"""What a top-level ``import kernels`` gets when Python runs in fastprox's source tree: the
folder ``kernels/`` installs as ``fastprox.kernels`` only, so the name goes to whatever else
provides it on sys.path (kernels/__init__.py)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def load_elsewhere(name: str, init_file: str):
    """The module ``name`` from the entries of sys.path other than the tree that holds
    ``init_file`` (``<root>/kernels/__init__.py``), executed; ModuleNotFoundError without one."""
    sys.modules.pop(f"{name}._outside", None)  # this file, loaded under the other's name
    root = os.path.dirname(os.path.dirname(os.path.realpath(init_file)))
    path = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != root]
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        del sys.modules[name]
        raise ModuleNotFoundError(
            f"No module named {name!r}: the folder {os.path.join(root, name)} is fastprox's "
            f"GPU kernels, installed as fastprox.kernels (import that)", name=name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
