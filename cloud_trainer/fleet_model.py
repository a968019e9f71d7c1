"""The fleet's model, measured: each device's full model and the averaged edge, on the global
test set and on each device's own label distribution.

Why both test distributions: on a fleet whose robots see different data, a robot's own full
model (its edge with the shared cloud segment) can score well on the classes it sees and badly
on the rest. The global test set says how good a model is for the whole fleet; the device's
label distribution (the per-class accuracies weighted by the labels it trained on, from its
weights meta) says how good it is *for that robot*. The averaged edge (``--fleet-average``, or
else a one-shot average of the final edges, computed here for comparison) is scored on both.

The cloud learns each device's label distribution from the ``label_counts`` of its epoch
weights (``toolkit.core.protocol.fleet_average``): nothing extra on the wire, and the same in a
group of workers (weights go to every worker).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from cloud_trainer.evaluate import ClassScores
from cloud_trainer.fleet_average import AVERAGE_SOURCE, FleetAverager, average_states
from toolkit.core.protocol.fleet_average import Contribution

log = logging.getLogger(__name__)

ONE_SHOT = "one-shot"
"""The kind of an average computed at the end from each device's final edge (no averaging
during the run)."""
ROUNDS = "rounds"
"""The kind of the average the run sent to the devices (``--fleet-average``)."""


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


class FleetModel:
    """Per device: label distribution, samples of its latest epoch; per evaluated edge (a device
    or the average): per-class scores of its latest evaluation; the averager, if any."""

    def __init__(self, averager: FleetAverager | None) -> None:
        self.averager = averager
        self.label_counts: dict[str, tuple[int, ...]] = {}
        self.samples: dict[str, int] = {}
        self.scores: dict[str, ClassScores] = {}
        # what the last scored AVERAGE_SOURCE was: ROUNDS or ONE_SHOT, whose, which epoch
        self.average_kind: str | None = ROUNDS if averager is not None else None
        self.average_devices: list[str] = []
        self.average_epoch: int | None = None

    # ------------------------------------------------------------------ intake
    def on_round(self, devices: list[str]) -> None:
        """A round was decided (``--fleet-average``): the average scored next is its."""
        self.average_devices = list(devices)

    def on_contribution(self, device: str, contribution: Contribution,
                        state: Mapping[str, torch.Tensor]) -> None:
        if contribution.label_counts is not None:
            self.label_counts[device] = contribution.label_counts
        if contribution.samples is not None:
            self.samples[device] = contribution.samples
        if self.averager is not None:
            self.averager.offer(device, contribution, state)

    def record(self, source: str, scores: ClassScores, epoch: int | None = None) -> None:
        """The latest evaluation of ``source`` (a device, or the average of ``epoch``)."""
        self.scores[source] = scores
        if source == AVERAGE_SOURCE:
            self.average_epoch = epoch

    # ------------------------------------------------------------------ the average
    def average_state(self, weights: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor],
                                                                  int | None] | None:
        """The averaged edge to score: the latest round's (``--fleet-average``), else the
        sample-weighted one-shot average of each device's latest weights (``weights``:
        device -> WeightsItem); None without any."""
        if self.averager is not None:
            avg = self.averager.latest
            if avg is None:
                return None
            self.average_devices = list(avg.devices)
            return avg.state, avg.epoch
        if not weights:
            return None
        devices = sorted(weights)
        states = [weights[d].state for d in devices]
        share = [self.samples.get(d, 1) for d in devices]
        self.average_kind, self.average_devices = ONE_SHOT, devices
        epochs = {weights[d].meta.get("epoch") for d in devices}
        return average_states(states, share), (epochs.pop() if len(epochs) == 1 else None)

    # ------------------------------------------------------------------ reports
    def accuracy_on_labels(self, source: str, device: str, exit_head: bool = False
                           ) -> float | None:
        """``source``'s (a device's edge, or the average) accuracy on ``device``'s labels."""
        scores = self.scores.get(source)
        counts = self.label_counts.get(device)
        if scores is None or counts is None:
            return None
        return _r(scores.weighted(counts, exit_head))

    def device_rows(self, devices: list[str]) -> dict[str, dict[str, Any]]:
        """Per device: its own full model and the average, globally and on its distribution."""
        rows = {}
        avg = self.scores.get(AVERAGE_SOURCE)
        for d in devices:
            own = self.scores.get(d)
            counts = self.label_counts.get(d)
            rows[d] = {
                "samples_last_epoch": self.samples.get(d),
                "label_share": None if counts is None else [
                    round(c / max(1, sum(counts)), 4) for c in counts],
                "own_full_accuracy": None if own is None else _r(own.full_accuracy),
                "own_full_accuracy_on_own_labels": self.accuracy_on_labels(d, d),
                "own_exit_accuracy_on_own_labels": self.accuracy_on_labels(d, d, exit_head=True),
                "average_full_accuracy_on_own_labels": None if avg is None
                else self.accuracy_on_labels(AVERAGE_SOURCE, d),
            }
        return rows

    def report(self, devices: list[str]) -> dict[str, Any]:
        """The summary's ``fleet_model`` section (``docs/fleet.md``, "The fleet's model")."""
        rows = self.device_rows(devices)
        avg = self.scores.get(AVERAGE_SOURCE)

        def mean(key: str) -> float | None:
            vals = [r[key] for r in rows.values() if r[key] is not None]
            return _r(sum(vals) / len(vals)) if vals else None

        return {
            "averaging": self.averager is not None,
            "devices": rows,
            "mean_own_full_accuracy": mean("own_full_accuracy"),
            "mean_own_full_accuracy_on_own_labels": mean("own_full_accuracy_on_own_labels"),
            "average": None if avg is None else {
                "kind": self.average_kind, "epoch": self.average_epoch,
                "devices": self.average_devices,
                "full_accuracy": _r(avg.full_accuracy),
                "exit_accuracy": _r(avg.exit_accuracy),
                "mean_full_accuracy_on_device_labels": mean(
                    "average_full_accuracy_on_own_labels"),
            },
            "rounds": None if self.averager is None else self.averager.describe(),
        }

    def status(self, devices: list[str]) -> dict[str, Any]:
        """The fleet status's ``fleet_model`` section: the same figures, as evaluated so far."""
        return self.report(devices)
