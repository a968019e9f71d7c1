"""Classic split learning on the edge (``--mode split``), the baseline ht is measured against.

Per batch, strictly one after the other: forward the edge segment (no exit
head) with autograd; publish the cut activation and labels exactly as ht does
(the manifest's codec, ``toolkit.core.protocol.quant`` + ``toolkit.core.protocol.wire``; raw
float32 with
``float_act``); wait for the cloud trainer's gradient of that activation on
``hiertrain/<run>/<device>/grad`` (same ``seq``); backpropagate it through the
edge segment and take an SGD step with the manifest's settings (the ht torch
backend's optimizer). The edge idles while the activation goes up, the cloud
steps and the gradient comes down: that round trip per batch is what ht
removes.

The edge runs on the eager torch backend: the exported ExecuTorch program
differentiates the exit head's loss and has no input for an outside gradient.

Before the first batch the edge waits for the cloud trainer's status to say
it is live and in split mode (a gradient from nobody would only time out),
and while waiting for a gradient it fails at once if the cloud trainer says
it went offline, failed or finished. Every wait is bounded by
``cfg.grad_timeout``; a wait that runs out, or a cloud trainer that stops, ends the
run short: ``RunIncompleteError`` (exit code 5).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any

import torch

from edge_runtime.backends import TorchBackend
from edge_runtime.config import TrainConfig
from edge_runtime.progress import progress_bar
from edge_runtime.publisher import Publisher
from edge_runtime.session import (
    flush_outbox,
    lr_schedule,
    publish_done,
    publish_epoch_weights,
    schedule_extra,
    weights_path,
)
from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.data.source import TrainingData
from toolkit.core.errors import HiertrainError, RunIncompleteError, WireError
from toolkit.core.models.rewrites import host_stat_layers
from toolkit.core.protocol.codec import BatchMeta, Codec, DecodedBatch, decode, parse_codec
from toolkit.core.protocol.messages import CLOUD_DEVICE, Status, decode_status
from toolkit.core.protocol.modes import mismatch
from toolkit.core.protocol.quant import QuantScheme
from toolkit.core.protocol.topics import act_topic, grad_topic, status_topic
from toolkit.core.transport import Link

log = logging.getLogger("edge_runtime")

MODE = "split"
LIVE_STATES = ("online", "training")
_POLL_S = 0.2


class GradInbox:
    """Gradients for this device and the cloud trainer's status, from paho's thread.

    Handlers only decode and enqueue; :meth:`wait_for_cloud` and :meth:`wait`
    run on the training thread.
    """

    def __init__(self, link: Link, run: str, device: str, grad_shape: tuple[int, ...]) -> None:
        self.run, self.device, self.grad_shape = run, device, tuple(grad_shape)
        self._grads: queue.Queue[DecodedBatch | WireError] = queue.Queue()
        self._cond = threading.Condition()
        self._cloud: Status | None = None
        self.bad = 0  # gradient messages that did not decode
        link.subscribe(grad_topic(run, device), self._on_grad)
        link.subscribe(status_topic(run, CLOUD_DEVICE), self._on_cloud_status)

    def _on_grad(self, topic: str, payload: bytes, props: dict[str, Any]) -> None:
        try:
            self._grads.put(decode(payload, expected_run_id=self.run))
        except WireError as exc:
            self._grads.put(exc)

    def _on_cloud_status(self, topic: str, payload: bytes, props: dict[str, Any]) -> None:
        if not payload:
            return  # a cleared retained status
        try:
            st = decode_status(payload)
        except WireError as exc:
            log.warning("ignoring a malformed cloud status: %s", exc)
            return
        with self._cond:
            self._cloud = st
            self._cond.notify_all()

    def _check_cloud(self, st: Status | None, *, live_required: bool) -> bool:
        """True when ``st`` is a live split-mode cloud; raises on a live cloud of another mode
        and (``live_required=False``, i.e. mid-run) on a cloud that stopped."""
        if st is None:
            return False
        if st.state in LIVE_STATES:
            mode = st.extra.get("mode", "ht")
            if mode != MODE:
                raise HiertrainError(mismatch(self.device, MODE, str(mode)))
            return True
        if not live_required:
            why = f": {st.message}" if st.message else ""
            raise RunIncompleteError(f"the cloud trainer of run {self.run!r} is {st.state}{why}; "
                                 "split learning needs it for every batch")
        return False

    def wait_for_cloud(self, timeout: float) -> None:
        """Block until a live split-mode cloud trainer announced itself (bounded)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._check_cloud(self._cloud, live_required=True):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RunIncompleteError(
                        f"no live cloud trainer for run {self.run!r} within {timeout:g} s; "
                        "start 'cloud-trainer --mode split' with the same --run-id and broker"
                    )
                self._cond.wait(min(left, _POLL_S))

    def wait(self, seq: int, timeout: float) -> torch.Tensor:
        """The gradient for ``seq`` (float32, cut shape); stale duplicates are skipped."""
        deadline = time.monotonic() + timeout
        while True:
            with self._cond:
                self._check_cloud(self._cloud, live_required=False)
            left = deadline - time.monotonic()
            if left <= 0:
                raise RunIncompleteError(
                    f"no gradient for batch {seq} from the cloud trainer of run {self.run!r} "
                    f"within {timeout:g} s; check that it runs --mode split and is not "
                    "overloaded, or raise --grad-timeout"
                )
            try:
                item = self._grads.get(timeout=min(left, _POLL_S))
            except queue.Empty:
                continue
            if isinstance(item, WireError):
                self.bad += 1
                log.warning("dropped a malformed gradient message (%s): %s", item.reason, item)
                continue
            if item.device_id != self.device or item.seq < seq:
                continue  # not ours, or a redelivered gradient of an earlier batch
            if item.seq > seq:
                raise HiertrainError(f"the cloud sent the gradient of batch {item.seq} while "
                                     f"batch {seq} was waiting: the run ids of two edges clash")
            grad = item.tensor
            if tuple(grad.shape) != self.grad_shape:
                raise HiertrainError(f"the gradient of batch {seq} has shape {list(grad.shape)}, "
                                     f"the cut activation {list(self.grad_shape)}")
            return grad


def split_loop(cfg: TrainConfig, manifest: Manifest, codec: Codec, scheme: QuantScheme,
               ds: TrainingData, backend: TorchBackend, link: Link, run: str, device: str
               ) -> dict[str, Any]:
    """Train ``cfg.epochs`` epochs of split learning; returns the edge report.

    The activation goes up in ``codec`` (the same one ht would use, so the
    comparison is about the protocol, not the compression), or raw float32
    with ``--float-act``.
    """
    bs = manifest.batch_size
    per_epoch = len(ds) // bs
    schedule = lr_schedule(cfg, len(ds), bs)
    edge = backend.module.edge
    stat_layers = [m for _, m in host_stat_layers(edge)]
    act_codec = parse_codec("float32") if cfg.float_act else codec
    inbox = GradInbox(link, run, device, (bs, *manifest.cut_shape))
    t_wait = time.monotonic()
    inbox.wait_for_cloud(cfg.grad_timeout)
    log.info("cloud trainer is live (waited %.1f s); split learning starts",
             time.monotonic() - t_wait)

    topic = act_topic(run, device)
    seq = samples = 0
    train_s = grad_wait_s = 0.0
    history: list[dict[str, Any]] = []
    publisher = Publisher(link, maxsize=cfg.outbox)
    start = time.monotonic()
    try:
        last_batch_unix: float | None = None
        for epoch in range(cfg.epochs):
            t_epoch = time.monotonic()
            epoch_wait = 0.0
            bar = progress_bar(cfg.quiet, total=per_epoch,
                               desc=f"{device} split {epoch + 1}/{cfg.epochs}", unit="batch",
                               leave=True)
            with bar:
                for i, (x, y) in enumerate(ds.batches(bs, epoch=epoch, seed=cfg.seed)):
                    x, y = backend.check_batch(x, y)
                    t = time.monotonic()
                    backend.optimizer.zero_grad(set_to_none=True)
                    backend.set_lr_factor(schedule.factor(epoch, i))
                    cut = edge(x)
                    act = cut.detach()
                    publisher.submit(topic, act_codec.encode(
                        act, y, BatchMeta(run, device, seq, epoch, i), base=scheme), kind="act")
                    t_sent = time.monotonic()
                    grad = inbox.wait(seq, cfg.grad_timeout)
                    t_got = time.monotonic()
                    cut.backward(grad)
                    backend.optimizer.step()
                    for layer in stat_layers:  # BN running statistics, as the ht backends do
                        layer.update_running_stats(*layer.last_stats)
                    train_s += (t_sent - t) + (time.monotonic() - t_got)
                    grad_wait_s += t_got - t_sent
                    epoch_wait += t_got - t_sent
                    seq += 1
                    samples += len(y)
                    last_batch_unix = time.time()  # toolkit bench: end of training
                    bar.update(1)
            history.append({"epoch": epoch, "batches": per_epoch,
                            "grad_wait_s": round(epoch_wait, 3),
                            "seconds": round(time.monotonic() - t_epoch, 3)})
            publish_epoch_weights(publisher, backend, run, device, epoch, seq)
            publisher.submit(status_topic(run, device), Status(
                role="edge", device=device, run=run, state="training", epoch=epoch,
                batches_published=seq, samples_published=samples, last_seq=seq - 1,
                extra={"mode": MODE, **schedule_extra(schedule)}).encode(), retain=True,
                kind="status")
            log.info("epoch %d/%d: %d batches, %.1f s waiting for gradients", epoch + 1,
                     cfg.epochs, per_epoch, epoch_wait)
        flush_outbox(publisher, link)
    finally:
        publisher.close()
    wall_s = time.monotonic() - start
    stats = publisher.stats
    act = stats.by_kind.get("act")
    act_bytes = act.bytes if act else 0
    path = weights_path(cfg.state_dir, device)
    torch.save(backend.state_dict(), path)
    publish_done(link, run, device, epochs=cfg.epochs, seq=seq, samples=samples,
                 exit_accuracy=None, extra={
                     "mode": MODE, "wall_s": round(wall_s, 3), "bytes_sent": link.bytes_sent,
                     "grad_wait_s": round(grad_wait_s, 3), "train_s": round(train_s, 3),
                     "backend": backend.name, "epochs": cfg.epochs,
                     **schedule_extra(schedule)})
    return {
        "device": device,
        "run": run,
        "epochs": cfg.epochs,
        "batches_published": seq,
        "samples_published": samples,
        "exit_accuracy": None,  # no exit head is trained in split learning
        "bytes_sent": link.bytes_sent,
        "act_bytes_sent": act_bytes,
        "act_codec": act_codec.name,
        "codec": act_codec.name,
        "payload_bytes_per_sample": act_bytes / max(samples, 1),
        "float32_bytes_per_sample": manifest.data["cut"]["float32_bytes_per_sample"],
        "malformed_grads": inbox.bad,
        "wall_s": wall_s,
        "last_batch_unix": last_batch_unix,
        "train_s": train_s,
        "grad_wait_s": grad_wait_s,
        "publish_wait_s": stats.publish_wait_s,
        "batches_per_s": seq / max(wall_s, 1e-9),
        "backend": backend.name,
        "weights_path": str(path),
        "history": history,
        **schedule_extra(schedule),
    }
