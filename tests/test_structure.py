"""The package's shape: no import cycles between its modules (function-level imports included),
and every operator of the table served by the public API and both op libraries."""

import ast
import os

import torch

import fastprox
from fastprox.operators import OPERATORS

PKG = os.path.dirname(fastprox.__file__)


def _module_of(path: str) -> str:
    rel = os.path.relpath(path, PKG)[:-3].replace(os.sep, ".")
    return "fastprox" if rel == "__init__" else "fastprox." + rel.removesuffix(".__init__")


def _imports(path: str, module: str, modules) -> set[str]:
    """The fastprox modules that ``module`` imports, anywhere in its source."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(max(node.level - 1, 0)):
                base = base.rsplit(".", 1)[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level \
                else (node.module or "")
            names = [f"{target}.{alias.name}" for alias in node.names]
            out.update(names)
            if not any(n in modules for n in names):  # `from pkg import mod` imports mod
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def _graph() -> dict[str, set[str]]:
    files = {}
    for root, _, names in os.walk(PKG):
        for name in names:
            if name.endswith(".py"):
                files[_module_of(os.path.join(root, name))] = os.path.join(root, name)
    return {m: {t for t in _imports(p, m, files) if t in files and t != m and t != "fastprox"}
            for m, p in files.items()}


def test_no_import_cycles():
    graph = _graph()
    assert "fastprox.ops" in graph and "fastprox.distributed" in graph["fastprox.ops"]
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for t in sorted(graph[m]):
            assert state.get(t) != 1, "import cycle: " + " -> ".join(path + [m, t])
            if t not in state:
                visit(t, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_every_row_is_served():
    for row in OPERATORS:
        assert callable(getattr(fastprox, row.name)), row.name
        assert getattr(fastprox, row.name).__doc__ == row.docstring
        if row.kind in ("norms", "fused", "metric"):  # the ops of the library: CPU kernel, default backend
            for key in ("CPU", "CompositeExplicitAutograd", "Meta"):
                assert torch._C._dispatch_has_kernel_for_dispatch_key(
                    f"fastprox::{row.name}", key), (row.name, key)
        else:  # presets are the fused step; coupled groups run in phases on the two ops
            assert not hasattr(torch.ops.fastprox, row.name), row.name


def test_presets_are_plain_functions():
    """Each preset is a function written out in fastprox/ops.py (a search finds it), with the
    signature its row declares: weight, its thresholds, dim=None if grouped, its flags
    keyword-only (default True)."""
    import inspect

    ops_file = os.path.join(PKG, "ops.py")
    for row in OPERATORS:
        if row.kind == "preset":
            fn = getattr(fastprox, row.name)
            source = inspect.getsource(fn)
            assert source.startswith(f"def {row.name}(weight, ") and "preset_table" in source
            assert os.path.samefile(inspect.getsourcefile(fn), ops_file), row.name
            assert f"\ndef {row.name}(" in open(ops_file).read(), row.name
            P = inspect.Parameter
            want = [P("weight", P.POSITIONAL_OR_KEYWORD)]
            want += [P(n, P.POSITIONAL_OR_KEYWORD) for n in row.threshold_names]
            if row.grouped:
                want.append(P("dim", P.POSITIONAL_OR_KEYWORD, default=None))
            want += [P(f, P.KEYWORD_ONLY, default=True) for f in row.flags]
            assert list(inspect.signature(fn).parameters.values()) == want, row.name


def test_kernels_are_a_leaf():
    """kernels/ (installed as fastprox.kernels) imports nothing from fastprox: no relative
    import above its own package, no absolute fastprox import; its default names of the fused
    step's thresholds are the table's columns."""
    from fastprox import kernels
    from fastprox.kernels import foreach_prox
    from fastprox.operators import COLUMNS

    root = os.path.dirname(kernels.__file__)
    for name in sorted(os.listdir(root)):
        if not name.endswith(".py"):
            continue
        for node in ast.walk(ast.parse(open(os.path.join(root, name)).read())):
            if isinstance(node, ast.ImportFrom):
                assert node.level <= 1, (name, node.module)
                assert node.level or not (node.module or "").startswith("fastprox"), name
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("fastprox") for a in node.names), name
    assert foreach_prox.COLUMNS == COLUMNS
