"""Decoders that rebuild an image from a cut, and the edge step that trains against one.

Two users, one decoder family:

* the *proxy attacker* inside the adversarial edge program (``--privacy
  adversarial``): small, trained on the board together with the edge, which
  receives its reconstruction gradient reversed (:func:`reverse_gradient`);
* the *measurement attacker* of ``toolkit.privacy.attack``: wider, trained off
  the board on public images to score what a cut reveals.

Every op here differentiates exactly under ExecuTorch 1.5.1: 3x3 convolutions,
ReLU, and nearest-neighbour upsampling written as ``expand`` + ``reshape`` (its
backward is a sum), not ``nn.Upsample`` or a transposed convolution, whose
backward kernels no parity test here has held.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core.errors import HiertrainError
from toolkit.core.models.edge_program import EdgeTrainStep


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x upsampling as ``expand`` + ``reshape`` (exact backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        return x[:, :, :, None, :, None].expand(n, c, h, 2, w, 2).reshape(n, c, 2 * h, 2 * w)


def _conv(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, padding=1)


def upsampling_steps(cut_hw: tuple[int, int], image_hw: tuple[int, int]) -> int:
    """How many 2x steps take the cut's size to the image's; refuses other ratios."""
    (h, w), (H, W) = cut_hw, image_hw
    steps = 0
    while (h << steps) < H:
        steps += 1
    if (h << steps, w << steps) != (H, W):
        raise HiertrainError(
            f"a decoder cannot rebuild a {H}x{W} image from a {h}x{w} cut: the image must be "
            "the cut's size times a power of two"
        )
    return steps


class Decoder(nn.Module):
    """``[N, C, h, w] -> [N, channels, H, W]``: a conv, then (2x up + conv) per octave."""

    def __init__(self, cut_shape: tuple[int, int, int], image_shape: tuple[int, int, int],
                 width: int = 32, depth: int = 1) -> None:
        super().__init__()
        c = cut_shape[0]
        steps = upsampling_steps(tuple(cut_shape[1:]), tuple(image_shape[1:]))
        layers: list[nn.Module] = [_conv(c, width), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [_conv(width, width), nn.ReLU()]
        for _ in range(steps):
            layers += [Upsample2x(), _conv(width, width), nn.ReLU()]
        layers.append(_conv(width, image_shape[0]))
        self.body = nn.Sequential(*layers)

    def forward(self, cut: torch.Tensor) -> torch.Tensor:
        return self.body(cut)


def reverse_gradient(x: torch.Tensor, weight: float) -> torch.Tensor:
    """Identity forward, gradient times ``-weight`` backward (a gradient-reversal layer).

    Written with ``detach`` so that torch.export sees plain ops: ``x - x.detach()``
    is exactly zero forward and passes the gradient unchanged backward.
    """
    return x.detach() + (x - x.detach()) * (-weight)


class AdversarialTrainStep(EdgeTrainStep):
    """``EdgeTrainStep`` that also trains ``proxy`` to rebuild the input from the cut.

    The program minimises ``exit loss + reconstruction MSE``: the proxy decoder
    learns to invert the cut, while the edge, behind :func:`reverse_gradient`,
    descends ``exit loss - weight * MSE`` and so makes the cut harder to invert.
    The returned loss is that sum (what the program's gradients are of); the
    outputs are otherwise those of ``EdgeTrainStep``.
    """

    def __init__(self, edge: nn.Sequential, exit_head: nn.Module, proxy: Decoder,
                 weight: float) -> None:
        super().__init__(edge, exit_head)
        self.proxy = proxy
        self.weight = float(weight)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        cut = self.edge(x)
        logits = self.exit(cut)
        rebuilt = self.proxy(reverse_gradient(cut, self.weight))
        loss = F.cross_entropy(logits, y) + F.mse_loss(rebuilt, x)
        layers = self.stat_layers()
        means = [m.last_stats[0] for _, m in layers]
        variances = [m.last_stats[1] for _, m in layers]
        return (loss, cut.detach(), logits.detach(), *means, *variances)
