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

from typing import Any

import torch

from cloud_trainer.modes.base import ModeStrategy, Reply
from toolkit.core.protocol import topics
from toolkit.core.protocol.quant import QuantScheme, quantize
from toolkit.core.protocol.wire import ActivationBatch, encode

GRAD_SCHEME = QuantScheme(bits=8, granularity="per_channel", symmetric=True, channel_axis=1)


class SplitMode(ModeStrategy):
    name = "split"
    trains_exit = False

    def __init__(self, grad_bits: int = 32) -> None:
        self.grad_bits = grad_bits

    def _grad_form(self, grad: torch.Tensor) -> dict[str, Any]:
        if self.grad_bits == 32:
            return {"raw": grad}
        return {"quantized": quantize(grad, GRAD_SCHEME)}

    def inputs(self, batch: ActivationBatch) -> torch.Tensor:
        return batch.dequantized().requires_grad_(True)

    def replies(self, batch: ActivationBatch, inputs: torch.Tensor) -> list[Reply]:
        """The gradient of the loss with respect to the activation, to its edge."""
        assert inputs.grad is not None
        payload = encode(ActivationBatch(
            run_id=self.ctx.run_id, device_id=batch.device_id, seq=batch.seq, epoch=batch.epoch,
            batch_index=batch.batch_index, **self._grad_form(inputs.grad)))
        return [(topics.grad_topic(self.ctx.run_id, batch.device_id), payload)]
