"""Weight shapes of whole models, for the multi-tensor benchmarks (no torchvision needed)."""

from __future__ import annotations


def resnet50_weights() -> list[tuple[tuple[int, ...], object]]:
    """(shape, dim) of ResNet-50's conv weights (input-channel groups) and its fc (columns)."""
    shapes = [((64, 3, 7, 7), (0, 2, 3))]
    in_ch = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        out_ch = width * 4
        for b in range(blocks):
            shapes += [((width, in_ch, 1, 1), (0, 2, 3)), ((width, width, 3, 3), (0, 2, 3)),
                       ((out_ch, width, 1, 1), (0, 2, 3))]
            if b == 0:
                shapes.append(((out_ch, in_ch, 1, 1), (0, 2, 3)))  # downsample
            in_ch = out_ch
    shapes.append(((1000, 2048), 0))
    return shapes


def gpt2_small_weights() -> list[tuple[tuple[int, ...], object]]:
    """(shape, dim) of GPT-2 small's Linear weights as nn.Linear (out, in), column groups."""
    d = 768
    block = [((3 * d, d), 0), ((d, d), 0), ((4 * d, d), 0), ((d, 4 * d), 0)]
    return block * 12
