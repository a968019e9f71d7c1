"""Early-exit heads: the small classifier that gives the edge its own loss.

The head is deliberately cheap (one conv, average pooling, one linear layer)
because it runs on the board every training step and at inference. Pooling is
written as ``mean`` over H and W (after a reshape into a grid), which ExecuTorch
differentiates exactly (its adaptive-average-pool backward kernel is missing).

In HT the exit's loss is the only thing that trains the edge's layers, so the head
also decides what the cut activation learns to carry. Global pooling asks for
features that are linearly separable once *where* things are is averaged away; the
cloud's layers would have used that. ``pool=2`` keeps a 2x2 grid of averages, as the
auxiliary heads of layer-wise ("decoupled greedy") training do (Belilovsky et al.,
2020; Wang et al., InfoPro, 2021), at 4x the linear layer's weights. It is the default:
on CIFAR-10 to convergence it took HT's full model from 2.65 points behind end-to-end
training to within a point of it (docs/lowbitrate.md, "Accuracy at convergence").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from toolkit.core.errors import HiertrainError


def _cells(n: int, g: int) -> list[tuple[int, int]]:
    """``AdaptiveAvgPool2d``'s cell boundaries along one axis of length ``n``."""
    return [(i * n // g, -(-(i + 1) * n // g)) for i in range(g)]


def grid_mean(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, grid)`` over the last two axes, as ``[..., grid * grid]``
    (row-major cells): a reshape and a mean when the grid divides the map, else a mean
    per slice, both with exact ExecuTorch gradients."""
    *lead, h, w = x.shape
    if h % grid == 0 and w % grid == 0:
        cells = x.reshape(*lead, grid, h // grid, grid, w // grid).mean(dim=(-3, -1))
        return cells.reshape(*lead, grid * grid)
    return torch.stack([x[..., a:b, c:d].mean(dim=(-2, -1)) for a, b in _cells(h, grid)
                        for c, d in _cells(w, grid)], dim=-1)


class GlobalAvgPool(nn.Module):
    """``AdaptiveAvgPool2d(grid)`` + flatten, written with ``mean`` (exact ExecuTorch
    backward). ``grid=1`` is global average pooling."""

    def __init__(self, grid: int = 1):
        super().__init__()
        self.grid = grid

    def forward(self, x):
        if self.grid == 1:
            return x.mean(dim=(2, 3))
        return grid_mean(x, self.grid).flatten(1)

    def extra_repr(self) -> str:
        return f"grid={self.grid}"


@dataclass(frozen=True)
class ExitHeadConfig:
    """Shape of the early-exit head. ``channels=0`` drops the conv (pool + linear only);
    ``pool``: the side of the grid the head averages to before its linear layer."""

    channels: int = 64
    kernel: int = 3
    stride: int = 1
    pool: int = 2

    def __post_init__(self) -> None:
        if self.channels < 0:
            raise HiertrainError(f"exit head channels must be >= 0, got {self.channels}")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise HiertrainError(f"exit head kernel must be odd and >= 1, got {self.kernel}")
        if self.stride < 1:
            raise HiertrainError(f"exit head stride must be >= 1, got {self.stride}")
        if self.pool < 1:
            raise HiertrainError(f"exit head pool must be >= 1, got {self.pool}")

    def check_fits(self, cut_hw: tuple[int, int]) -> None:
        """Refuses a grid larger than the map the pooling sees for a cut activation of
        ``cut_hw`` (its cells would repeat pixels)."""
        h, w = cut_hw if self.channels == 0 else ((d - 1) // self.stride + 1 for d in cut_hw)
        if self.pool > min(h, w):
            raise HiertrainError(
                f"exit head pool {self.pool} is larger than the exit's {h}x{w} feature map "
                f"(cut {cut_hw[0]}x{cut_hw[1]}, exit stride {self.stride}): choose a pool of at "
                f"most {min(h, w)} (--exit-pool)")

    def to_dict(self) -> dict:
        # pool 1 is left out: such manifests stay readable by runtimes older than the field
        d = asdict(self)
        if d["pool"] == 1:
            del d["pool"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ExitHeadConfig:
        """A manifest's head; one without ``pool`` predates it: global pooling."""
        return cls(**{"pool": 1, **d})


def build_exit_head(in_channels: int, num_classes: int, cfg: ExitHeadConfig) -> nn.Sequential:
    cells = cfg.pool * cfg.pool
    if cfg.channels == 0:
        return nn.Sequential(GlobalAvgPool(cfg.pool), nn.Linear(in_channels * cells, num_classes))
    return nn.Sequential(
        nn.Conv2d(
            in_channels, cfg.channels, cfg.kernel, stride=cfg.stride,
            padding=cfg.kernel // 2, bias=False,
        ),
        nn.BatchNorm2d(cfg.channels),
        nn.ReLU(inplace=True),
        GlobalAvgPool(cfg.pool),
        nn.Linear(cfg.channels * cells, num_classes),
    )
