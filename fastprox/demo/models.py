"""The demo's models beyond nn.Sequential: a ResNet (torchvision's layout: BasicBlock and
Bottleneck, BatchNorm, 1x1-conv downsample shortcuts; built here, torchvision is not needed) and
a small transformer classifier, for coupled groups (fastprox.groups) and their compaction."""

from __future__ import annotations

import torch
from torch import nn


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module | None:
    """The downsample shortcut (1x1 conv + BatchNorm) when a block changes shape, else None."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride=1):
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.downsample = _shortcut(cin, cout, stride)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    """torchvision's ResNet layout, small: stem conv + BN, stages of blocks (the first block of
    a later stage downsamples through a 1x1 conv + BN shortcut), global pooling, fc."""

    def __init__(self, block=BasicBlock, layers=(2, 2), widths=(8, 16), in_ch=3, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        cin = widths[0]
        stages = []
        for i, (count, width) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(count):
                blocks.append(block(cin, width, 2 if (i > 0 and j == 0) else 1))
                cin = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layers(x)
        return self.fc(x.mean(dim=(2, 3)))


class RowTransformer(nn.Module):
    """A transformer classifier of images read as sequences: each image row is a token (a Linear
    embedding plus a learned position embedding), an ``nn.TransformerEncoder`` (pre-norm,
    GELU), the mean over tokens, a Linear classifier."""

    def __init__(self, row: int = 8, rows: int = 8, d: int = 32, heads: int = 4, ff: int = 64,
                 layers: int = 2, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(row, d)
        self.position = nn.Parameter(torch.zeros(rows, d))
        layer = nn.TransformerEncoderLayer(d, heads, ff, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        tokens = self.embed(x.reshape(x.shape[0], -1, self.embed.in_features)) + self.position
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))
