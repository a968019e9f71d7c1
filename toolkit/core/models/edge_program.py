"""The modules that become the board's programs, shared by export and the eager backend.

``EdgeTrainStep`` is what ``edge_train.pte`` computes; the edge runtime's
``torch`` backend runs the very same module eagerly, so both backends are one
function by construction and the parity tests compare like with like.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core.models.rewrites import host_stat_layers


class EdgeTrainStep(nn.Module):
    """``forward(x, y) -> (loss, cut, exit_logits, *bn_means, *bn_vars)``.

    The loss comes first (ExecuTorch's training module requires it); the cut
    activation and logits are detached, so no gradient path leaves the edge.
    """

    def __init__(self, edge: nn.Module, exit_head: nn.Module):
        super().__init__()
        self.edge = edge
        self.exit = exit_head

    def stat_layers(self):
        return host_stat_layers(self)

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        cut = self.edge(x)
        logits = self.exit(cut)
        loss = F.cross_entropy(logits, y)
        layers = self.stat_layers()
        means = [m.last_stats[0] for _, m in layers]
        variances = [m.last_stats[1] for _, m in layers]
        return (loss, cut.detach(), logits.detach(), *means, *variances)

    @torch.no_grad()
    def apply_stats(self, extra_outputs) -> None:
        """Fold the batch statistics a step returned into the running statistics."""
        layers = self.stat_layers()
        n = len(layers)
        if len(extra_outputs) != 2 * n:
            raise ValueError(f"expected {2 * n} statistics outputs, got {len(extra_outputs)}")
        for i, (_, layer) in enumerate(layers):
            layer.update_running_stats(extra_outputs[i], extra_outputs[n + i])


class ChannelMajorTrainStep(EdgeTrainStep):
    """``EdgeTrainStep`` whose segment runs on ``[C, N, H, W]`` tensors (same outputs).

    What ``toolkit.build.lowering`` lowers with ``--lowering matmul`` when every module
    has a channel-major form (``toolkit.build.fastconv.to_channel_major``): the input is
    transposed once and the cut once, instead of around every convolution and
    BatchNorm. Same parameters under the same names as the step it was made from.
    """

    def forward(self, x: torch.Tensor, y: torch.Tensor):
        cut = self.edge(x.permute(1, 0, 2, 3).contiguous())
        logits = self.exit(cut)
        loss = F.cross_entropy(logits, y)
        layers = self.stat_layers()
        means = [m.last_stats[0] for _, m in layers]
        variances = [m.last_stats[1] for _, m in layers]
        return (loss, cut.detach().permute(1, 0, 2, 3).contiguous(), logits.detach(),
                *means, *variances)


class EdgeInfer(nn.Module):
    """``forward(x) -> (cut, exit_logits)`` in eval mode (running statistics)."""

    def __init__(self, edge: nn.Module, exit_head: nn.Module):
        super().__init__()
        self.edge = edge
        self.exit = exit_head

    def forward(self, x: torch.Tensor):
        cut = self.edge(x)
        return cut, self.exit(cut)
