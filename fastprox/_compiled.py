"""What a training step runs outside a torch.compile graph.

``outside_graph(fn)``: ``fn`` as a function dynamo does not trace. Called from a compiled
region, the graph breaks once at the call and ``fn`` runs eagerly (the steps that read values
on the host: fastprox/steps.py, fastprox/l0.py); called eagerly, it is ``fn``. torch.compile's
machinery (``torch._dynamo``, about a second to import) is imported at the first call, never by
``import fastprox``: torch's own lazy form of ``torch.compiler.disable`` where this torch has
it, else ``torch.compiler.disable`` itself (then imported here).
"""

from __future__ import annotations

import torch


def outside_graph(fn):
    lazy = getattr(torch, "_disable_dynamo", None)
    return lazy(fn) if lazy is not None else torch.compiler.disable(fn)
