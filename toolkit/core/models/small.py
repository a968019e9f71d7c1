"""A small, fast CNN for tests, the demo and slow boards."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


def small_cnn(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            block1=_block(in_channels, 16),
            block2=_block(16, 32),
            block3=nn.Sequential(
                nn.Conv2d(32, 64, 3, padding=1, bias=False),
                nn.BatchNorm2d(64),
                nn.ReLU(inplace=True),
            ),
            head=nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)
            ),
        )
    )
