"""Classic split learning in the cloud (``--mode split``), the baseline ht is measured against.

Per activation batch: the (dequantized) activation becomes a leaf that
requires a gradient, the cloud segment runs forward and backward, SGD steps
with the manifest's settings, and the gradient of the loss with respect to
the activation goes back to that edge on ``hiertrain/<run>/<device>/grad`` as
a ``toolkit.core.protocol.wire`` message with the activation's ``seq`` (raw float32 by
default, as classic split learning sends it; ``--grad-bits 8``: int8,
per channel, symmetric, since gradients are signed). The edge waits for it
before its own backward pass and next batch.

Everything else is ht's: ingest, de-duplication (the ledger still trains each
batch once, and a duplicate gets no second gradient), checkpoints, the done
rule, and the full-model evaluation with the weights each edge publishes at its
epoch ends. No exit head is trained, so exit accuracy is None.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from cloud_trainer.ingest import Ingest
from cloud_trainer.outbox import Outbox
from cloud_trainer.trainer import CloudRun
from toolkit.core.protocol import topics
from toolkit.core.protocol.codec import BatchMeta, Codec, DecodedBatch, parse_codec
from toolkit.core.protocol.quant import QuantScheme

GRAD_SCHEME = QuantScheme(bits=8, granularity="per_channel", symmetric=True, channel_axis=1)


class SplitCloudRun(CloudRun):
    mode = "split"
    trains_exit = False

    def _loop(self, ingest: Ingest, outbox: Outbox, stop: threading.Event | None) -> str:
        self.outbox = outbox  # gradients go out through the status outbox, in order
        return super()._loop(ingest, outbox, stop)

    def _grad_codec(self) -> Codec:
        return parse_codec("float32" if self.cfg.grad_bits == 32 else "int8")

    def _train_step(self, b: DecodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        x = b.tensor.detach().requires_grad_(True)
        with self.model_lock:
            logits = self.cloud(x)
            loss = F.cross_entropy(logits, b.labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        assert x.grad is not None
        payload = self._grad_codec().encode(x.grad, None, BatchMeta(
            self.run_id, b.device_id, b.seq, b.epoch, b.batch_index), base=GRAD_SCHEME)
        self.outbox.post(topics.grad_topic(self.run_id, b.device_id), payload)
        self.bytes_down[b.device_id] = self.bytes_down.get(b.device_id, 0) + len(payload)
        return loss, logits
