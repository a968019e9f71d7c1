"""Classic split learning in the cloud (``--mode split``), the baseline ht is measured against.

Per activation batch: the (dequantized) activation becomes a leaf that
requires a gradient, the cloud segment runs forward and backward, SGD steps
with the manifest's settings, and the gradient of the loss with respect to
the activation goes back to that edge on ``hiertrain/<run>/<device>/grad`` as
a ``toolkit.core.protocol.wire`` message with the activation's ``seq`` (raw float32 by
default, as classic split learning sends it; ``--grad-bits 8``: int8,
per channel, symmetric, since gradients are signed). The edge waits for it
before its own backward pass and next batch.

Everything else is the loop's, as in ht: ingest, de-duplication (the ledger still
trains each batch once, and a duplicate gets no second gradient), checkpoints, the
done rule, and the full-model evaluation with the weights each edge publishes at its
epoch ends. No exit head is trained, so exit accuracy is None.
"""

from __future__ import annotations

import torch

from cloud_trainer.device import Placement
from cloud_trainer.modes.base import ModeStrategy, Reply
from toolkit.core.protocol import topics
from toolkit.core.protocol.codec import BatchMeta, Codec, DecodedBatch, parse_codec
from toolkit.core.protocol.quant import QuantScheme

GRAD_SCHEME = QuantScheme(bits=8, granularity="per_channel", symmetric=True, channel_axis=1)


class SplitMode(ModeStrategy):
    name = "split"
    trains_exit = False

    def __init__(self, grad_bits: int = 32) -> None:
        self.grad_bits = grad_bits

    def _grad_codec(self) -> Codec:
        return parse_codec("float32" if self.grad_bits == 32 else "int8")

    def inputs(self, batch: DecodedBatch, place: Placement) -> torch.Tensor:
        return place.activation(batch).detach().requires_grad_(True)

    def replies(self, batch: DecodedBatch, inputs: torch.Tensor) -> list[Reply]:
        """The gradient of the loss with respect to the activation, to its edge."""
        assert inputs.grad is not None
        payload = self._grad_codec().encode(inputs.grad.float().cpu(), None, BatchMeta(
            self.ctx.run_id, batch.device_id, batch.seq, batch.epoch, batch.batch_index),
            base=GRAD_SCHEME)
        return [(topics.grad_topic(self.ctx.run_id, batch.device_id), payload)]
