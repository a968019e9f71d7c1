"""The ``cloud`` baseline (``--mode cloud``): the edges upload raw images, the cloud trains it all.

The edges send their training images losslessly (``toolkit.core.protocol.images``) on the
``act`` topic, so ingest, de-duplication, checkpoints and the done rule are the
loop's, only with the model's input shape in place of the cut shape. The cloud
normalises each batch with the manifest's mean and std (the edge would have
fed its model exactly that) and trains the whole network, ``FullModel(edge
segment from edge_init.pt, cloud segment from cloud_init.pt)``, with the
manifest's optimizer; BatchNorm running statistics of the edge segment are
updated as the edge runtime updates them. The edge part is checkpointed with
the rest. Evaluation scores that full model after each edge epoch and at the
end; no exit head is trained, so exit accuracy is None. Nothing is sent to the
edges but the cloud's status.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cloud_trainer.device import Placement
from cloud_trainer.ingest import StatusItem
from cloud_trainer.modes.base import EdgeState, ModeContext, ModeStrategy
from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.data.datasets import normalize
from toolkit.core.errors import WireError
from toolkit.core.models.rewrites import host_stat_layers
from toolkit.core.models.segments import FullModel
from toolkit.core.protocol.codec import DecodedBatch

SOURCE = "cloud"
"""``eval_edge_device`` of this mode's evaluations: the edge segment trained here."""


class UploadMode(ModeStrategy):
    name = "cloud"
    trains_exit = False
    uses_edge_weights = False

    def __init__(self) -> None:
        self._epochs_seen: dict[str, int] = {}

    def bind(self, ctx: ModeContext) -> nn.Module:
        """The whole network trains: the optimizer covers the edge segment too."""
        self.ctx = ctx
        ctx.step.train()
        self.edge_stats = [m for _, m in host_stat_layers(ctx.step.edge)]
        norm = ctx.manifest.data["model"]["normalization"]
        self.mean, self.std = norm["mean"], norm["std"]
        return FullModel(ctx.step.edge, ctx.cloud)

    def wire_shape(self, manifest: Manifest) -> tuple[int, ...]:
        return manifest.input_shape

    def inputs(self, batch: DecodedBatch, place: Placement) -> torch.Tensor:
        try:
            return normalize(place.put(batch.images()), self.mean, self.std)
        except WireError as exc:  # counted as a failed step by the loop
            raise ValueError(f"not an image upload: {exc}") from None

    def after_step_locked(self) -> None:
        for layer in self.edge_stats:
            layer.update_running_stats(*layer.last_stats)

    def extra_state_locked(self) -> dict[str, Any]:
        return {"edge": self.ctx.step.state_dict()}

    def load_extra_state(self, ckpt: dict[str, Any]) -> None:
        self.ctx.step.load_state_dict(ckpt["edge"])

    def own_edge_state(self) -> EdgeState:
        return self.ctx.step.state_dict(), SOURCE, None  # the edge segment trained here

    def evaluate_on_status(self, item: StatusItem) -> bool:
        """After each edge epoch, as ht evaluates when an epoch's weights arrive."""
        st = item.status
        if st.state == "training" and self._epochs_seen.get(item.device, -1) < st.epoch:
            self._epochs_seen[item.device] = st.epoch
            return True
        return False
