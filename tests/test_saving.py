"""Nothing is lost: saves that fail midway (a killed process, a file size limit) leave the
previous save byte-identical and loadable; damaged, foreign and wrong files are refused with an
error naming the file (tests/save_child.py is the process that fails)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import warnings

import pytest
import torch

import fastprox

pytest.importorskip("torch_pruning")

CHILD = os.path.join(os.path.dirname(__file__), "save_child.py")
sys.path.insert(0, os.path.dirname(__file__))
import save_child  # noqa: E402


def _run_child(mode: str, path, limit: int | None = None, *, kill: bool):
    """Runs save_child.py; with ``kill``, SIGKILL once it says READY. Returns (returncode,
    output)."""
    command = [sys.executable, CHILD, mode, str(path)] + ([str(limit)] if limit else [])
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(str(path)))
    if kill:
        line = proc.stdout.readline()
        assert line.strip() == "READY", (line, proc.stderr.read()[-3000:])
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=240)
    return proc.returncode, out + err


def _tree(directory) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(root, f), directory):
            open(os.path.join(root, f), "rb").read()
            for root, _, files in os.walk(directory) for f in files}


def _no_temporaries(directory) -> None:
    assert not [e for e in os.listdir(directory) if e.endswith(".tmp")]


# -- save_compact --------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path):
    """A good save of a compacted ResNet (half its channel groups dead): path, bytes, the dense
    model and an input."""
    model, small, x = save_child.compacted_resnet(seed=1, fraction=0.5)
    path = tmp_path / "small.pt"
    fastprox.save_compact(small, path)
    return path, path.read_bytes(), model, x


def _build():
    return save_child.M.ResNet(save_child.M.BasicBlock, (2, 2), (8, 16))


def _still_good(path, data, model, x) -> None:
    assert path.read_bytes() == data, "the previous save changed"
    again = fastprox.load_compact(path, _build).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["file-kill-writing", "file-kill-syncing"])
def test_killed_save_leaves_the_previous_file(saved, mode):
    path, data, model, x = saved
    code, output = _run_child(mode, path, kill=True)
    assert code == -signal.SIGKILL, output
    _still_good(path, data, model, x)
    # the killed process's temporary file is the only trace, under a name nothing reads
    left = [e for e in os.listdir(path.parent) if e != path.name]
    assert all(e.startswith(".small.pt.") and e.endswith(".tmp") for e in left), left


def test_save_over_a_file_size_limit_fails_and_keeps_the_previous_file(saved):
    path, data, model, x = saved
    code, output = _run_child("file-fsize", path, limit=len(data) // 2, kill=False)
    assert code == 3 and "save failed" in output, output
    _still_good(path, data, model, x)
    assert os.listdir(path.parent) == [path.name]  # the temporary file was removed


def test_a_new_save_replaces_the_old_one(saved):
    path, data, _, _ = saved
    model, small, x = save_child.compacted_resnet(seed=2, fraction=0.0)
    fastprox.save_compact(small, path)
    assert path.read_bytes() != data
    again = fastprox.load_compact(path, _build).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=1e-4, atol=1e-5)
    _no_temporaries(path.parent)


def _damaged(kind: str, path, data: bytes, tmp_path):
    bad = tmp_path / f"{kind}.pt"
    if kind == "truncated":
        bad.write_bytes(data[:len(data) // 2])
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("not a checkpoint\n")
    elif kind == "random":
        bad.write_bytes(os.urandom(4096))
    elif kind == "state_dict":
        torch.save(_build().state_dict(), bad)
    elif kind == "bad plan":
        saved = torch.load(path, weights_only=True)
        name = next(iter(saved["plan"]))
        saved["plan"][name]["kept"] = torch.tensor([0, 10 ** 6])
        torch.save(saved, bad)
    elif kind == "tampered weights":
        saved = torch.load(path, weights_only=True)
        key = next(k for k, v in saved["state_dict"].items() if v.dim() == 4)
        saved["state_dict"][key] = saved["state_dict"][key][:1]
        torch.save(saved, bad)
    return bad


@pytest.mark.parametrize("kind, message", [
    ("truncated", "is not a file save_compact wrote, or it is damaged"),
    ("empty", "is not a file save_compact wrote, or it is damaged"),
    ("text", "is not a file save_compact wrote, or it is damaged"),
    ("random", "is not a file save_compact wrote, or it is damaged"),
    ("state_dict", "plain state_dict: load that with model.load_state_dict"),
    ("bad plan", "kept must be increasing int64 group indices"),
    ("tampered weights", "do not fit the model build\\(\\) made"),
])
def test_damaged_or_foreign_files_are_refused_by_name(saved, tmp_path, kind, message):
    path, data, model, x = saved
    bad = _damaged(kind, path, data, tmp_path)
    with pytest.raises(ValueError, match=message) as info:
        fastprox.load_compact(bad, _build)
    assert "load_compact" in str(info.value) and str(bad) in str(info.value)
    _still_good(path, data, model, x)


def test_a_save_of_another_model_is_refused_before_pruning(saved):
    path, data, model, x = saved
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="saved from another model.*LlamaForCausalLM"):
        fastprox.load_compact(path, lambda: save_child.M.llama())
    with pytest.raises(TypeError, match="build\\(\\) must return the dense nn.Module"):
        fastprox.load_compact(path, lambda: None)
    with pytest.raises(FileNotFoundError, match="load_compact: .*missing.pt does not exist"):
        fastprox.load_compact(path.parent / "missing.pt", _build)
    _still_good(path, data, model, x)


def test_save_compact_names_a_wrong_argument(tmp_path):
    model, small, _ = save_child.compacted_resnet(seed=1, fraction=0.5)
    for wrong in (model, small.kept_units):  # the dense model (no plan), a dict
        with pytest.raises(TypeError, match="save_compact: compacted must be what "
                                            "fastprox.compact returned"):
            fastprox.save_compact(wrong, tmp_path / "x.pt")
    assert not os.listdir(tmp_path)


# -- save_pretrained_compact ---------------------------------------------------------------------
@pytest.fixture
def pretrained(tmp_path):
    """A good save_pretrained_compact directory (a Llama, half its heads and neurons removed
    in every layer), with a file of the user's beside the model's."""
    pytest.importorskip("transformers")
    model, small = save_child.compacted_llama(seed=1, fraction=0.5)
    directory = tmp_path / "llama"
    fastprox.save_pretrained_compact(small, directory)
    (directory / "notes.txt").write_text("the user's own file\n")
    x = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        expected = model(x).logits
    return directory, _tree(directory), x, expected


def _pretrained_still_good(directory, tree, x, expected) -> None:
    import transformers

    assert _tree(directory) == tree, "the previous save changed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["dir-kill-writing", "dir-kill-syncing"])
def test_killed_save_pretrained_leaves_the_previous_directory(pretrained, mode):
    directory, tree, x, expected = pretrained
    code, output = _run_child(mode, directory, kill=True)
    assert code == -signal.SIGKILL, output
    _pretrained_still_good(directory, tree, x, expected)


def test_save_pretrained_over_a_file_size_limit_keeps_the_previous_directory(pretrained):
    directory, tree, x, expected = pretrained
    size = max(len(v) for v in tree.values())
    code, output = _run_child("dir-fsize", directory, limit=size // 2, kill=False)
    assert code == 3 and "save failed" in output, output
    _pretrained_still_good(directory, tree, x, expected)
    _no_temporaries(directory.parent)


def test_save_pretrained_replaces_the_directory_and_keeps_other_files(pretrained):
    import transformers

    directory, tree, x, _ = pretrained
    umask = os.umask(0)
    os.umask(umask)
    assert directory.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it
    os.chmod(directory, 0o750)
    model, small = save_child.compacted_llama(seed=2, fraction=0.25)
    fastprox.save_pretrained_compact(small, directory)
    assert directory.stat().st_mode & 0o777 == 0o750
    assert (directory / "notes.txt").read_text() == "the user's own file\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    assert again.config.intermediate_size == 36 and again.config.num_key_value_heads == 2
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, small(x).logits, rtol=1e-4, atol=1e-5)
    _no_temporaries(directory.parent)


def test_saves_get_the_usual_permissions(tmp_path):
    """A new save gets what open() would give it; a replaced one keeps its own mode."""
    umask = os.umask(0o022)
    try:
        _, small, _ = save_child.compacted_resnet(seed=1, fraction=0.5)
        path = tmp_path / "small.pt"
        fastprox.save_compact(small, path)
        assert path.stat().st_mode & 0o777 == 0o644
        os.chmod(path, 0o600)
        fastprox.save_compact(small, path)
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(umask)
