"""The interface between the cloud's training loop and a mode, with ht's answers as defaults.

Composition instead of subclassing the loop: the loop (``cloud_trainer.loop``) owns
ingest, the ledger, checkpoints, acks, evaluation and the done rule for every mode,
and asks its :class:`ModeStrategy` only what a mode changes -- the per-sample shape
of the batches on the wire, how a batch becomes the model's input, which module
trains, what goes back to the edge, what the checkpoint adds, and which edge weights
an evaluation uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cloud_trainer.device import Placement
from cloud_trainer.ingest import StatusItem
from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.models.edge_program import EdgeTrainStep
from toolkit.core.protocol.codec import DecodedBatch

Reply = tuple[str, bytes]
"""A message for an edge: (topic, payload)."""
EdgeState = tuple[dict[str, Any], str, int | None]
"""Edge weights for an evaluation: (state dict, source name, edge epoch)."""


@dataclass
class ModeContext:
    """What a strategy may use, handed over once by the loop before anything trains."""

    run_id: str
    manifest: Manifest
    cloud: nn.Module
    """The cloud segment, in train mode."""
    step: EdgeTrainStep
    """The host copy of the edge (segment + exit head)."""


class ModeStrategy:
    """``--mode ht``: train the cloud segment on the edges' activations; nothing goes back.

    Subclasses override what their mode changes. Methods named ``*_locked`` run under
    the loop's model lock (the inference thread shares the models).
    """

    name = "ht"
    trains_exit = True
    """False: the mode trains no exit head, so exit accuracy is reported as None."""
    uses_edge_weights = True
    """False: the edge segment trains here; weights the edges publish are ignored."""

    def bind(self, ctx: ModeContext) -> nn.Module:
        """Take the run's models; return the module the optimizer trains and batches run through.

        Called once, before the optimizer exists and before a checkpoint is loaded.
        """
        self.ctx = ctx
        return ctx.cloud

    def wire_shape(self, manifest: Manifest) -> tuple[int, ...]:
        """Per-sample shape of the training batches the edges send: the cut activation."""
        return manifest.cut_shape

    def inputs(self, batch: DecodedBatch, place: Placement) -> torch.Tensor:
        """The model input of one received batch, on ``place``'s device; ValueError if it
        cannot be one (a failed step, counted, not a crash)."""
        return place.activation(batch)

    def after_step_locked(self) -> None:
        """After the optimizer step, still under the model lock."""

    def replies(self, batch: DecodedBatch, inputs: torch.Tensor) -> list[Reply]:
        """What goes back to the edge after a step on ``batch`` (its byte count is
        ``bytes_down``)."""
        return []

    def extra_state_locked(self) -> dict[str, Any]:
        """What the mode adds to the checkpoint."""
        return {}

    def load_extra_state(self, ckpt: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state_locked` saved."""

    def own_edge_state(self) -> EdgeState | None:
        """Edge weights trained here, for evaluations (None: the edges' published ones)."""
        return None

    def evaluate_on_status(self, item: StatusItem) -> bool:
        """True: this edge status calls for an evaluation (trigger ``epoch``)."""
        return False
