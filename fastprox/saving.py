"""One way to save a compacted model and load it back: ``fastprox.save`` / ``fastprox.load``.

``save(small, path)`` takes what ``fastprox.compact`` returned (a ``Compacted``) or its model:

* a Hugging Face model: ``path`` is a directory, written by ``save_pretrained_compact``
  (fastprox/hf/export.py) so that stock transformers loads it (returns ``"config"`` or
  ``"remote_code"``);
* any other model compacted on the coupled path: ``path`` is a file, written by
  ``save_compact`` (the weights and the plan; returns ``"compact"``).

``load(path, build=None, **options)`` reads either back: a directory with ``AutoModelForCausalLM
.from_pretrained(path, **options)`` (pass ``trust_remote_code=True`` for the remote form: it
runs the ``modeling_pruned.py`` of that directory), a file with ``load_compact(path, build,
**options)``. Both saves are atomic and both loads check their input first (see their own
functions).
"""

from __future__ import annotations

import os

from torch import nn

from .compaction import Compacted, load_compact, save_compact
from .hf.export import save_pretrained_compact


def save(compacted, path) -> str:
    """Saves ``compacted`` (a ``Compacted`` or its model) at ``path``; the form written."""
    model = compacted.model if isinstance(compacted, Compacted) else compacted
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastprox.save: compacted must be what fastprox.compact returned (a "
                        f"Compacted, or its model), got {type(compacted).__name__}")
    if hasattr(model, "save_pretrained") and getattr(model, "config", None) is not None:
        return save_pretrained_compact(model, path)
    save_compact(compacted, path)
    return "compact"


def load(path, build=None, **options) -> nn.Module:
    """The model ``save`` wrote at ``path`` (module docstring)."""
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        if build is not None:
            raise ValueError(f"fastprox.load: {os.fspath(path)} is a Hugging Face directory: "
                             "its config builds the model (no build)")
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"fastprox.load: {os.fspath(path)} has no config.json: "
                                    "not a directory fastprox.save wrote")
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(path, **options)
    if build is None:
        raise ValueError("fastprox.load: a file save_compact wrote needs build() (the dense "
                         "architecture; the plan removes the same groups)")
    return load_compact(path, build, **options)
