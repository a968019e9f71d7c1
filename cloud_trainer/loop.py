"""The cloud trainer's one training loop, for every mode: trains what the edges send.

Threads, and why:

* paho's network thread runs the :class:`~cloud_trainer.ingest.Ingest`
  handlers, which only check and enqueue (bounded queue, blocking put:
  back-pressure instead of unbounded memory);
* the **main thread** runs the training loop: it drains the queue, steps SGD,
  evaluates when edge weights arrive, checkpoints, and decides when the run is
  done;
* an :class:`~cloud_trainer.outbox.Outbox` thread publishes status (and, in
  split mode, gradients), so the loop never waits for a PUBACK that paho's
  (possibly blocked) thread would have to read;
* an :class:`~cloud_trainer.infer.InferenceServer` thread answers
  hierarchical inference requests with the live cloud segment, under
  ``model_lock``.

The loop hands each batch to a :class:`~cloud_trainer.learner.CloudLearner` (models,
optimizer, ledger, checkpoints, evaluation) and publishes what it returns. What
differs per ``--mode`` is asked of the :class:`~cloud_trainer.modes.base.ModeStrategy`
the run is given; the loop never imports a mode by name
(``cloud_trainer.modes.registry`` does).

The run is done (spec, :class:`~cloud_trainer.fleet.Fleet`) when every expected
device has status ``done`` and the ledger holds all of its seqs
``0..batches_published-1``; or when no message arrived for ``idle_timeout``
seconds, which is a :class:`RunIncompleteError` (exit 5) if some device is missing
or incomplete. Either way the final model, metrics, plot and summary are written
first.

Delivery (``docs/delivery.md``): the trainer subscribes with a persistent MQTT
session (stable client id per run and run directory, ``session_expiry``) so
the broker queues what edges publish while it is down, and after every
checkpoint it publishes an :class:`~toolkit.core.protocol.messages.Ack` of what is trained
*and checkpointed*; edges keep each batch in their spool until it is acked
and resend what is left when this trainer restarts or reconnects. The ledger
drops the duplicates, so at-least-once delivery trains every batch once.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from typing import Any

from tqdm import tqdm

from cloud_trainer.cloud_link import open_cloud_link
from cloud_trainer.config import MAX_BATCH_FACTOR, CloudConfig
from cloud_trainer.fleet_status import Throughput, build_status, fleet_scalars, write_status
from cloud_trainer.group import Group, share_filter
from cloud_trainer.infer import InferenceServer
from cloud_trainer.ingest import ActItem, Ingest, StatusItem, WeightsItem
from cloud_trainer.learner import CloudLearner
from cloud_trainer.modes.base import ModeStrategy
from cloud_trainer.outbox import Outbox
from cloud_trainer.summary import (
    build_summary,
    save_curves,
    save_final_models,
    save_fleet_model,
    write_summary,
)
from toolkit.core.entry import show_progress
from toolkit.core.errors import HiertrainError, RunIncompleteError
from toolkit.core.protocol import topics
from toolkit.core.protocol.messages import CLOUD_DEVICE, Ack, Status

log = logging.getLogger(__name__)

GROUP_TICK_S = 0.02
"""Longest a worker of a group waits for a batch before its tick goes ahead without one."""
GROUP_SYNC_TICKS = 25
"""Ticks between two exchanges of the workers' ledgers (the leader's duties follow each)."""
COMPLETE, IDLE, STOPPED = 1, 2, 3
GROUP_ENDS = {COMPLETE: "complete", IDLE: "idle", STOPPED: "stopped"}
EVAL_DRAIN_S = 120.0
"""Longest the end of a run waits for requested evaluations (the final ones follow anyway)."""


class CloudRun:
    """One training run: build with a config and a mode strategy (no network yet), then
    :meth:`run`."""

    def __init__(self, cfg: CloudConfig, strategy: ModeStrategy,
                 group: Group | None = None) -> None:
        self.learner = CloudLearner(cfg, strategy, group)  # checks cfg, resumes from the run dir
        self.group = group
        self.leader = group is None or group.is_leader
        self.cfg = cfg
        self.mode = strategy.name
        self.run_id = cfg.run_id
        self.run_dir = self.learner.run_dir
        self.bytes_down: dict[str, int] = {}  # payload bytes published to each edge
        self.instance = f"{random.getrandbits(32):08x}"  # tells edges this process restarted
        self._outbox: Outbox | None = None
        self._link: Any = None
        self._acked_connects = -1  # the first post_ack goes to every known edge
        self._acked: dict[str, Any] = {}  # per edge: the checkpointed set its last ack carried
        self.ack_bytes: dict[str, int] = {}  # ack payload bytes sent to each edge
        self._throughput = Throughput()
        # Edges that said "done" and are owed an ack of their whole run (_ack_finished_edges)
        self._owed: set[str] = set()

    # ---------------------------------------------------------- what goes out
    def checkpoint(self) -> None:
        if not self.leader:
            return  # the leader checkpoints the group's model and union ledger
        self.learner.checkpoint()
        self.post_ack()

    def post_ack(self, devices: list[str] | None = None) -> None:
        """Tell each edge what of it is trained and checkpointed
        (``toolkit.core.protocol.messages.Ack``), on its own topic.

        Only checkpointed seqs: an edge deletes acked batches from its spool, and
        a batch trained after the last checkpoint dies with a killed trainer. Each
        edge gets an ack when its own set changed, so ack bytes per edge do not grow
        with the fleet; after a (re)connect every known edge gets one (it tells them
        to resend what the broker may have lost). ``devices``: these edges, changed
        or not (an edge that is done asks again).
        """
        if self._outbox is None or self._link is None or not self.leader:
            return
        reconnected = self._link.connects != self._acked_connects
        self._acked_connects = self._link.connects
        trained = self.learner.checkpointed
        if devices is None:
            known = set(trained) | set(self.learner.registry.admitted())
            devices = sorted(d for d in known if reconnected or d not in self._acked
                             or self._acked[d] != trained.get(d))
        for device in devices:
            mine = trained.get(device)
            ack = Ack(run=self.run_id, instance=self.instance, connects=self._acked_connects,
                      trained={device: mine} if mine is not None else {})
            payload = ack.encode()
            self._outbox.post(topics.ack_topic(self.run_id, device), payload, retain=False)
            self._acked[device] = mine
            self.ack_bytes[device] = self.ack_bytes.get(device, 0) + len(payload)

    def status(self, state: str, message: str = "", **extra: Any) -> Status:
        lr = self.learner
        return Status(
            role="cloud", device=CLOUD_DEVICE, run=self.run_id, state=state, message=message,
            exit_accuracy=lr.last_eval.get("exit_accuracy"),
            extra={"mode": self.mode, "batches_trained": lr.batches_trained,
                   "fleet_average": self.cfg.fleet_average,
                   "per_device": {d: v["trained"] for d, v in lr.fleet.per_device().items()},
                   **self.cfg.extra_status, **extra},
        )

    def write_fleet_status(self, ingest: Ingest, state: str) -> None:
        """``fleet_status.json`` and its TensorBoard scalars (``cloud_trainer.fleet_status``)."""
        lr = self.learner
        self._throughput.update(lr.batches_trained, lr.samples_trained)
        doc = build_status(run_id=self.run_id, mode=self.mode, state=state, learner=lr,
                           ingest=ingest, throughput=self._throughput, ack_bytes=self.ack_bytes)
        try:
            write_status(self.run_dir, doc)
        except OSError as exc:
            log.warning("could not write the fleet status: %s", exc)
        lr.tensorboard.scalars(lr.batches_trained, fleet_scalars(doc))

    # --------------------------------------------------------------------- run
    def run(self, stop: threading.Event | None = None) -> dict[str, Any]:
        cfg, lr = self.cfg, self.learner
        start = time.monotonic()
        leader = self.leader
        link = self._link = open_cloud_link(cfg, self.run_dir, on_reject=lr.drops.drop,
                                            worker=self.group.rank if self.group else None)
        server: InferenceServer | None = None
        if leader:  # the cloud's status and inference answers are the leader's
            link.set_will(topics.status_topic(self.run_id, CLOUD_DEVICE),
                          Status(role="cloud", device=CLOUD_DEVICE, run=self.run_id,
                                 state="offline").encode(), retain=True)
            server = InferenceServer(lr.cloud, link, model_lock=lr.model_lock, seen=lr.seen,
                                     max_age=cfg.infer_max_age)
        max_batch = MAX_BATCH_FACTOR * lr.manifest.batch_size
        ingest = Ingest(
            self.run_id, cut_shape=lr.strategy.wire_shape(lr.manifest),
            num_classes=lr.manifest.num_classes, max_batch=max_batch, ledger=lr.ledger,
            registry=lr.registry, drops=lr.drops, queue_size=cfg.queue_size,
            infer_sink=server.submit if server else None, mode=self.mode,
            act_filter=(share_filter(self.run_id, topics.act_wildcard(self.run_id))
                        if self.group else None),
        )
        ingest.subscribe(link)
        outbox: Outbox | None = None
        status_topic = topics.status_topic(self.run_id, CLOUD_DEVICE)
        try:
            link.connect(timeout=cfg.connect_timeout)
            outbox = self._outbox = Outbox(link)
            who = f" (worker {self.group.rank} of {self.group.world})" if self.group else ""
            log.info("cloud trainer online%s: run %r, broker %s, run dir %s", who,
                     self.run_id, link.address.url, self.run_dir)
            if self.group is not None:
                end = self._group_run(ingest, outbox, stop)
                if not leader:
                    _end_session(link, end == "complete")
                    return self._worker_summary(end, ingest)
            else:
                self._online(ingest, outbox)
                end = self._loop(ingest, outbox, stop)
            ingest.close()  # from here on paho's thread must stay free for PUBACKs
            lr.stop_evaluations(timeout=EVAL_DRAIN_S)
            summary = self._finish(end, ingest, link, time.monotonic() - start)
            missing = summary["missing"]
            state = "done" if not missing else "error"
            message = "" if not missing else "; ".join(missing)
            outbox.post(status_topic, self.status(
                state, message,
                full_accuracy=summary["full_accuracy"], dropped=summary["dropped"],
                per_device_detail=summary["per_device"], samples_trained=lr.samples_trained,
                wall_s=summary["wall_s"], bytes_received=summary["bytes_received"],
                max_queue_depth=summary["max_queue_depth"],
            ).encode(), retain=True)
            if not outbox.flush(10.0):
                log.warning("the final cloud status was not acknowledged within 10 s")
            _end_session(link, not missing)
        except BaseException as exc:
            ingest.close()
            if isinstance(exc, KeyboardInterrupt) and leader:  # Ctrl-C: keep what was trained
                try:
                    self.checkpoint()
                except HiertrainError as disk:
                    log.warning("no checkpoint on interrupt: %s", disk)
            if outbox is not None and leader:
                outbox.post(status_topic, self.status("error", f"{type(exc).__name__}: "
                                                      f"{exc}").encode(), retain=True)
                outbox.flush(5.0)
            raise
        finally:
            ingest.close()
            lr.stop_evaluations(timeout=0.0)
            lr.close()
            if server is not None:
                server.close()
            if outbox is not None:
                outbox.close(5.0)
            link.close()
        if missing:
            why = {"idle": f"no message for {cfg.idle_timeout:g} s",
                   "stopped": "stopped before the run finished"}[end]
            incomplete = RunIncompleteError(
                f"{why} and {'; '.join(missing)}; what was trained is saved in "
                f"{self.run_dir} (rerun with the same --run-dir to resume)"
            )
            incomplete.summary = summary  # type: ignore[attr-defined]  # for --json
            raise incomplete
        return summary

    def _online(self, ingest: Ingest, outbox: Outbox) -> None:
        """The leader comes online: status, acks, evaluations, the first fleet status."""
        outbox.post(topics.status_topic(self.run_id, CLOUD_DEVICE),
                    self.status("online").encode(), retain=True)
        self.post_ack()
        self.learner.start_evaluations()
        self.write_fleet_status(ingest, "training")

    # ------------------------------------------------------------ group of workers
    def _group_run(self, ingest: Ingest, outbox: Outbox, stop: threading.Event | None) -> str:
        """Lock-step ticks of a group of workers (``cloud_trainer.group``) until the leader
        says the run is over; then the final exchange, so the leader finishes with the union."""
        group, lr = self.group, self.learner
        assert group is not None
        # Every worker is connected and subscribed (link.connect) before the leader says
        # "online", which is what edges and launchers wait for: otherwise the first batches
        # all go to whichever workers happened to be subscribed already.
        group.agree(0, 0, 0.0)
        if self.leader:
            self._online(ingest, outbox)
        decided, tick = 0, 0
        last_status = time.monotonic()
        while True:
            item = ingest.take(timeout=GROUP_TICK_S)
            act = item if isinstance(item, ActItem) else None
            if item is not None and act is None:
                self._dispatch(item, None)
            flag = STOPPED if stop is not None and stop.is_set() else 0
            if self.leader:
                flag = max(flag, decided)
            samples = len(act.batch.labels) if act is not None and act.batch.labels is not None \
                else 0
            total, flag, last_message = group.agree(samples, flag, ingest.last_message_unix())
            if total:
                lr.group_tick(act, samples, total)
            if flag:
                self._group_exchange()
                return GROUP_ENDS[flag]
            tick += 1
            if tick % GROUP_SYNC_TICKS == 0:
                self._group_exchange()
                if self.leader:
                    decided = self._leader_duties(ingest, outbox, last_message)
                    now = time.monotonic()
                    if now - last_status >= self.cfg.status_every:
                        outbox.post(topics.status_topic(self.run_id, CLOUD_DEVICE), self.status(
                            "training", queue_depth=ingest.queue.qsize()).encode(), retain=True)
                        self.write_fleet_status(ingest, "training")
                        last_status = now

    def _group_exchange(self) -> None:
        """Every worker's trained sets, counts and seen classes into every worker (collective)."""
        group, lr = self.group, self.learner
        assert group is not None
        mine = {"trained": lr.ledger.trained_sets(), "batches": lr.local_batches,
                "samples": lr.local_samples, "seen": lr.seen.sorted()}
        everyone = group.gather(mine)
        for other in everyone:
            lr.ledger.merge_trained(other["trained"])
            lr.seen.update(other["seen"])
        lr.batches_trained = lr.resumed_batches + sum(o["batches"] for o in everyone)
        lr.samples_trained = lr.resumed_samples + sum(o["samples"] for o in everyone)

    def _leader_duties(self, ingest: Ingest, outbox: Outbox, last_message: float) -> int:
        """Checkpoint and acks with the union ledger; whether the run is over (a flag)."""
        cfg, lr = self.cfg, self.learner
        if lr.batches_trained - lr.checkpointed_batches >= cfg.checkpoint_every:
            self.checkpoint()
        if self._owed:
            self._ack_finished_edges()
        if lr.fleet.complete():
            return COMPLETE
        if time.time() - last_message > cfg.idle_timeout:
            log.warning("no message for %g s on any worker; finishing", cfg.idle_timeout)
            return IDLE
        return 0

    def _worker_summary(self, end: str, ingest: Ingest) -> dict[str, Any]:
        """What a non-leader worker reports: its own share (the leader writes the run's)."""
        lr = self.learner
        return {"worker": self.group.rank if self.group else 0, "end": end,
                "batches_trained_here": lr.local_batches, "samples_trained_here": lr.local_samples,
                "claims_lost": self.group.lost_claims if self.group else 0,
                "queue_wait": ingest.waits.summary()}

    def _loop(self, ingest: Ingest, outbox: Outbox, stop: threading.Event | None) -> str:
        cfg, lr = self.cfg, self.learner
        status_topic = topics.status_topic(self.run_id, CLOUD_DEVICE)
        bar = tqdm(desc="cloud", unit="batch", initial=lr.batches_trained, file=sys.stderr,
                   disable=cfg.quiet or not show_progress(), dynamic_ncols=True,
                   mininterval=0.5)
        last_status = last_postfix = time.monotonic()
        try:
            while True:
                if stop is not None and stop.is_set():
                    return "stopped"
                item = ingest.take(timeout=0.2)
                if item is not None:
                    self._dispatch(item, bar)
                self._post_averages()  # --fleet-average: a round may be due by now
                if lr.fleet.complete():
                    self._drain(ingest, bar)
                    return "complete"
                if item is None and ingest.idle_for() > cfg.idle_timeout:
                    log.warning("no message for %g s; finishing", cfg.idle_timeout)
                    return "idle"
                now = time.monotonic()
                if now - last_postfix >= 0.5 and not bar.disable:
                    counts = " ".join(f"{d}={v['trained']}"
                                      for d, v in lr.fleet.per_device().items())
                    bar.set_postfix_str(f"{counts} q={ingest.queue.qsize()}", refresh=False)
                    last_postfix = now
                if self._link.connects != self._acked_connects:
                    self.post_ack()  # reconnected: the broker may have lost what it held
                if now - last_status >= cfg.status_every:
                    outbox.post(status_topic, self.status(
                        "training", queue_depth=ingest.queue.qsize()).encode(), retain=True)
                    self.write_fleet_status(ingest, "training")
                    last_status = now
        finally:
            bar.close()

    def _dispatch(self, item: Any, bar: Any) -> None:
        lr = self.learner
        if isinstance(item, ActItem):
            device = item.batch.device_id
            for topic, payload in lr.train_batch(item):
                assert self._outbox is not None  # replies only while running
                self._outbox.post(topic, payload)  # in order with the status, off this thread
                self.bytes_down[device] = self.bytes_down.get(device, 0) + len(payload)
            lr.last_batch_unix = time.time()
            bar.update(1)
            self._periodic()
        elif isinstance(item, StatusItem):
            lr.on_status(item)
            if item.status.state == "done":
                self._owed.add(item.device)
        elif isinstance(item, WeightsItem):
            lr.on_weights(item)
            self._post_averages()
        if self._owed and self.group is None:  # a group's leader does it with the union
            self._ack_finished_edges()

    def _post_averages(self) -> None:
        """``--fleet-average``: publish (retained) the averages the learner says are due.

        A decided round is checkpointed at once: a restarted trainer must not decide it
        again from the retained weights it finds, some of which are of later epochs by then.
        """
        if self._outbox is None:
            return
        if self.learner.average_due():
            self.checkpoint()
        for topic, payload in self.learner.average_deliveries():
            self._outbox.post(topic, payload, retain=True)
            device = topics.parse_topic(topic)[1]
            self.bytes_down[device] = self.bytes_down.get(device, 0) + len(payload)

    def _ack_finished_edges(self) -> None:
        """Checkpoint and ack at once for an edge that is done and whose batches are all
        trained, instead of at the next periodic checkpoint (which may never come: the last
        ``checkpoint_every`` batches of a run, a short run, the other edges done already).

        The edge waits for that ack before it exits (edge_runtime.confirm). Every "done"
        status asks again, so an edge resumed after its last batch, whose batches were
        all checkpointed before, gets its ack too (it costs an ack, not a checkpoint).
        """
        lr = self.learner
        for device in sorted(self._owed):
            st = lr.fleet.statuses.get(device)
            if st is None or st.state != "done":
                self._owed.discard(device)
                continue
            if not lr.ledger.covers(device, st.batches_published):
                continue  # resends still on the way
            self._owed.discard(device)
            if _covers(lr.checkpointed.get(device), st.batches_published):
                self.post_ack([device])
            else:
                log.info("edge %s is done and complete: checkpoint and ack", device)
                self.checkpoint()

    def _drain(self, ingest: Ingest, bar: Any, quiet_s: float = 0.5, max_s: float = 3.0) -> None:
        """Take what is still arriving after the done rule held (bounded).

        MQTT orders messages per topic only, so an edge's final weights may land
        just after its "done" status; the final evaluation should use them.
        """
        deadline = time.monotonic() + max_s
        while time.monotonic() < deadline:
            item = ingest.take(timeout=quiet_s)
            if item is None:
                return
            self._dispatch(item, bar)

    def _periodic(self) -> None:
        cfg, lr = self.cfg, self.learner
        if lr.batches_trained % cfg.log_every == 0:
            lr.log_train_line()
        if cfg.eval_every and lr.batches_trained % cfg.eval_every == 0:
            lr.request_evaluation(None, "eval_every")
        if lr.since_checkpoint >= cfg.checkpoint_every:
            self.checkpoint()

    def _finish(self, end: str, ingest: Ingest, link: Any, wall_s: float) -> dict[str, Any]:
        """Final evaluations, checkpoint, models, curves and ``cloud_summary.json``."""
        lr = self.learner
        missing = [] if end == "complete" else lr.fleet.incomplete()
        # the averaged edge first: the final evaluations leave the final model's edge behind
        if lr.evaluate_average("final") is not None and lr.fleet_model.averager is not None:
            save_fleet_model(self.run_dir, lr.evaluated_edge, lr.cloud, lr.model_lock)
        final, per_device_acc = lr.final_evaluations()
        self.checkpoint()
        save_final_models(self.run_dir, lr.evaluated_edge, lr.cloud, lr.model_lock)
        save_curves(self.run_dir, lr.metrics.records,
                    title=f"{lr.manifest.model_name} run {self.run_id}")
        summary = build_summary(
            run_id=self.run_id, mode=self.mode, end=end, missing=missing,
            batches_trained=lr.batches_trained, samples_trained=lr.samples_trained,
            resumed_batches=lr.resumed_batches, per_device=lr.fleet.per_device(),
            dropped=lr.drops.snapshot(), final=final, per_device_acc=per_device_acc,
            evaluator=lr.evaluator, wall_s=wall_s, last_batch_unix=lr.last_batch_unix,
            ingest=ingest, link=link, bytes_down=self.bytes_down,
        )
        summary["seen_classes"] = lr.seen.sorted()  # what evaluation and inference masked to
        summary["compute"] = lr.place.describe()
        summary["queue_wait"] = ingest.waits.summary()
        summary["ack_bytes"] = dict(sorted(self.ack_bytes.items()))
        summary["fleet_model"] = lr.fleet_model.report(lr.registry.expected())
        write_summary(self.run_dir, summary)
        self.write_fleet_status(ingest, "done" if not missing else "incomplete")
        return summary


def _end_session(link: Any, complete: bool) -> None:
    """A complete run needs no broker session any more: nothing it could still queue matters."""
    inner = link
    while hasattr(inner, "inner"):  # through shaping (and other) wrappers
        inner = inner.inner
    inner.end_session = complete


def _covers(trained: Any, n: int) -> bool:
    """Whether a checkpointed trained set (``{"low": L, "above": [...]}``) holds seqs
    ``0..n-1``."""
    if not isinstance(trained, dict):
        return n <= 0
    low, above = int(trained.get("low", 0)), set(trained.get("above", ()))
    return all(seq in above for seq in range(low, n))
