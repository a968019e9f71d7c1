"""What the cloud trains and knows, without the network: models, optimizer, ledger, evaluation.

The training loop (``cloud_trainer.loop``) feeds a :class:`CloudLearner` what the
ingest queued and sends out what it returns; everything here is the same in every
mode except what the :class:`~cloud_trainer.modes.base.ModeStrategy` answers (how a
batch becomes the model's input, which module trains, what goes back to the edge,
what the checkpoint adds, which edge weights an evaluation uses).
"""

from __future__ import annotations

import copy
import json
import logging
import threading
import time
from typing import Any

import torch
import torch.nn.functional as F

from cloud_trainer.checkpoint import ensure_run_dir, load_checkpoint, save_checkpoint
from cloud_trainer.config import CloudConfig
from cloud_trainer.device import Placement
from cloud_trainer.eval_worker import EvalWorker
from cloud_trainer.evaluate import Evaluator
from cloud_trainer.fleet import Fleet
from cloud_trainer.fleet_average import AVERAGE_SOURCE, FleetAverager
from cloud_trainer.fleet_model import FleetModel
from cloud_trainer.group import Group
from cloud_trainer.ingest import ActItem, DeviceRegistry, DropCounter, StatusItem, WeightsItem
from cloud_trainer.ledger import Ledger
from cloud_trainer.metrics import MetricsLog, TrainWindow
from cloud_trainer.modes.base import EdgeState, ModeContext, ModeStrategy, Reply
from cloud_trainer.optim import EdgeSchedules, make_optimizer, set_lr
from cloud_trainer.tensorboard import TensorBoardSink
from toolkit.core.artifacts.manifest import MANIFEST_NAME, load_manifest, sha256_file
from toolkit.core.classes import SeenClasses
from toolkit.core.errors import HiertrainError, WireError
from toolkit.core.models.segments import load_segments
from toolkit.core.protocol import topics
from toolkit.core.protocol.codec import DecodedBatch
from toolkit.core.protocol.fleet_average import read_contribution

log = logging.getLogger(__name__)


class CloudLearner:
    """One run's training state; built from a config and a mode strategy, resumed from the
    run directory's checkpoint if there is one."""

    def __init__(self, cfg: CloudConfig, strategy: ModeStrategy,
                 group: Group | None = None) -> None:
        cfg.check()
        self.group = group
        self.rank = group.rank if group is not None else 0
        self.is_leader = group is None or group.is_leader
        if strategy.name != cfg.mode:
            raise ValueError(f"a --mode {strategy.name} strategy for a --mode {cfg.mode} run")
        self.cfg = cfg
        self.strategy = strategy
        self.mode = strategy.name
        self.run_id = cfg.run_id
        self.run_dir = ensure_run_dir(cfg.run_dir)  # first: a bad path fails before any work
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        self.manifest = load_manifest(cfg.artifacts)
        self.manifest_sha = sha256_file(self.manifest.path(MANIFEST_NAME))
        self.place = Placement.from_options(cfg.device, cfg.amp)
        built = load_segments(self.manifest)
        self.init_edge_state = copy.deepcopy(built.step.state_dict())
        self.cloud = built.cloud.to(self.place.device).train()
        self.step = built.step.to(self.place.device)  # host edge copy (--mode cloud trains it)
        # What trains: the cloud segment, or (--mode cloud) the whole network.
        self.model = strategy.bind(ModeContext(self.run_id, self.manifest, self.cloud, self.step))
        self.optimizer = make_optimizer(self.model.parameters(), self.manifest)
        self.schedules = EdgeSchedules()  # each edge's learning-rate schedule, from its status
        self.model_lock = threading.Lock()
        self.evaluator = Evaluator(self.manifest, cfg.eval_data, limit=cfg.eval_limit)
        # Evaluations read copies refreshed under the model lock (evaluate), never the live models
        self._eval_step = copy.deepcopy(self.step).eval()
        self._eval_cloud = copy.deepcopy(self.cloud).eval()
        self._eval_lock = threading.Lock()  # one evaluation at a time (worker or final)
        self._check_step = copy.deepcopy(self.step).cpu()  # validates received edge weights
        self.eval_worker: EvalWorker | None = None
        self._device_acc: dict[str, float] = {}  # full accuracy of the last eval per edge
        # classes in the labels trained so far (toolkit.core.classes): evaluation and
        # inference mask the others, so a head provisioned ahead grows without a restart
        self.seen = SeenClasses(self.manifest.num_classes)
        # the run's files are the leader's (cloud_trainer.group); the other workers only train
        self.tensorboard = TensorBoardSink(self.run_dir, cfg.tensorboard and self.is_leader)
        self.metrics = MetricsLog(self.run_dir, sink=self.tensorboard.record,
                                  enabled=self.is_leader)

        self.ledger = Ledger()
        self.ledger.shared = group
        self.registry = DeviceRegistry(cfg.device_ids, cfg.devices)
        self.fleet = Fleet(self.registry, self.ledger)
        self.drops = DropCounter()
        self.weights: dict[str, WeightsItem] = {}
        # the fleet's model (cloud_trainer.fleet_model): label distributions, per-class
        # scores, and with --fleet-average the rounds of averaged edges
        self.fleet_model = FleetModel(FleetAverager(
            cfg.run_id, wait_s=cfg.average_wait_s, quorum=cfg.average_quorum,
            expected=lambda: (self.registry.expected(), self.registry.complete_roster()),
            state_of=self._device_state) if cfg.fleet_average else None)
        self._average: tuple[dict[str, torch.Tensor], int | None] | None = None
        self.batches_trained = 0
        self.last_batch_unix: float | None = None  # wall clock of the last trained batch
        self.samples_trained = 0
        self.resumed_batches = 0
        self.resumed_samples = 0
        self.local_batches = 0  # trained by this process (a group's worker: its share)
        self.local_samples = 0
        self.checkpointed_batches = 0
        self.window = TrainWindow()
        self.last_eval: dict[str, Any] = {}
        self.since_checkpoint = 0
        self.checkpointed: dict[str, Any] = {}  # the ledger's trained sets at the last checkpoint
        self._trace = open(cfg.trace, "a", buffering=1) if cfg.trace else None  # noqa: SIM115
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
            self.checkpointed = dict(ckpt["ledger"]["trained"])
            self.strategy.load_extra_state(ckpt)
            self.place.load_scaler_state(ckpt.get("grad_scaler"))
        except (KeyError, RuntimeError, ValueError) as exc:
            raise HiertrainError(
                f"checkpoint {self.run_dir / 'checkpoint.pt'} does not fit these artifacts "
                f"({str(exc).splitlines()[0]}); use another --run-dir"
            ) from None
        self.registry.restore(list(ckpt.get("devices", [])))
        self.seen.update(ckpt.get("seen_classes", []))
        self.drops = DropCounter(ckpt.get("dropped", {}))
        self.fleet.failed = dict(ckpt.get("failed", {}))
        self.batches_trained = self.resumed_batches = int(ckpt["batches_trained"])
        self.checkpointed_batches = self.batches_trained
        self.samples_trained = self.resumed_samples = int(ckpt["samples_trained"])
        self.last_eval = dict(ckpt.get("last_eval", {}))
        averager = self.fleet_model.averager
        if averager is not None and ckpt.get("fleet_average"):
            averager.load_state_dict(ckpt["fleet_average"])
            if averager.latest is not None:
                self._average = (averager.latest.state, averager.latest.epoch)
        self.metrics.truncate_after(self.batches_trained)
        log.info("resumed from %s: %d batches already trained (%s)", self.run_dir,
                 self.batches_trained,
                 ", ".join(f"{d}: {self.ledger.trained_count(d)}" for d in self.ledger.devices()))

    def close(self) -> None:
        """Close the files a run keeps open (trace, TensorBoard)."""
        if self._trace is not None:
            self._trace.close()
            self._trace = None
        self.tensorboard.close()

    def checkpoint(self) -> None:
        """Save everything trained (atomically); ``checkpointed`` is then what may be acked."""
        with self.model_lock:
            state = {
                "run_id": self.run_id,
                "manifest_sha": self.manifest_sha,
                "cloud": self.cloud.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "ledger": self.ledger.state_dict(),
                "devices": self.registry.admitted(),
                "dropped": self.drops.snapshot(),
                "failed": dict(self.fleet.failed),
                "batches_trained": self.batches_trained,
                "samples_trained": self.samples_trained,
                "last_eval": {k: v for k, v in self.last_eval.items()
                              if isinstance(v, (int, float, str)) or v is None},
                "time": time.time(),
                "mode": self.mode,
                "seen_classes": self.seen.sorted(),
                "grad_scaler": self.place.scaler_state(),
                "fleet_average": (self.fleet_model.averager.state_dict()
                                  if self.fleet_model.averager is not None else None),
                **self.strategy.extra_state_locked(),
            }
            save_checkpoint(self.run_dir, state)
            self.checkpointed = state["ledger"]["trained"]
            self.checkpointed_batches = self.batches_trained
        self.since_checkpoint = 0

    # ---------------------------------------------------------------- training
    def _train_step(self, b: DecodedBatch) -> tuple[torch.Tensor, torch.Tensor, list[Reply]]:
        """One SGD step on one batch; (loss, logits, what goes back to the edge)."""
        x = self.strategy.inputs(b, self.place)
        with self.model_lock:
            logits, loss = self._forward_locked(x, b)
            self.optimizer.zero_grad(set_to_none=True)
            set_lr(self.optimizer, self.manifest, self._lr_factor(b))
            self.place.backward_step(loss, self.optimizer)
            self.strategy.after_step_locked()
        return loss, logits, self.strategy.replies(b, x)

    def _lr_factor(self, b: DecodedBatch) -> float:
        meta = b.meta
        return self.schedules.factor(meta.device_id, meta.epoch, meta.batch_index)

    def _forward_locked(self, x: torch.Tensor, b: DecodedBatch) -> tuple[torch.Tensor,
                                                                          torch.Tensor]:
        """(logits, loss) of one batch in the step's precision; the loss in float32."""
        with self.place.autocast():
            logits = self.model(x)
            return logits, F.cross_entropy(logits.float(), self.place.labels(b))

    def train_batch(self, item: ActItem) -> list[Reply]:
        """Train one queued batch (once: the ledger marks it); the mode's replies to its edge."""
        b = item.batch
        y = b.labels
        assert y is not None  # the ingest refuses unlabelled training batches
        try:
            loss, logits, replies = self._train_step(b)
        except (RuntimeError, ValueError) as exc:
            self._failed_step(b, exc)
            return []
        self._trained(b, loss, logits)
        return replies

    def _trained(self, b: DecodedBatch, loss: torch.Tensor, logits: torch.Tensor) -> None:
        """The bookkeeping of one trained batch: ledger, trace, seen classes, counters."""
        y = b.labels
        assert y is not None
        self.ledger.mark_trained(b.device_id, b.seq)
        if self._trace is not None:
            self._trace.write(json.dumps({"device": b.device_id, "seq": b.seq, "n": len(y),
                                          "trained": time.time(), "worker": self.rank,
                                          "lr": self.optimizer.param_groups[0]["lr"]})
                              + "\n")
        for k in self.seen.update(y):
            log.info("class %d seen for the first time (batch %d of %s)", k, b.seq, b.device_id)
        self.batches_trained += 1
        self.samples_trained += len(y)
        self.local_batches += 1
        self.local_samples += len(y)
        self.since_checkpoint += 1
        self.window.add(loss.item(), int((logits.argmax(1).cpu() == y).sum()), len(y))

    def group_tick(self, item: ActItem | None, samples: int, total: int) -> None:
        """One lock-step tick of a group of workers (``cloud_trainer.group``): this worker's
        batch (or nothing) forward and backward, then the group's averaged step."""
        group = self.group
        assert group is not None
        loss = logits = None
        factor = 0.0
        if item is not None:
            factor = self._lr_factor(item.batch)
            b = item.batch
            try:
                x = self.strategy.inputs(b, self.place)
                with self.model_lock:
                    self.optimizer.zero_grad(set_to_none=True)
                    logits, loss = self._forward_locked(x, b)
                    loss.backward()
            except (RuntimeError, ValueError) as exc:
                self._failed_step(b, exc)
                samples = 0  # the group still steps: contribute zeros
                item = None
        with self.model_lock:
            if item is None:
                self.optimizer.zero_grad(set_to_none=True)
            group.averaged_step(self.model, self.optimizer, samples, total,
                                lambda f: set_lr(self.optimizer, self.manifest, f), factor)
        if item is not None and loss is not None and logits is not None:
            self._trained(item.batch, loss, logits)

    def _failed_step(self, b: DecodedBatch, exc: Exception) -> None:
        # E.g. a batch of one through a BatchNorm over 1x1 maps. Retrying the
        # same batch would fail the same way, so it counts as processed.
        failed = self.fleet.failed
        failed[b.device_id] = failed.get(b.device_id, 0) + 1
        self.drops.drop("step", topics.act_topic(self.run_id, b.device_id),
                        f"training step failed: {str(exc).splitlines()[0]}")
        self.ledger.mark_trained(b.device_id, b.seq)

    def log_train_line(self) -> None:
        taken = self.window.take()
        if taken is not None:
            self.metrics.append("train", self.batches_trained, loss=taken[0], train_acc=taken[1])

    # -------------------------------------------------------------- evaluation
    def _edge_state(self, device: str | None) -> EdgeState:
        own = self.strategy.own_edge_state()
        if own is not None:
            return own
        if device == AVERAGE_SOURCE and self._average is not None:
            return self._average[0], AVERAGE_SOURCE, self._average[1]
        if device is not None and device in self.weights:
            w = self.weights[device]
            return w.state, device, w.meta.get("epoch")
        return self.init_edge_state, "edge_init", None

    def latest_weights_device(self) -> str | None:
        if not self.strategy.uses_edge_weights:
            return None
        weights = dict(self.weights)  # the training thread may add to it meanwhile
        admitted = [d for d in weights if self.registry.is_admitted(d)]
        pool = admitted or list(weights)
        return max(pool, key=lambda d: weights[d].received) if pool else None

    def start_evaluations(self) -> None:
        """Evaluations requested from now on run on their own thread (cloud_trainer.eval_worker)."""
        if self.eval_worker is None:
            self.eval_worker = EvalWorker(lambda req: self.evaluate(req.device, req.trigger),
                                          min_interval=self.cfg.eval_interval)

    def stop_evaluations(self, timeout: float) -> None:
        """Finish the requested evaluations (bounded), then stop the thread."""
        worker, self.eval_worker = self.eval_worker, None
        if worker is None:
            return
        if not worker.drain(timeout):
            log.warning("%d evaluation(s) still pending after %g s; skipped", worker.pending(),
                        timeout)
        worker.close()

    def request_evaluation(self, device: str | None, trigger: str) -> None:
        """An evaluation with ``device``'s weights: on the worker when it runs, else now."""
        if not self.is_leader:
            return  # a group's leader evaluates
        if self.eval_worker is not None:
            self.eval_worker.request(device, trigger)
        else:
            self.evaluate(device, trigger)

    def evaluate(self, device: str | None, trigger: str) -> dict[str, Any]:
        """Score the cloud with ``device``'s latest edge weights (initial ones if none).

        Runs on copies (``None``: the latest weights): the cloud segment is copied under
        the model lock, the edge weights go into an evaluation-only edge copy, so the
        training thread is held for one parameter copy, not for the held-out set.
        """
        with self._eval_lock:
            if device is None:
                device = self.latest_weights_device()
            with self.model_lock:
                state, source, epoch = self._edge_state(device)
                self._eval_step.load_state_dict(state)
                self._eval_cloud.load_state_dict(self.cloud.state_dict())
                batches = self.batches_trained
                seen = SeenClasses(self.manifest.num_classes)
                seen.update(self.seen.sorted())
            scores = self.evaluator.evaluate_classes(self._eval_step, self._eval_cloud, seen)
            full_acc, exit_acc = scores.full_accuracy, scores.exit_accuracy
            self.fleet_model.record(source, scores, epoch)
            if not self.strategy.trains_exit:
                exit_acc = None  # the head was never trained: its score would mean nothing
            rec = self.metrics.append(
                "eval", batches, full_accuracy=full_acc, exit_accuracy=exit_acc,
                edge_device=source, edge_epoch=epoch, trigger=trigger,
            )
            self.last_eval = rec
            self._device_acc[source] = full_acc
        log.info("eval after %d batches (edge weights of %s): full %.3f, exit %s",
                 batches, source, full_acc, "-" if exit_acc is None else f"{exit_acc:.3f}")
        return rec

    def per_device_accuracy(self) -> dict[str, float]:
        """Full-model accuracy of the last evaluation with each edge's weights."""
        return {d: v for d, v in self._device_acc.items() if d != AVERAGE_SOURCE}

    @property
    def evaluated_edge(self) -> torch.nn.Module:
        """The edge segment of the last evaluation (after :meth:`final_evaluations`: the
        final model's)."""
        return self._eval_step.edge

    def final_evaluations(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The final evaluation record (latest edge weights) and full accuracy per edge."""
        device = self.latest_weights_device()
        per_device_acc = {}
        for d in sorted(self.weights):
            if self.registry.is_admitted(d) and d != device:
                per_device_acc[d] = self.evaluate(d, "final")["full_accuracy"]
        final = self.evaluate(device, "final")
        if device is not None:
            per_device_acc[device] = final["full_accuracy"]
        return final, per_device_acc

    def evaluate_average(self, trigger: str) -> dict[str, Any] | None:
        """Score the averaged edge with the cloud segment (``cloud_trainer.fleet_model``: the
        latest round of ``--fleet-average``, else a one-shot average of the final edges)."""
        admitted = {d: w for d, w in dict(self.weights).items() if self.registry.is_admitted(d)}
        got = self.fleet_model.average_state(admitted)
        if got is None:
            return None
        self._average = got
        return self.evaluate(AVERAGE_SOURCE, trigger)

    def average_due(self) -> bool:
        """``--fleet-average``: decide a round that is ready; whether one was decided
        (averaged or skipped)."""
        averager = self.fleet_model.averager
        if averager is None:
            return False
        before = averager.decided_epoch
        avg = averager.due()
        if avg is not None:
            self._average = (avg.state, avg.epoch)
            self.fleet_model.on_round(avg.devices)
            self.request_evaluation(AVERAGE_SOURCE, "average")
        return averager.decided_epoch != before

    def average_deliveries(self) -> list[Reply]:
        """The latest average for every device that does not hold it yet (marked sent)."""
        averager = self.fleet_model.averager
        return [] if averager is None else averager.deliveries()

    def _device_state(self, device: str) -> str | None:
        if device in self.fleet.offline:
            return "offline"
        st = self.fleet.statuses.get(device)
        return None if st is None else st.state

    # ------------------------------------------------------ what the edges say
    def on_weights(self, item: WeightsItem) -> None:
        if not self.strategy.uses_edge_weights:
            return  # the mode check refuses such edges; ignore any weights that slip through
        topic = topics.weights_topic(self.run_id, item.device)
        try:
            self._check_step.load_state_dict(item.state)  # validate before keeping them
            contribution = read_contribution(item.meta, self.manifest.num_classes)
        except RuntimeError as exc:
            self.drops.drop("weights", topic,
                            f"weights do not fit the edge model: {str(exc).splitlines()[0]}")
            return
        except WireError as exc:
            self.drops.drop(exc.reason, topic, str(exc))
            return
        self.weights[item.device] = item
        if self.registry.is_admitted(item.device):
            self.fleet_model.on_contribution(item.device, contribution, item.state)
            self.request_evaluation(item.device, "weights")

    def on_status(self, item: StatusItem) -> None:
        self.fleet.on_status(item)
        self.schedules.on_status(item.device, item.status.extra)
        if self.strategy.evaluate_on_status(item):
            self.request_evaluation(None, "epoch")
