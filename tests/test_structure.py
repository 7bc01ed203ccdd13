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


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python_in_root(code: str, extra_path: str | None = None):
    """Runs ``code`` in a fresh interpreter started in the source tree's root (its first
    sys.path entry), with ``extra_path`` after it."""
    import subprocess
    import sys

    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = extra_path
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_kernels_folder_never_shadows_a_kernels_distribution(tmp_path):
    """Python started in the tree's root finds kernels/ first as a top-level ``kernels``: it
    is fastprox.kernels only, so another distribution of that name (Hugging Face's, which
    transformers imports) is what ``import kernels`` gets; without one, the import fails."""
    other = tmp_path / "kernels"
    other.mkdir()
    (other / "__init__.py").write_text("WHO = 'the other distribution'\n")
    (other / "layers.py").write_text("X = 1\n")
    got = _python_in_root("import kernels, kernels.layers, fastprox.kernels as k; "
                          "print(kernels.WHO, kernels.layers.X, len(k.ENTRIES))", str(tmp_path))
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["the", "other", "distribution", "1", "7"]
    # no other distribution on the path (site-packages left out): not found, as outside
    # the tree, naming the package the folder is
    got = _python_in_root("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not "
                          "in p]\ntry:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
                          "    print('missing', e.name, 'fastprox.kernels' in str(e))\n"
                          "print(sorted(m for m in sys.modules if m.startswith('kernels')))")
    assert got.returncode == 0, got.stderr
    assert got.stdout.split("\n")[:2] == ["missing kernels True", "[]"]


def test_transformers_imports_in_the_tree_root():
    """A script in the tree's root (or Python started there) imports transformers' models."""
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        import pytest

        pytest.skip("transformers is not installed")
    got = _python_in_root("import transformers\nfrom transformers import GPT2Config, "
                          "GPT2LMHeadModel\nm = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=8, "
                          "n_head=2, vocab_size=16, n_positions=8))\nprint(type(m).__name__)")
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.strip() == "GPT2LMHeadModel"
