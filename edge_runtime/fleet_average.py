"""``edge-runtime train --fleet-average``: start each epoch from the fleet's averaged edge.

At the end of epoch k the edge has published its weights (with the epoch's samples and labels,
``toolkit.core.protocol.fleet_average``); the cloud trainer run with ``--fleet-average`` averages
the fleet's edges and publishes the average, retained, on this device's own
``hiertrain/<run>/<device>/average``. Here the edge waits for it, bounded by
``--fleet-average-wait``, loads it and trains epoch k+1 from it. Also after the last epoch: the
edge then ends with the fleet's model in ``edge_weights-<device>.pt``.

Choices, and why:

* **Opt-in on the edge too**, not automatic: a robot that silently swapped its weights because
  some trainer said so would be a surprise; ``--fleet-average`` says it will. If the trainer's
  status says it does not average, the edge does not wait (one warning).
* **Bounded wait, then the device's own weights.** A dead robot elsewhere, a cloud restart or a
  broker outage must not stop this one; the log says so each time, the report counts it.
  Keep the edge's bound above the cloud's (``cloud-trainer --fleet-average-wait``): the cloud
  publishes a partial average when its wait runs out, and the edge should still be there.
* **Momentum restarts from zero** after loading an average. The SGD buffers are the velocity of
  the weights this device had, not of the average: carried over they would push every device
  back along its own direction, undoing part of the average. With the reset every device
  starts the epoch from the same point in the same state, on either backend (the epoch-end
  checkpoint, written after the load, holds the cleared buffers, so a resumed edge starts it
  alike). The learning-rate schedule is not touched.
* **Only an average for this attempt** (the id in the edge's checkpoint, new at every fresh
  start) and for this epoch or a later one: a retained average left on the broker by an earlier
  run with the same run id is never loaded.

The MQTT callback only keeps the newest payload (paho's thread); decoding and loading happen
on the training thread, in :meth:`FleetAverageFollower.after_epoch`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from edge_runtime.backends import EdgeBackend
from toolkit.core.errors import HiertrainError, WireError
from toolkit.core.protocol.fleet_average import FleetAverage, decode_average
from toolkit.core.protocol.topics import average_topic
from toolkit.core.transport import Link

log = logging.getLogger("edge_runtime")

DEFAULT_WAIT_S = 180.0
"""--fleet-average-wait on the edge: above the cloud's default (120 s), see the docstring."""


class FleetAverageFollower:
    """Receives this device's averages; :meth:`after_epoch` waits for one and loads it."""

    def __init__(self, link: Link, run: str, device: str, attempt: str, wait_s: float, *,
                 trainer_averages: Callable[[], bool | None] = lambda: None) -> None:
        """``trainer_averages()``: whether the trainer's status says it averages (None:
        unknown, e.g. no status yet)."""
        if not wait_s > 0:
            raise HiertrainError(f"--fleet-average-wait must be > 0 seconds, got {wait_s}")
        self.run = run
        self.device = device
        self.attempt = attempt
        self.wait_s = wait_s
        self.trainer_averages = trainer_averages
        self._cond = threading.Condition()
        self._payload: bytes | None = None
        self._arrivals = 0
        self.loaded = 0
        self.missed = 0
        self.wait_total_s = 0.0
        self._warned_trainer = False
        link.subscribe(average_topic(run, device), self._on_message)

    def _on_message(self, topic: str, payload: bytes, props: dict[str, Any]) -> None:
        with self._cond:
            self._payload = bytes(payload)
            self._arrivals += 1
            self._cond.notify_all()

    def _check(self, payload: bytes | None, epoch: int
               ) -> tuple[FleetAverage, dict[str, torch.Tensor]] | None:
        """``payload`` if it is an average for this attempt of ``epoch`` or later."""
        if not payload:  # nothing yet, or a retained message cleared
            return None
        try:
            average, state = decode_average(payload)
        except WireError as exc:
            log.warning("ignored an average message: %s", exc)
            return None
        if average.run != self.run or average.attempt != self.attempt or average.epoch < epoch:
            return None
        return average, state

    def wait(self, epoch: int) -> tuple[FleetAverage, dict[str, torch.Tensor]] | None:
        """The average of ``epoch`` (or a later one) for this attempt, within the bound."""
        deadline = time.monotonic() + self.wait_s
        checked = -1
        while True:
            with self._cond:
                payload, arrivals = self._payload, self._arrivals
            if arrivals != checked:
                checked = arrivals
                got = self._check(payload, epoch)
                if got is not None:
                    return got
            if self.trainer_averages() is False:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            with self._cond:
                if self._arrivals == checked:
                    self._cond.wait(min(left, 1.0))

    def after_epoch(self, backend: EdgeBackend, epoch: int, epochs: int) -> dict[str, Any]:
        """Wait for epoch ``epoch``'s average and load it (momentum restarts); what happened,
        for the epoch's history entry."""
        if self.trainer_averages() is False:
            if not self._warned_trainer:
                self._warned_trainer = True
                log.warning("--fleet-average: the cloud trainer says it does not average "
                            "(run it with --fleet-average); going on with this device's own "
                            "weights")
            self.missed += 1
            return {"loaded": False, "reason": "the trainer does not average"}
        what = "the next epoch" if epoch + 1 < epochs else "the end of the run"
        log.info("epoch %d/%d done: waiting up to %g s for the fleet's average "
                 "(--fleet-average)", epoch + 1, epochs, self.wait_s)
        t0 = time.monotonic()
        got = self.wait(epoch)
        waited = time.monotonic() - t0
        self.wait_total_s += waited
        if got is None:
            self.missed += 1
            why = ("the cloud trainer says it does not average"
                   if self.trainer_averages() is False else
                   f"no fleet average of epoch {epoch + 1} within {self.wait_s:g} s "
                   "(--fleet-average-wait)")
            log.warning("%s: %s goes on with this device's own weights", why, what)
            return {"loaded": False, "wait_s": round(waited, 3), "reason": why}
        average, state = got
        merged = backend.state_dict()
        unknown = [k for k in state if k not in merged]
        if unknown:
            raise HiertrainError(f"the fleet's average has keys this edge model lacks "
                                 f"({', '.join(unknown[:3])}): the cloud trainer runs other "
                                 "artifacts; export once and give both sides the same")
        merged.update(state)  # keys the board keeps to itself (a proxy decoder) stay its own
        backend.load_state_dict(merged)
        backend.reset_optimizer()
        self.loaded += 1
        ahead = "" if average.epoch == epoch else f" (the fleet is at epoch {average.epoch + 1})"
        log.info("%s starts from the fleet's average of %d device(s), %d samples%s, after "
                 "%.1f s", what[0].upper() + what[1:], len(average.devices),
                 sum(average.samples.values()), ahead, waited)
        return {"loaded": True, "epoch": average.epoch, "devices": list(average.devices),
                "samples": sum(average.samples.values()), "wait_s": round(waited, 3)}

    def describe(self) -> dict[str, Any]:
        return {"wait_s": self.wait_s, "loaded": self.loaded, "missed": self.missed,
                "waited_s": round(self.wait_total_s, 3), "attempt": self.attempt}


def check_options(fleet_average: bool, wait_s: float | None, *, mode: str, live: bool) -> None:
    """``--fleet-average`` and ``--fleet-average-wait``, refused in one line where they cannot
    apply (before any data is loaded)."""
    if not fleet_average:
        if wait_s is not None:
            raise HiertrainError("--fleet-average-wait only applies with --fleet-average; add "
                                 "it or drop the option")
        return
    if mode != "ht":
        raise HiertrainError(f"--fleet-average applies to --mode ht only, not {mode}; drop it")
    if live:
        raise HiertrainError("--fleet-average averages at epoch ends and --live has none; "
                             "drop one of them")
    if wait_s is not None and not wait_s > 0:
        raise HiertrainError(f"--fleet-average-wait must be > 0 seconds, got {wait_s}")


def follower_for(fleet_average: bool, wait_s: float | None, link: Link, run: str, device: str,
                 attempt: str, trainer_averages: Callable[[], bool | None]
                 ) -> FleetAverageFollower | None:
    """The follower of a ``--fleet-average`` run (subscribed now: a retained average arrives
    at once), None otherwise."""
    if not fleet_average:
        return None
    return FleetAverageFollower(link, run, device, attempt,
                                DEFAULT_WAIT_S if wait_s is None else wait_s,
                                trainer_averages=trainer_averages)


def count_labels(counts: list[int], y: torch.Tensor, num_classes: int) -> list[int]:
    """``counts`` (per class; empty: none yet) plus the labels of one batch."""
    batch = torch.bincount(y.to(torch.int64), minlength=num_classes)[:num_classes].tolist()
    if not counts:
        return batch
    return [a + b for a, b in zip(counts, batch, strict=True)]
