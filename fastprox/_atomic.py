"""Atomic saves: a save that fails midway (a full disk, a file size limit, a killed process)
leaves the previous file or directory byte-identical.

* ``write_file(path, write)``: ``write(f)`` fills a temporary file in the same directory, which
  is flushed, synced and then renamed over ``path`` (``os.replace``: atomic on POSIX and
  Windows); the directory is synced so that the rename survives a power loss.
* ``write_directory(directory, write)``: ``write(tmp)`` fills a temporary sibling directory,
  which then takes the place of ``directory`` in one step where the system can swap two paths
  (Linux ``renameat2(RENAME_EXCHANGE)``); elsewhere the old directory is renamed aside, the new
  one renamed in, and the old one removed (a crash between the two renames leaves both, under
  names that say which is which). Files of the old directory that the new save does not write
  and that hold no weights (a tokenizer, a README) are carried over.

A temporary file or directory left by a killed process is named ``.<name>.<random>.tmp`` and is
never read.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile


def _sync_directory(directory: str) -> None:
    if sys.platform.startswith("win"):
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mode(path: str, default: int) -> int:
    """The permissions a new save at ``path`` gets: those of what it replaces, else what
    ``open`` / ``mkdir`` would give (``default`` less the umask); temporary files are private."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return default & ~umask


def write_file(path, write) -> None:
    """Writes ``path`` atomically: ``write(f)`` fills a binary file object."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    mode = _mode(path, 0o666)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    try:
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _sync_directory(directory)


# weight files of a Hugging Face save: never carried over from an old directory (a new save
# with another sharding would otherwise sit beside stale shards)
_WEIGHT_PREFIXES = ("model", "pytorch_model", "tf_model", "flax_model")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".h5", ".msgpack", ".index.json")


def _is_weights(name: str) -> bool:
    return name.startswith(_WEIGHT_PREFIXES) and name.endswith(_WEIGHT_SUFFIXES)


def _exchange(a: str, b: str) -> bool:
    """Swaps two paths in one step (Linux renameat2 with RENAME_EXCHANGE); False where the
    system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                          ctypes.c_uint]
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # (a file system without the flag)
    raise OSError(code, os.strerror(code), b)


def write_directory(directory, write) -> None:
    """Writes ``directory`` as a whole: ``write(tmp)`` fills a new directory ``tmp``."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise NotADirectoryError(f"{directory} exists and is not a directory")
    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    mode = _mode(directory, 0o777)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=".tmp")
    try:
        os.chmod(tmp, mode)
        write(tmp)
        if os.path.isdir(directory):
            for entry in os.listdir(directory):
                source, target = os.path.join(directory, entry), os.path.join(tmp, entry)
                if os.path.lexists(target) or _is_weights(entry):
                    continue
                if os.path.isdir(source) and not os.path.islink(source):
                    shutil.copytree(source, target, symlinks=True)
                else:
                    shutil.copy2(source, target, follow_symlinks=False)
        for root, _, files in os.walk(tmp):
            for f in files:
                path = os.path.join(root, f)
                if not os.path.islink(path):
                    with open(path, "rb") as handle:
                        os.fsync(handle.fileno())
        _sync_directory(tmp)
        if not os.path.isdir(directory):
            os.rename(tmp, directory)
        elif _exchange(tmp, directory):
            shutil.rmtree(tmp)  # now the old directory
        else:
            old = tempfile.mkdtemp(dir=parent, prefix=f".{name}.old.", suffix=".tmp")
            os.rmdir(old)
            os.rename(directory, old)
            try:
                os.rename(tmp, directory)
            except BaseException:
                os.rename(old, directory)
                raise
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync_directory(parent)
