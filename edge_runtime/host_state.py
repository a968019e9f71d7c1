"""The edge state an ExecuTorch training program does not hold, kept from the manifest alone.

A board runs no eager model: the exported program owns the trainable parameters,
and what is left on the host is bookkeeping, the BatchNorm running statistics
(the program returns each batch's statistics as extra outputs, see
``toolkit.core.models.rewrites.HostStatsBatchNorm2d``) and the keys and shapes of
the edge's state dict. Both come from the artifacts (``edge_init.pt`` and the
manifest's ``host_stats``), never from building the network in PyTorch. That keeps
the board's process small and off torch's own CPU kernels: on a Cortex-A72 (the
Raspberry Pi 4, ARMv8.0) the package index's torch dies with SIGILL in its matrix
kernels, while the program's kernels and the few element-wise updates here run fine
(docs/deploy.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.artifacts.safeload import load_weights
from toolkit.core.errors import HiertrainError, ManifestError

EDGE_INIT = "edge_init.pt"


def initial_state(manifest: Manifest) -> dict[str, torch.Tensor]:
    """The exported initial edge state (``edge_init.pt``): parameters and buffers, the
    keys and shapes every edge state of these artifacts must have."""
    state = load_weights(manifest.path(EDGE_INIT), "artifact", error=ManifestError)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise ManifestError(f"{manifest.path(EDGE_INIT)} is not a state dict of tensors")
    return state


def check_state(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                what: str) -> None:
    """``state`` must have ``reference``'s keys and shapes; one line naming the first
    difference otherwise (what ``nn.Module.load_state_dict`` would refuse)."""
    missing = [k for k in reference if k not in state]
    unexpected = [k for k in state if k not in reference]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:3])}"
                         f"{' ...' if len(unexpected) > 3 else ''}")
        raise HiertrainError(f"{what} does not fit the edge model in the manifest: "
                             + "; ".join(parts))
    for k, ref in reference.items():
        got = state[k]
        if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(ref.shape):
            shape = list(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
            raise HiertrainError(
                f"{what} does not fit the edge model in the manifest: {k} has shape {shape}, "
                f"the model's is {list(ref.shape)}"
            )


@dataclass(frozen=True)
class StatLayer:
    """One BatchNorm whose running statistics the host keeps (a manifest ``host_stats`` entry)."""

    module: str
    channels: int
    momentum: float


class HostStats:
    """BatchNorm running statistics of the edge, updated from a training program's outputs.

    The update is ``nn.BatchNorm2d``'s (``running = (1 - m) * running + m * batch``, and
    ``num_batches_tracked += 1``), written with the same in-place operations as
    ``HostStatsBatchNorm2d.update_running_stats`` so that the ExecuTorch and the eager
    backends keep bit-identical statistics.
    """

    def __init__(self, layers: Sequence[StatLayer], state: Mapping[str, torch.Tensor]):
        """``state`` holds the statistics tensors, which :meth:`apply` updates in place."""
        self.layers = list(layers)
        self.state = state
        for layer in self.layers:
            for suffix in ("running_mean", "running_var", "num_batches_tracked"):
                if f"{layer.module}.{suffix}" not in state:
                    raise ManifestError(f"the edge state has no {layer.module}.{suffix} for "
                                        f"host_stats entry {layer.module!r}; the artifacts "
                                        "are inconsistent")

    @classmethod
    def from_manifest(cls, manifest: Manifest, state: Mapping[str, torch.Tensor]) -> HostStats:
        entries = manifest.data.get("host_stats")
        if entries is None:
            raise ManifestError(f"{manifest.root}: the manifest has no host_stats list; "
                                "re-export the artifacts with this version of hiertrain")
        layers = [StatLayer(module=e["module"], channels=int(e["channels"]),
                            momentum=float(e["momentum"])) for e in entries]
        return cls(layers, state)

    @torch.no_grad()
    def apply(self, extra_outputs: Sequence[torch.Tensor]) -> None:
        """Fold one step's statistics outputs (all means, then all variances) in."""
        n = len(self.layers)
        if len(extra_outputs) != 2 * n:
            raise HiertrainError(f"the training program returned {len(extra_outputs)} "
                                 f"statistics outputs; the manifest lists {n} BatchNorm layers")
        for i, layer in enumerate(self.layers):
            m = layer.momentum
            self.state[f"{layer.module}.running_mean"].mul_(1 - m).add_(extra_outputs[i],
                                                                        alpha=m)
            self.state[f"{layer.module}.running_var"].mul_(1 - m).add_(extra_outputs[n + i],
                                                                       alpha=m)
            self.state[f"{layer.module}.num_batches_tracked"].add_(1)
