"""Helpers shared by the model walks (regularizer presets, L0 gates, compaction, statistics):
the layer types they know and the flattening of nested ``nn.Sequential`` models."""

from __future__ import annotations

from torch import nn

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHTED = (nn.Linear, *CONV)  # the layers whose weight holds units (rows / output channels)


def flatten(model: nn.Module, prefix: str = ""):
    """(qualified name, module) of the children of ``model``, nested ``nn.Sequential`` opened."""
    for name, child in model.named_children():
        full = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from flatten(child, full + ".")
        else:
            yield full, child
