"""The ``cloud`` baseline (``--mode cloud``): the edges upload raw images, the cloud trains it all.

The edges send their training images losslessly (``toolkit.core.protocol.images``) on the
``act`` topic, so ingest, de-duplication, checkpoints and the done rule are
ht's, only with the model's input shape in place of the cut shape. The cloud
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
import torch.nn.functional as F

from cloud_trainer.ingest import StatusItem, WeightsItem
from cloud_trainer.trainer import CloudConfig, CloudRun, make_optimizer
from toolkit.core.data.datasets import normalize
from toolkit.core.errors import WireError
from toolkit.core.models.rewrites import host_stat_layers
from toolkit.core.models.segments import FullModel
from toolkit.core.protocol.codec import DecodedBatch

SOURCE = "cloud"
"""``eval_edge_device`` of this mode's evaluations: the edge segment trained here."""


class CentralizedCloudRun(CloudRun):
    mode = "cloud"
    trains_exit = False

    def __init__(self, cfg: CloudConfig) -> None:
        self._epochs_seen: dict[str, int] = {}
        super().__init__(cfg)

    def _resume(self) -> None:
        # Runs at the end of CloudRun.__init__: the optimizer must cover the edge
        # segment too before a checkpoint's optimizer state is loaded into it.
        self.step.train()
        self.full = FullModel(self.step.edge, self.cloud)
        self.optimizer = make_optimizer(self.full.parameters(), self.manifest)
        self.edge_stats = [m for _, m in host_stat_layers(self.step.edge)]
        norm = self.manifest.data["model"]["normalization"]
        self.mean, self.std = norm["mean"], norm["std"]
        super()._resume()

    def _extra_state(self) -> dict[str, Any]:
        return {"edge": self.step.state_dict()}

    def _load_extra_state(self, ckpt: dict[str, Any]) -> None:
        self.step.load_state_dict(ckpt["edge"])

    def _wire_shape(self) -> tuple[int, ...]:
        return self.manifest.input_shape

    def _train_step(self, b: DecodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            x = normalize(b.images(), self.mean, self.std)
        except WireError as exc:  # counted as a failed step by train_batch
            raise ValueError(f"not an image upload: {exc}") from None
        with self.model_lock:
            logits = self.full(x)
            loss = F.cross_entropy(logits, b.labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            for layer in self.edge_stats:
                layer.update_running_stats(*layer.last_stats)
        return loss, logits

    def _edge_state(self, device: str | None) -> tuple[dict, str, int | None]:
        return self.step.state_dict(), SOURCE, None  # the edge segment trained here

    def latest_weights_device(self) -> str | None:
        return None

    def on_weights(self, item: WeightsItem) -> None:
        """No edge weights exist in this mode; ignore any (the mode check refuses such edges)."""

    def on_status(self, item: StatusItem) -> None:
        super().on_status(item)
        st = item.status
        if st.state == "training" and self._epochs_seen.get(item.device, -1) < st.epoch:
            self._epochs_seen[item.device] = st.epoch
            self.evaluate(None, "epoch")  # ht evaluates when an epoch's weights arrive
