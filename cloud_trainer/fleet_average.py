"""``--fleet-average``: average the edges' segments every epoch (FedAvg) and send the average back.

Why: each robot trains its own copy of the edge on its own data; on a fleet whose robots see
different data those copies drift apart, and the shared cloud segment has to serve all of them.
Averaging the edges at each epoch end gives the fleet one edge (the fleet's model) and every
robot starts its next epoch from it.

The rule, per edge epoch k (a *round*):

* every ht edge publishes its weights at the end of epoch k, with the samples and labels it
  trained that epoch (``toolkit.core.protocol.fleet_average``);
* the round is decided as soon as every device the round waits for has delivered epoch k, or
  ``wait_s`` seconds after the first delivery of epoch k, whichever comes first. A round does
  not wait for a device that is done, offline or in error, nor for one that missed the previous
  round and has sent nothing since: a dead robot costs the fleet one wait, not one per epoch;
* at the deadline, fewer than ``quorum`` deliveries skip the round (the edges time out and go
  on with their own weights); otherwise the average is taken over those that delivered;
* the average is sample-weighted (``samples`` of that epoch), over every tensor of the edge's
  public state: parameters, exit head and BatchNorm running statistics alike. Integer tensors
  (``num_batches_tracked``) get the weighted mean rounded to an integer: every device goes on
  from a count typical of one device (it only matters to a BatchNorm with ``momentum=None``);
* the average goes to every device of the run on its own retained ``.../<device>/average``
  topic, tagged with that device's attempt; a device whose epoch-k weights arrive after round k
  was decided gets the latest average at once (it was late, not lost).

Everything here is pure bookkeeping and tensor arithmetic with an injectable clock, so the
tests drive it without a broker; the training loop (``cloud_trainer.loop``) asks :meth:`due`
and publishes what :meth:`deliveries` says.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from toolkit.core.errors import HiertrainError
from toolkit.core.protocol import topics
from toolkit.core.protocol.fleet_average import Contribution, FleetAverage, encode_average

log = logging.getLogger(__name__)

AVERAGE_SOURCE = "fleet average"
"""The evaluation source name of the averaged edge (a space: never a device id)."""
GONE_STATES = ("done", "offline", "error")
"""A device in one of these states is not waited for (it delivers nothing more)."""


def average_states(states: Sequence[Mapping[str, torch.Tensor]],
                   weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The ``weights``-weighted mean of ``states`` (same keys and shapes), tensor by tensor.

    Floating tensors are averaged in float64 and returned in their own dtype; integer tensors
    (``num_batches_tracked``) get the weighted mean rounded to the nearest integer.
    """
    if not states or len(states) != len(weights):
        raise ValueError("average_states needs one weight per state, and at least one state")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError("average_states needs weights with a positive sum")
    shares = [float(w) / total for w in weights]
    out: dict[str, torch.Tensor] = {}
    for key, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, share in zip(states, shares, strict=True):
            acc += state[key].detach().to(torch.float64) * share
        out[key] = acc.to(first.dtype) if first.is_floating_point() else acc.round().to(
            first.dtype)
    return out


@dataclass
class AverageRound:
    """One decided round: the average of epoch ``epoch`` over ``devices``."""

    epoch: int
    devices: list[str]
    samples: dict[str, int]
    state: dict[str, torch.Tensor]
    decided: float = field(default_factory=time.time)


@dataclass
class _Pending:
    first: float  # monotonic time of the round's first delivery
    items: dict[str, tuple[int, dict[str, torch.Tensor]]] = field(default_factory=dict)


class FleetAverager:
    """Collects each epoch's edge weights and decides the rounds (see the module docstring).

    ``expected()``: the devices of the run the rounds may wait for, and whether that roster is
    complete (``--devices N`` before N came online is not); ``state_of(device)``: its latest
    state (``online``, ``training``, ``done``...) or None.
    """

    def __init__(self, run_id: str, *, wait_s: float, quorum: int,
                 expected: Callable[[], tuple[list[str], bool]],
                 state_of: Callable[[str], str | None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not wait_s > 0:
            raise HiertrainError(f"--fleet-average-wait must be > 0 seconds, got {wait_s}")
        if quorum < 1:
            raise HiertrainError(f"--fleet-average-quorum must be >= 1, got {quorum}")
        self.run_id = run_id
        self.wait_s = wait_s
        self.quorum = quorum
        self.expected = expected
        self.state_of = state_of
        self.clock = clock
        self._pending: dict[int, _Pending] = {}
        self.decided_epoch = -1  # rounds up to this epoch are decided (averaged or skipped)
        self.latest: AverageRound | None = None
        self.rounds = 0
        self.skipped: list[int] = []
        self.history: list[dict[str, Any]] = []  # per decided round: who, how long it waited
        self.attempts: dict[str, str] = {}  # device -> attempt of its latest weights
        self.sent: dict[str, tuple[int, str]] = {}  # device -> (epoch, attempt) last sent
        self._missed: set[str] = set()  # missed the last round and sent nothing since

    # ------------------------------------------------------------------ intake
    def offer(self, device: str, contribution: Contribution,
              state: Mapping[str, torch.Tensor]) -> None:
        """One device's weights at the end of ``contribution.epoch``."""
        if contribution.attempt is not None:
            self.attempts[device] = contribution.attempt
        self._missed.discard(device)
        epoch = contribution.epoch
        if epoch <= self.decided_epoch:
            log.info("fleet average: %s delivered epoch %d after its round was decided; it "
                     "gets the latest average", device, epoch + 1)
            return
        samples = contribution.samples
        if samples is None:
            log.warning("fleet average: %s sent no sample count (an older edge runtime?); "
                        "it counts as one sample", device)
            samples = 1
        pending = self._pending.setdefault(epoch, _Pending(first=self.clock()))
        pending.items[device] = (samples, {k: v.detach().cpu() for k, v in state.items()})

    # -------------------------------------------------------------- decisions
    def waiting_for(self, epoch: int) -> list[str]:
        """Devices round ``epoch`` still waits for (delivered ones and gone ones excluded)."""
        pending = self._pending.get(epoch)
        have = set(pending.items) if pending else set()
        roster, _ = self.expected()
        return [d for d in roster if d not in have and d not in self._missed
                and self.state_of(d) not in GONE_STATES]

    def due(self) -> AverageRound | None:
        """Decide the oldest undecided round if it is ready; the new average, or None."""
        while self._pending:
            epoch = min(self._pending)
            pending = self._pending[epoch]
            _, complete = self.expected()
            everyone = complete and not self.waiting_for(epoch)
            late = self.clock() - pending.first >= self.wait_s
            if not everyone and not late:
                return None
            del self._pending[epoch]
            roster, _ = self.expected()
            self.decided_epoch = epoch
            self.history.append({"epoch": epoch, "devices": sorted(pending.items),
                                 "waited_s": round(self.clock() - pending.first, 3),
                                 "averaged": len(pending.items) >= self.quorum})
            if len(pending.items) < self.quorum:
                self.skipped.append(epoch)
                self._missed = set(roster) - set(pending.items)
                log.warning("fleet average: no average for epoch %d: %d device(s) delivered in "
                            "%g s, fewer than the quorum of %d; the edges go on with their own "
                            "weights", epoch + 1, len(pending.items), self.wait_s, self.quorum)
                continue
            devices = sorted(pending.items)
            samples = {d: pending.items[d][0] for d in devices}
            state = average_states([pending.items[d][1] for d in devices],
                                   [samples[d] for d in devices])
            self._missed = set(roster) - set(devices)
            self.latest = AverageRound(epoch=epoch, devices=devices, samples=samples,
                                       state=state)
            self.rounds += 1
            absent = sorted(self._missed)
            log.info("fleet average of epoch %d over %d device(s) (%d samples)%s", epoch + 1,
                     len(devices), sum(samples.values()),
                     f"; without {', '.join(absent)} (the wait of {self.wait_s:g} s ran out)"
                     if absent else "")
            return self.latest
        return None

    def deliveries(self) -> list[tuple[str, bytes]]:
        """``(topic, payload)`` of the latest average for every device that has not got it
        for its current attempt yet; marks them sent."""
        avg = self.latest
        if avg is None:
            return []
        out = []
        for device, attempt in sorted(self.attempts.items()):
            if self.sent.get(device) == (avg.epoch, attempt):
                continue
            meta = FleetAverage(run=self.run_id, epoch=avg.epoch, attempt=attempt,
                                devices=tuple(avg.devices), samples=dict(avg.samples))
            out.append((topics.average_topic(self.run_id, device),
                        encode_average(avg.state, meta)))
            self.sent[device] = (avg.epoch, attempt)
        return out

    # -------------------------------------------------------------- reporting, checkpoint
    def describe(self) -> dict[str, Any]:
        """The figures of the fleet status and the summary."""
        avg = self.latest
        return {"wait_s": self.wait_s, "quorum": self.quorum, "rounds": self.rounds,
                "skipped_epochs": list(self.skipped),
                "last_epoch": None if avg is None else avg.epoch,
                "last_devices": None if avg is None else list(avg.devices),
                "last_samples": None if avg is None else sum(avg.samples.values()),
                "pending_epochs": sorted(self._pending), "history": list(self.history)}

    def state_dict(self) -> dict[str, Any]:
        """What a restarted trainer needs: the rounds decided and the latest average.
        Undelivered contributions are not kept: the edges' retained weights arrive again."""
        avg = self.latest
        return {"decided_epoch": self.decided_epoch, "rounds": self.rounds,
                "skipped": list(self.skipped), "history": list(self.history),
                "attempts": dict(self.attempts),
                "sent": {d: [e, a] for d, (e, a) in self.sent.items()},
                "latest": None if avg is None else {
                    "epoch": avg.epoch, "devices": list(avg.devices),
                    "samples": dict(avg.samples), "state": dict(avg.state),
                    "decided": avg.decided}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decided_epoch = int(state.get("decided_epoch", -1))
        self.rounds = int(state.get("rounds", 0))
        self.skipped = [int(e) for e in state.get("skipped", [])]
        self.history = [dict(h) for h in state.get("history", [])]
        self.attempts = {str(d): str(a) for d, a in dict(state.get("attempts", {})).items()}
        self.sent = {str(d): (int(v[0]), str(v[1]))
                     for d, v in dict(state.get("sent", {})).items()}
        latest = state.get("latest")
        if latest:
            self.latest = AverageRound(epoch=int(latest["epoch"]),
                                       devices=[str(d) for d in latest["devices"]],
                                       samples={str(k): int(v)
                                                for k, v in dict(latest["samples"]).items()},
                                       state=dict(latest["state"]),
                                       decided=float(latest.get("decided", 0.0)))
