"""The cloud trainer: trains the cloud segment on the edges' int8 cut activations.

Threads, and why:

* paho's network thread runs the :class:`~cloud_trainer.ingest.Ingest`
  handlers, which only check and enqueue (bounded queue, blocking put:
  back-pressure instead of unbounded memory);
* the **main thread** runs the training loop: it drains the queue, steps SGD,
  evaluates when edge weights arrive, checkpoints, and decides when the run is
  done;
* an :class:`~cloud_trainer.outbox.Outbox` thread publishes status, so the
  loop never waits for a PUBACK that paho's (possibly blocked) thread would
  have to read;
* an :class:`~cloud_trainer.infer.InferenceServer` thread answers
  hierarchical inference requests with the live cloud segment, under
  ``model_lock``.

The run is done (spec) when every expected device has status ``done`` and
the ledger holds all of its seqs ``0..batches_published-1``; or when no
message arrived for ``idle_timeout`` seconds, which is an error
(:class:`HiertrainError`, exit 2) if some device is missing or incomplete.
Either way the final model, metrics, plot and summary are written first.

Delivery (``docs/delivery.md``): the trainer subscribes with a persistent MQTT
session (stable client id per run and run directory, ``session_expiry``) so
the broker queues what edges publish while it is down, and after every
checkpoint it publishes an :class:`~toolkit.core.protocol.messages.Ack` of what is trained
*and checkpointed*; edges keep each batch in their spool until it is acked
and resend what is left when this trainer restarts or reconnects. The ledger
drops the duplicates, so at-least-once delivery trains every batch once.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import queue
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from cloud_trainer.checkpoint import (
    atomic_torch_save,
    atomic_write_bytes,
    ensure_run_dir,
    load_checkpoint,
    save_checkpoint,
)
from cloud_trainer.evaluate import Evaluator
from cloud_trainer.infer import InferenceServer
from cloud_trainer.ingest import (
    ActItem,
    DeviceRegistry,
    DropCounter,
    Ingest,
    StatusItem,
    WeightsItem,
)
from cloud_trainer.ledger import Ledger
from cloud_trainer.metrics import CURVES, MetricsLog, plot_curves
from cloud_trainer.outbox import Outbox
from toolkit.core.artifacts.manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file
from toolkit.core.errors import HiertrainError
from toolkit.core.models.segments import FullModel, load_segments
from toolkit.core.protocol import topics
from toolkit.core.protocol.codec import DecodedBatch
from toolkit.core.protocol.messages import CLOUD_DEVICE, Ack, Status
from toolkit.core.protocol.modes import DEFAULT_MODE, check_mode
from toolkit.core.security import LinkSecurity
from toolkit.core.transport import LinkShape, link_summary, open_link, shape_link

log = logging.getLogger(__name__)

SUMMARY = "cloud_summary.json"
CLOUD_FINAL = "cloud_final.pt"
FULL_MODEL = "full_model.pt"
MAX_BATCH_FACTOR = 8
"""Largest accepted activation batch, in multiples of the manifest's batch size."""
GRAD_BITS = (32, 8)


@dataclass
class CloudConfig:
    """Everything ``cloud-trainer`` (training) needs; the CLI maps flags 1:1 onto it."""

    artifacts: str | Path
    broker: str
    run_dir: str | Path
    run_id: str = "default"
    devices: int | None = None
    """Expected number of edge devices: the first N distinct ids that come online."""
    device_ids: list[str] | None = None
    """Or exactly these edge ids (takes precedence over ``devices``)."""
    eval_data: str | None = None
    """Held-out data source for ``toolkit.core.data.datasets.load_dataset`` (split "test"); None =
    digits."""
    eval_every: int | None = None
    """Also evaluate every N batches trained (edge weights arriving always trigger one)."""
    eval_limit: int | None = None
    idle_timeout: float = 120.0
    queue_size: int = 64
    checkpoint_every: int = 50
    log_every: int = 20
    """A "train" metrics line every N batches."""
    status_every: float = 5.0
    """Seconds between "training" status publishes."""
    quiet: bool = False
    connect_timeout: float = 30.0
    threads: int | None = None
    """torch intra-op threads (None: torch's default). Use 1 when the machine is shared
    with edge processes: small steps on an oversubscribed CPU run ~40x slower threaded."""
    extra_status: dict[str, Any] = field(default_factory=dict)
    link_kbps: float | None = None
    """Model a slow downlink for what the cloud publishes (toolkit.core.transport.shaping)."""
    link_latency_ms: float = 0.0
    mode: str = DEFAULT_MODE
    """ht (this method) or a baseline, split or cloud (``toolkit.core.protocol.modes``)."""
    grad_bits: int = 32
    """Split mode: gradients sent back as raw float32 (32) or int8 codes (8)."""
    security: LinkSecurity | None = None
    """Broker credentials, TLS files, and the run's HMAC key (``toolkit.core.security``): with a
    key, unsigned and badly signed messages are dropped (``unsigned``, ``bad_signature``)."""
    session_expiry: int = 3600
    """Seconds the broker keeps this trainer's MQTT session (and the batches queued for
    it) after it disconnects or dies; 0: clean sessions (``docs/delivery.md``)."""

    def check(self) -> None:
        check_mode(self.mode)
        if self.grad_bits not in GRAD_BITS:
            raise HiertrainError(f"--grad-bits must be one of {list(GRAD_BITS)}, "
                                 f"got {self.grad_bits}")
        topics.validate_id(self.run_id, "run id")
        LinkShape.from_options(self.link_kbps, self.link_latency_ms)
        if self.device_ids is not None:
            if not self.device_ids:
                raise HiertrainError("--device-ids is empty; give comma-separated device ids")
            for d in self.device_ids:
                topics.validate_id(d, "device id")
                if d == CLOUD_DEVICE:
                    raise HiertrainError(f"{CLOUD_DEVICE!r} is the cloud's own id, not an edge's")
            if len(set(self.device_ids)) != len(self.device_ids):
                raise HiertrainError(f"--device-ids lists a device twice: {self.device_ids}")
        if self.devices is not None and self.devices < 1:
            raise HiertrainError(f"--devices must be >= 1, got {self.devices}")
        for name in ("queue_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise HiertrainError(f"{name.replace('_', '-')} must be >= 1")
        if self.eval_every is not None and self.eval_every < 1:
            raise HiertrainError("--eval-every must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise HiertrainError(f"--threads must be >= 1, got {self.threads}")
        if self.session_expiry < 0:
            raise HiertrainError(f"--session-expiry must be >= 0 seconds, got "
                                 f"{self.session_expiry}")
        if not self.idle_timeout > 0:
            raise HiertrainError(f"--idle-timeout must be > 0 seconds, got {self.idle_timeout}")


def make_optimizer(params: Any, manifest: Manifest) -> torch.optim.Optimizer:
    """SGD with the edge's hyper-parameters (the manifest's ``optimizer``)."""
    opt = manifest.data["optimizer"]
    if opt.get("name", "sgd") != "sgd":
        raise HiertrainError(
            f"{manifest.path(MANIFEST_NAME)} asks for optimizer {opt['name']!r}; "
            "the cloud trainer implements sgd only"
        )
    return torch.optim.SGD(
        params, lr=opt["lr"], momentum=opt.get("momentum", 0.0),
        weight_decay=opt.get("weight_decay", 0.0), nesterov=opt.get("nesterov", False),
    )


def client_id(role: str, run_id: str) -> str:
    """Unique MQTT client id: two processes with one id would keep kicking each other off."""
    return f"hiertrain-{role}-{run_id}-{os.getpid()}-{random.getrandbits(24):06x}"


def session_client_id(run_id: str, run_dir: Path) -> str:
    """The stable client id of a persistent session: one per run and run directory, so a
    restarted trainer finds the session (and the queued batches) its predecessor left."""
    where = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
    return f"hiertrain-cloud-{run_id}-{where}"


def open_cloud_link(cfg: CloudConfig, run_dir: Path, on_reject: Any = None) -> Any:
    """The trainer's link: a persistent session on MQTT when ``session_expiry`` > 0;
    credentials, TLS and signature checks from ``cfg.security``."""
    if cfg.session_expiry > 0 and cfg.broker.strip().lower().startswith(("mqtt:", "mqtts:")):
        link = open_link(cfg.broker, session_client_id(cfg.run_id, run_dir),
                         security=cfg.security, on_reject=on_reject,
                         session_expiry=cfg.session_expiry)
    else:
        link = open_link(cfg.broker, client_id("cloud", cfg.run_id),
                         security=cfg.security, on_reject=on_reject)
    return shape_link(link, LinkShape.from_options(cfg.link_kbps, cfg.link_latency_ms))


class _Window:
    """Loss/accuracy since the last "train" metrics line."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.correct = 0
        self.samples = 0
        self.batches = 0

    def add(self, loss: float, correct: int, samples: int) -> None:
        self.loss += loss
        self.correct += correct
        self.samples += samples
        self.batches += 1

    def take(self) -> tuple[float, float] | None:
        if not self.batches:
            return None
        out = (self.loss / self.batches, self.correct / max(1, self.samples))
        self.__init__()  # type: ignore[misc]
        return out


class CloudRun:
    """One training run: build with a config (no network yet), then :meth:`run`.

    This is ``--mode ht``; the baselines subclass it (``cloud_trainer.split_learning``,
    ``cloud_trainer.centralized``) and override the hooks ``_train_step``,
    ``_wire_shape``, ``_extra_state``/``_load_extra_state`` and ``_edge_state``.
    """

    mode = "ht"
    trains_exit = True
    """False: the mode trains no exit head, so exit accuracy is reported as None."""

    def __init__(self, cfg: CloudConfig) -> None:
        cfg.check()
        self.cfg = cfg
        self.run_id = cfg.run_id
        self.run_dir = ensure_run_dir(cfg.run_dir)  # first: a bad path fails before any work
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.manifest = load_manifest(cfg.artifacts)
        self.manifest_sha = sha256_file(self.manifest.path(MANIFEST_NAME))
        built = load_segments(self.manifest)
        self.cloud = built.cloud.train()
        self.step = built.step  # host copy of the edge, only ever loaded with received weights
        self.init_edge_state = copy.deepcopy(self.step.state_dict())
        self.optimizer = make_optimizer(self.cloud.parameters(), self.manifest)
        self.model_lock = threading.Lock()
        self.evaluator = Evaluator(self.manifest, cfg.eval_data, limit=cfg.eval_limit)
        self.metrics = MetricsLog(self.run_dir)

        self.ledger = Ledger()
        self.registry = DeviceRegistry(cfg.device_ids, cfg.devices)
        self.drops = DropCounter()
        self.statuses: dict[str, Status] = {}  # latest status per edge, except "offline"
        self.offline: set[str] = set()
        self.weights: dict[str, WeightsItem] = {}
        self.failed: dict[str, int] = {}
        self.batches_trained = 0
        self.last_batch_unix: float | None = None  # wall clock of the last trained batch
        self.samples_trained = 0
        self.resumed_batches = 0
        self.window = _Window()
        self.last_eval: dict[str, Any] = {}
        self.since_checkpoint = 0
        self.bytes_down: dict[str, int] = {}  # payload bytes published to each edge
        self.instance = f"{random.getrandbits(32):08x}"  # tells edges this process restarted
        self._outbox: Outbox | None = None
        self._link: Any = None
        self._acked_connects = 0
        self._checkpointed: dict[str, Any] = {}  # the ledger's trained sets at the last checkpoint
        self._resume()

    # ------------------------------------------------------------------ resume
    def _resume(self) -> None:
        ckpt = load_checkpoint(self.run_dir, run_id=self.run_id, manifest_sha=self.manifest_sha)
        if ckpt is None:
            return
        if ckpt.get("mode", "ht") != self.mode:
            raise HiertrainError(
                f"checkpoint {self.run_dir / 'checkpoint.pt'} was trained with --mode "
                f"{ckpt.get('mode', 'ht')}, this run is --mode {self.mode}; use another --run-dir"
            )
        try:
            self.cloud.load_state_dict(ckpt["cloud"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.ledger.load_state_dict(ckpt["ledger"])
            self._checkpointed = dict(ckpt["ledger"]["trained"])
            self._load_extra_state(ckpt)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise HiertrainError(
                f"checkpoint {self.run_dir / 'checkpoint.pt'} does not fit these artifacts "
                f"({str(exc).splitlines()[0]}); use another --run-dir"
            ) from None
        self.registry.restore(list(ckpt.get("devices", [])))
        self.drops = DropCounter(ckpt.get("dropped", {}))
        self.failed = dict(ckpt.get("failed", {}))
        self.batches_trained = self.resumed_batches = int(ckpt["batches_trained"])
        self.samples_trained = int(ckpt["samples_trained"])
        self.last_eval = dict(ckpt.get("last_eval", {}))
        self.metrics.truncate_after(self.batches_trained)
        log.info("resumed from %s: %d batches already trained (%s)", self.run_dir,
                 self.batches_trained,
                 ", ".join(f"{d}: {self.ledger.trained_count(d)}" for d in self.ledger.devices()))

    def checkpoint(self) -> None:
        with self.model_lock:
            state = {
                "run_id": self.run_id,
                "manifest_sha": self.manifest_sha,
                "cloud": self.cloud.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "ledger": self.ledger.state_dict(),
                "devices": self.registry.admitted(),
                "dropped": self.drops.snapshot(),
                "failed": dict(self.failed),
                "batches_trained": self.batches_trained,
                "samples_trained": self.samples_trained,
                "last_eval": {k: v for k, v in self.last_eval.items()
                              if isinstance(v, (int, float, str)) or v is None},
                "time": time.time(),
                "mode": self.mode,
                **self._extra_state(),
            }
            save_checkpoint(self.run_dir, state)
            trained = state["ledger"]["trained"]
        self.since_checkpoint = 0
        self.post_ack(trained)

    def post_ack(self, trained: dict[str, Any] | None = None) -> None:
        """Tell the edges what is trained and checkpointed (``toolkit.core.protocol.messages.Ack``).

        Only checkpointed seqs: an edge deletes acked batches from its spool, and
        a batch trained after the last checkpoint dies with a killed trainer.
        """
        if trained is not None:
            self._checkpointed = trained
        if self._outbox is None or self._link is None:
            return
        self._acked_connects = self._link.connects
        ack = Ack(run=self.run_id, instance=self.instance, connects=self._acked_connects,
                  trained=self._checkpointed)
        self._outbox.post(topics.ack_topic(self.run_id), ack.encode(), retain=False)

    def _extra_state(self) -> dict[str, Any]:
        """What a mode adds to the checkpoint (called under ``model_lock``)."""
        return {}

    def _load_extra_state(self, ckpt: dict[str, Any]) -> None:
        """Restore what :meth:`_extra_state` saved."""

    def _wire_shape(self) -> tuple[int, ...]:
        """Per-sample shape of the training batches the edges send: the cut activation."""
        return self.manifest.cut_shape

    # ---------------------------------------------------------------- training
    def _train_step(self, b: DecodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """One SGD step on one batch; returns (loss, logits)."""
        x = b.tensor
        with self.model_lock:
            logits = self.cloud(x)
            loss = F.cross_entropy(logits, b.labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return loss, logits

    def train_batch(self, item: ActItem) -> None:
        b = item.batch
        y = b.labels
        assert y is not None  # the ingest refuses unlabelled training batches
        try:
            loss, logits = self._train_step(b)
        except (RuntimeError, ValueError) as exc:
            # E.g. a batch of one through a BatchNorm over 1x1 maps. Retrying the
            # same batch would fail the same way, so it counts as processed.
            self.failed[b.device_id] = self.failed.get(b.device_id, 0) + 1
            self.drops.drop("step", topics.act_topic(self.run_id, b.device_id),
                            f"training step failed: {str(exc).splitlines()[0]}")
            self.ledger.mark_trained(b.device_id, b.seq)
            return
        self.ledger.mark_trained(b.device_id, b.seq)
        self.batches_trained += 1
        self.samples_trained += len(y)
        self.since_checkpoint += 1
        self.window.add(loss.item(), int((logits.argmax(1) == y).sum()), len(y))

    def log_train_line(self) -> None:
        taken = self.window.take()
        if taken is not None:
            self.metrics.append("train", self.batches_trained, loss=taken[0], train_acc=taken[1])

    # -------------------------------------------------------------- evaluation
    def _edge_state(self, device: str | None) -> tuple[dict, str, int | None]:
        if device is not None and device in self.weights:
            w = self.weights[device]
            return w.state, device, w.meta.get("epoch")
        return self.init_edge_state, "edge_init", None

    def latest_weights_device(self) -> str | None:
        admitted = [d for d in self.weights if self.registry.is_admitted(d)]
        pool = admitted or list(self.weights)
        return max(pool, key=lambda d: self.weights[d].received) if pool else None

    def evaluate(self, device: str | None, trigger: str) -> dict[str, Any]:
        """Score the cloud with ``device``'s latest edge weights (initial ones if none)."""
        state, source, epoch = self._edge_state(device)
        self.step.load_state_dict(state)
        with self.model_lock:
            cloud = copy.deepcopy(self.cloud)  # evaluate outside the lock
        full_acc, exit_acc = self.evaluator.evaluate(self.step, cloud)
        if not self.trains_exit:
            exit_acc = None  # the head was never trained: its score would mean nothing
        taken = self.window.take()
        if taken is not None:  # keep the train curve aligned with the evaluation
            self.metrics.append("train", self.batches_trained, loss=taken[0], train_acc=taken[1])
        rec = self.metrics.append(
            "eval", self.batches_trained, full_accuracy=full_acc, exit_accuracy=exit_acc,
            edge_device=source, edge_epoch=epoch, trigger=trigger,
        )
        self.last_eval = rec
        log.info("eval after %d batches (edge weights of %s): full %.3f, exit %s",
                 self.batches_trained, source, full_acc,
                 "-" if exit_acc is None else f"{exit_acc:.3f}")
        return rec

    def on_weights(self, item: WeightsItem) -> None:
        try:
            self.step.load_state_dict(item.state)  # validate before keeping them
        except RuntimeError as exc:
            self.drops.drop("weights", topics.weights_topic(self.run_id, item.device),
                            f"weights do not fit the edge model: {str(exc).splitlines()[0]}")
            return
        self.weights[item.device] = item
        if self.registry.is_admitted(item.device):
            self.evaluate(item.device, "weights")

    def on_status(self, item: StatusItem) -> None:
        st, device = item.status, item.device
        if st.state == "offline":
            # The edge's last will carries no counters; keep its last real status, so
            # an edge that died after saying "done" still counts as done.
            if device not in self.offline:
                self.offline.add(device)
                prev = self.statuses.get(device)
                if prev is None or prev.state != "done":
                    log.warning("edge %s went offline before it was done", device)
            return
        self.offline.discard(device)
        prev = self.statuses.get(device)
        self.statuses[device] = st
        if prev is None or prev.state != st.state:
            log.info("edge %s is %s (epoch %d, %d batches published)", device, st.state,
                     st.epoch, st.batches_published)
        if st.state == "error":
            log.warning("edge %s reports an error: %s", device, st.message)

    # --------------------------------------------------------------- done rule
    def complete(self) -> bool:
        if not self.registry.complete_roster():
            return False
        for device in self.registry.expected():
            st = self.statuses.get(device)
            if st is None or st.state != "done" or not self.ledger.covers(
                device, st.batches_published
            ):
                return False
        return True

    def incomplete(self) -> list[str]:
        """One phrase per device the done rule still waits for."""
        out = []
        for device in self.registry.expected():
            st = self.statuses.get(device)
            trained = self.ledger.trained_count(device)
            if st is None and trained == 0:
                if device not in self.registry.refused():
                    out.append(f"{device} never appeared")
            elif st is None or st.state != "done":
                state = "no status" if st is None else f"state {st.state}"
                out.append(f"{device} did not finish ({state}, {trained} batches trained)")
            elif not self.ledger.covers(device, st.batches_published):
                out.append(f"{device} is done but {trained} of its {st.batches_published} "
                           "batches arrived")
        out.extend(f"refused: {why}" for why in self.registry.refused().values())
        missing = self.registry.missing_count()
        if missing:
            out.append(f"{missing} more device(s) never came online (--devices "
                       f"{self.registry.count})")
        if not self.registry.expected() and not missing:
            out.append("no edge device ever came online")
        return out

    # -------------------------------------------------------------- reporting
    def per_device(self) -> dict[str, dict[str, Any]]:
        devices = sorted(set(self.registry.expected()) | set(self.registry.admitted())
                         | set(self.ledger.devices()))
        out = {}
        for d in devices:
            failed = self.failed.get(d, 0)
            st = self.statuses.get(d)
            out[d] = {
                "trained": self.ledger.trained_count(d) - failed,
                "published": st.batches_published if st is not None else None,
                "duplicates": self.ledger.duplicates(d),
                "failed": failed,
                "state": "offline" if d in self.offline else (st.state if st else None),
            }
        return out

    def status(self, state: str, message: str = "", **extra: Any) -> Status:
        return Status(
            role="cloud", device=CLOUD_DEVICE, run=self.run_id, state=state, message=message,
            exit_accuracy=self.last_eval.get("exit_accuracy"),
            extra={"mode": self.mode, "batches_trained": self.batches_trained,
                   "per_device": {d: v["trained"] for d, v in self.per_device().items()},
                   **self.cfg.extra_status, **extra},
        )

    # --------------------------------------------------------------------- run
    def run(self, stop: threading.Event | None = None) -> dict[str, Any]:
        cfg = self.cfg
        start = time.monotonic()
        link = self._link = open_cloud_link(cfg, self.run_dir, on_reject=self.drops.drop)
        link.set_will(topics.status_topic(self.run_id, CLOUD_DEVICE),
                      Status(role="cloud", device=CLOUD_DEVICE, run=self.run_id,
                             state="offline").encode(), retain=True)
        server = InferenceServer(self.cloud, link, model_lock=self.model_lock)
        max_batch = MAX_BATCH_FACTOR * self.manifest.batch_size
        ingest = Ingest(
            self.run_id, cut_shape=self._wire_shape(),
            num_classes=self.manifest.num_classes, max_batch=max_batch, ledger=self.ledger,
            registry=self.registry, drops=self.drops, queue_size=cfg.queue_size,
            infer_sink=server.submit, mode=self.mode,
        )
        ingest.subscribe(link)
        outbox: Outbox | None = None
        status_topic = topics.status_topic(self.run_id, CLOUD_DEVICE)
        try:
            link.connect(timeout=cfg.connect_timeout)
            outbox = self._outbox = Outbox(link)
            outbox.post(status_topic, self.status("online").encode(), retain=True)
            self.post_ack()
            log.info("cloud trainer online: run %r, broker %s, run dir %s",
                     self.run_id, link.address.url, self.run_dir)
            end = self._loop(ingest, outbox, stop)
            ingest.close()  # from here on paho's thread must stay free for PUBACKs
            summary = self._finish(end, ingest, link, time.monotonic() - start)
            missing = summary["missing"]
            state = "done" if not missing else "error"
            message = "" if not missing else "; ".join(missing)
            outbox.post(status_topic, self.status(
                state, message,
                full_accuracy=summary["full_accuracy"], dropped=summary["dropped"],
                per_device_detail=summary["per_device"], samples_trained=self.samples_trained,
                wall_s=summary["wall_s"], bytes_received=summary["bytes_received"],
                max_queue_depth=summary["max_queue_depth"],
            ).encode(), retain=True)
            if not outbox.flush(10.0):
                log.warning("the final cloud status was not acknowledged within 10 s")
            # A complete run needs no session any more: nothing it could still queue matters.
            inner = link
            while hasattr(inner, "inner"):  # through shaping (and other) wrappers
                inner = inner.inner
            inner.end_session = not missing
        except BaseException as exc:
            ingest.close()
            if isinstance(exc, KeyboardInterrupt):  # Ctrl-C: keep what was trained
                try:
                    self.checkpoint()
                except HiertrainError as disk:
                    log.warning("no checkpoint on interrupt: %s", disk)
            if outbox is not None:
                outbox.post(status_topic, self.status("error", f"{type(exc).__name__}: "
                                                      f"{exc}").encode(), retain=True)
                outbox.flush(5.0)
            raise
        finally:
            ingest.close()
            server.close()
            if outbox is not None:
                outbox.close(5.0)
            link.close()
        if missing:
            why = {"idle": f"no message for {cfg.idle_timeout:g} s",
                   "stopped": "stopped before the run finished"}[end]
            raise HiertrainError(
                f"{why} and {'; '.join(missing)}; what was trained is saved in "
                f"{self.run_dir} (rerun with the same --run-dir to resume)"
            )
        return summary

    def _loop(self, ingest: Ingest, outbox: Outbox, stop: threading.Event | None) -> str:
        cfg = self.cfg
        status_topic = topics.status_topic(self.run_id, CLOUD_DEVICE)
        bar = tqdm(desc="cloud", unit="batch", initial=self.batches_trained, file=sys.stderr,
                   disable=cfg.quiet, dynamic_ncols=True, mininterval=0.5)
        last_status = last_postfix = time.monotonic()
        try:
            while True:
                if stop is not None and stop.is_set():
                    return "stopped"
                try:
                    item = ingest.queue.get(timeout=0.2)
                except queue.Empty:
                    item = None
                if item is not None:
                    self._dispatch(item, bar)
                if self.complete():
                    self._drain(ingest, bar)
                    return "complete"
                if item is None and ingest.idle_for() > cfg.idle_timeout:
                    log.warning("no message for %g s; finishing", cfg.idle_timeout)
                    return "idle"
                now = time.monotonic()
                if now - last_postfix >= 0.5 and not cfg.quiet:
                    counts = " ".join(f"{d}={v['trained']}" for d, v in self.per_device().items())
                    bar.set_postfix_str(f"{counts} q={ingest.queue.qsize()}", refresh=False)
                    last_postfix = now
                if self._link.connects != self._acked_connects:
                    self.post_ack()  # reconnected: the broker may have lost what it held
                if now - last_status >= cfg.status_every:
                    outbox.post(status_topic, self.status(
                        "training", queue_depth=ingest.queue.qsize()).encode(), retain=True)
                    last_status = now
        finally:
            bar.close()

    def _dispatch(self, item: Any, bar: Any) -> None:
        if isinstance(item, ActItem):
            self.train_batch(item)
            self.last_batch_unix = time.time()
            bar.update(1)
            self._periodic()
        elif isinstance(item, StatusItem):
            self.on_status(item)
        elif isinstance(item, WeightsItem):
            self.on_weights(item)

    def _drain(self, ingest: Ingest, bar: Any, quiet_s: float = 0.5, max_s: float = 3.0) -> None:
        """Take what is still arriving after the done rule held (bounded).

        MQTT orders messages per topic only, so an edge's final weights may land
        just after its "done" status; the final evaluation should use them.
        """
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            try:
                item = ingest.queue.get(timeout=quiet_s)
            except queue.Empty:
                return
            self._dispatch(item, bar)

    def _periodic(self) -> None:
        cfg = self.cfg
        if self.batches_trained % cfg.log_every == 0:
            self.log_train_line()
        if cfg.eval_every and self.batches_trained % cfg.eval_every == 0:
            self.evaluate(self.latest_weights_device(), "eval_every")
        if self.since_checkpoint >= cfg.checkpoint_every:
            self.checkpoint()

    def _finish(self, end: str, ingest: Ingest, link: Any, wall_s: float) -> dict[str, Any]:
        missing = [] if end == "complete" else self.incomplete()
        device = self.latest_weights_device()
        per_device_acc = {}
        for d in sorted(self.weights):
            if self.registry.is_admitted(d) and d != device:
                per_device_acc[d] = self.evaluate(d, "final")["full_accuracy"]
        final = self.evaluate(device, "final")  # last, so self.step holds these weights
        if device is not None:
            per_device_acc[device] = final["full_accuracy"]
        self.checkpoint()
        with self.model_lock:
            atomic_torch_save(self.run_dir / CLOUD_FINAL, self.cloud.state_dict())
            full = FullModel(self.step.edge, self.cloud)
            atomic_torch_save(self.run_dir / FULL_MODEL, full.state_dict())
        plot_curves(self.metrics.records, self.run_dir / CURVES,
                    title=f"{self.manifest.model_name} run {self.run_id}")
        summary = {
            "run_id": self.run_id,
            "mode": self.mode,
            "end": end,
            "complete": not missing,
            "missing": missing,
            "batches_trained": self.batches_trained,
            "samples_trained": self.samples_trained,
            "session_batches_trained": self.batches_trained - self.resumed_batches,
            "resumed_batches": self.resumed_batches,
            "per_device": self.per_device(),
            "dropped": self.drops.snapshot(),
            "full_accuracy": final["full_accuracy"],
            "exit_accuracy": final["exit_accuracy"],
            "eval_edge_device": final["edge_device"],
            "eval_edge_epoch": final["edge_epoch"],
            "per_device_full_accuracy": per_device_acc,
            "eval_data": self.evaluator.name,
            "eval_samples": len(self.evaluator),
            "wall_s": round(wall_s, 3),
            "last_batch_unix": self.last_batch_unix,
            "bytes_received": link.bytes_received,
            "messages_received": link.messages_received,
            "max_queue_depth": ingest.max_queue_depth,
            "backpressure_s": round(ingest.blocked_s, 3),
            "link": link_summary(link),
            # The keys every mode reports, for comparing them (docs/runtime.md):
            "samples": self.samples_trained,
            "bytes_up": sum(ingest.bytes_by_device.values()),
            "bytes_down": sum(self.bytes_down.values()),
            "bytes_up_per_device": dict(sorted(ingest.bytes_by_device.items())),
            "bytes_down_per_device": dict(sorted(self.bytes_down.items())),
        }
        atomic_write_bytes(self.run_dir / SUMMARY,
                           (json.dumps(summary, indent=2) + "\n").encode())
        return summary


def run_class(mode: str) -> type[CloudRun]:
    """The :class:`CloudRun` of a mode (the baselines live in their own modules)."""
    if check_mode(mode) == "split":
        from cloud_trainer.split_learning import SplitCloudRun

        return SplitCloudRun
    if mode == "cloud":
        from cloud_trainer.centralized import CentralizedCloudRun

        return CentralizedCloudRun
    return CloudRun


def run_cloud(cfg: CloudConfig, stop: threading.Event | None = None) -> dict[str, Any]:
    """Train until the run is done (see the module docstring); returns the summary dict.

    ``stop`` (optional) ends the run early, as if it went idle. Raises
    HiertrainError when devices are missing or incomplete at the end, after
    writing everything that was trained.
    """
    return run_class(cfg.mode)(cfg).run(stop)
