"""A process that saves and is made to fail midway, for tests/test_saving.py.

    python save_child.py MODE PATH [LIMIT]

MODE ``file-*`` saves a compacted ResNet with ``fastprox.save_compact``; ``dir-*`` a compacted
Llama with ``fastprox.save_pretrained_compact``. ``*-kill-writing``: the save's bytes are half
written when the process says READY and waits (the test then sends SIGKILL); ``*-kill-syncing``:
everything is written, not yet synced nor renamed; ``*-fsize``: a file size limit of LIMIT bytes
(RLIMIT_FSIZE, SIGXFSZ ignored so that the write fails with EFBIG): the save must raise, and the
process exits 3.
"""

from __future__ import annotations

import io
import os
import resource
import signal
import sys
import time

import torch

import fastprox
import models as M


def compacted_resnet(seed: int, fraction: float):
    """A ResNet compacted after ``fraction`` of its channel groups were zeroed (seeded)."""
    from fastprox import groups as G

    torch.manual_seed(seed)
    model = M.randomize_batchnorm(M.ResNet(M.BasicBlock, (2, 2), (8, 16))).eval()
    x = torch.randn(2, 3, 16, 16)
    found = G.channels(model, x[:1])
    generator = torch.Generator().manual_seed(seed)
    for s in found.sets:
        if fraction:
            M.kill(s, fraction, generator)
    return model, fastprox.compact(model, found), x


def compacted_llama(seed: int, fraction: float):
    """A Llama (grouped-query attention) with the same heads and neurons removed in every
    layer, compacted."""
    from fastprox import groups as G

    torch.manual_seed(seed)
    model = M.llama(layers=2, heads=4, kv_heads=2, ff=48).eval()
    found = G.discover(model, ("heads", "neurons"))
    with torch.no_grad():
        for s in found.sets:
            dead = torch.arange(int(s.num_groups * fraction))
            for m in s.slices:
                positions = torch.isin(m.index, dead).nonzero().flatten()
                m.tensor.index_fill_(m.axis, positions, 0)
    return model, fastprox.compact(model, found).model


def _ready_and_wait() -> None:
    print("READY", flush=True)
    while True:
        time.sleep(1)


def main(mode: str, path: str, limit: int | None) -> int:
    if mode.endswith("kill-writing"):
        real_save = torch.save

        def half_save(obj, f, *args, **kwargs):
            buffer = io.BytesIO()
            real_save(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[:len(data) // 2])
            f.flush()
            _ready_and_wait()

        torch.save = half_save
        if mode.startswith("dir"):  # safetensors writes the weights of save_pretrained
            import safetensors.torch as st
            import transformers.modeling_utils as mu

            def half_file(tensors, filename, metadata=None):
                data = st.save(tensors, metadata=metadata)
                with open(filename, "wb") as f:
                    f.write(data[:len(data) // 2])
                _ready_and_wait()

            mu.safe_save_file = half_file
    elif mode.endswith("kill-syncing"):
        os.fsync = lambda fd: _ready_and_wait()
    elif mode.endswith("fsize"):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    if mode.startswith("file"):
        _, small, _ = compacted_resnet(seed=2, fraction=0.0)
        save = lambda: fastprox.save_compact(small, path)  # noqa: E731
    else:
        _, small = compacted_llama(seed=2, fraction=0.25)
        save = lambda: fastprox.save_pretrained_compact(small, path)  # noqa: E731
    if mode.endswith("fsize"):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        try:
            save()
        except Exception as exc:  # noqa: BLE001 (EFBIG as OSError, or safetensors' own error)
            print(f"save failed: {type(exc).__name__}: {exc}", flush=True)
            return 3
        return 0
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else None))
