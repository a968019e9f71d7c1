"""Early-exit heads: the small classifier that gives the edge its own loss.

The head is deliberately cheap (one conv, global average pooling, one linear
layer) because it runs on the board every training step and at inference.
Global pooling is written as ``mean`` over H and W, which ExecuTorch
differentiates exactly (its adaptive-average-pool backward kernel is missing).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from toolkit.core.errors import HiertrainError


class GlobalAvgPool(nn.Module):
    """``AdaptiveAvgPool2d(1)`` + flatten, as a plain mean (exact ExecuTorch backward)."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


@dataclass(frozen=True)
class ExitHeadConfig:
    """Shape of the early-exit head. ``channels=0`` drops the conv (pool + linear only)."""

    channels: int = 64
    kernel: int = 3
    stride: int = 1

    def __post_init__(self) -> None:
        if self.channels < 0:
            raise HiertrainError(f"exit head channels must be >= 0, got {self.channels}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise HiertrainError(f"exit head kernel must be odd and >= 1, got {self.kernel}")
        if self.stride < 1:
            raise HiertrainError(f"exit head stride must be >= 1, got {self.stride}")

    def to_dict(self) -> dict:
        return asdict(self)


def build_exit_head(in_channels: int, num_classes: int, cfg: ExitHeadConfig) -> nn.Sequential:
    if cfg.channels == 0:
        return nn.Sequential(GlobalAvgPool(), nn.Linear(in_channels, num_classes))
    return nn.Sequential(
        nn.Conv2d(
            in_channels, cfg.channels, cfg.kernel, stride=cfg.stride,
            padding=cfg.kernel // 2, bias=False,
        ),
        nn.BatchNorm2d(cfg.channels),
        nn.ReLU(inplace=True),
        GlobalAvgPool(),
        nn.Linear(cfg.channels, num_classes),
    )
