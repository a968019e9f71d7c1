"""The fleet's averaged edge on the wire, and what an edge's epoch weights say about their data.

Both sides import this module (the cloud averages and sends, the edge waits and loads), so the
fields are spelled once, here.

**Contribution** (edge -> cloud): the retained epoch weights every ht edge publishes on
``hiertrain/<run>/<device>/weights`` (``messages.encode_weights``) carry in their JSON meta,
next to ``run``, ``device``, ``epoch`` and ``last_seq``::

    "samples": 1280,                 samples trained in that epoch: the device's weight in the
                                     average (FedAvg weights by data, not by device)
    "label_counts": [130, 0, 412, ...]  labels trained in that epoch, per class: the device's
                                     label distribution, for the per-device evaluation
    "attempt": "9f2c01ab"            random id of this training attempt (kept by --resume)

**Average** (cloud -> edge, retained, on each device's own ``hiertrain/<run>/<device>/average``):
the same weights format (checked header, CRC, ``weights_only`` state dict) with this meta::

    {"schema": "hiertrain.fleet_average", "v": 1, "run": "r1", "epoch": 3,
     "attempt": "9f2c01ab", "devices": ["a", "b"], "samples": {"a": 1280, "b": 960},
     "time": 1764160000.0}

``epoch`` is the edges' epoch whose end weights were averaged: an edge that finished epoch k
starts epoch k+1 from it. ``attempt`` is the *receiving* device's attempt: an edge loads only an
average made for its own attempt, so the retained average of an earlier run under the same run
id is never loaded by a fresh one. ``devices`` and ``samples`` say who is in it (a device
missing from ``devices`` was late or absent and still gets the average).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from toolkit.core.errors import WireError
from toolkit.core.protocol.messages import decode_weights, encode_weights

AVERAGE_SCHEMA = "hiertrain.fleet_average"
AVERAGE_VERSION = 1
_ATTEMPT_LEN = 8


def new_attempt() -> str:
    """A fresh attempt id (8 hex digits): a new one per fresh start, the old one on --resume."""
    return secrets.token_hex(_ATTEMPT_LEN // 2)


def contribution_meta(*, samples: int, label_counts: list[int], attempt: str) -> dict[str, Any]:
    """The fields an epoch's weights add to their meta (see the module docstring); counts
    that do not add up to ``samples`` (an epoch resumed from an older checkpoint) are left out
    rather than sent wrong."""
    meta: dict[str, Any] = {"samples": int(samples), "attempt": attempt}
    if label_counts and sum(label_counts) == samples:
        meta["label_counts"] = [int(c) for c in label_counts]
    return meta


@dataclass(frozen=True)
class Contribution:
    """The contribution fields of one epoch's weights meta, checked (None: not sent)."""

    epoch: int
    samples: int | None
    label_counts: tuple[int, ...] | None
    attempt: str | None


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_contribution(meta: Mapping[str, Any], num_classes: int) -> Contribution:
    """The contribution of a weights meta; WireError (reason ``weights``) on a bad field.

    The meta is input from the network, and the cloud does arithmetic with it (weights of an
    average, a distribution), so every field is checked: counts are non-negative integers,
    ``label_counts`` has one per class and sums to ``samples``.
    """
    epoch = meta.get("epoch")
    if not _count(epoch):
        raise WireError(f"weights meta has a bad epoch {str(epoch)[:20]!r}", reason="weights")
    samples = meta.get("samples")
    if samples is not None and not _count(samples):
        raise WireError(f"weights meta has bad samples {str(samples)[:20]!r}", reason="weights")
    counts = meta.get("label_counts")
    if counts is not None:
        if (not isinstance(counts, list) or len(counts) != num_classes
                or not all(_count(c) for c in counts)):
            raise WireError(f"weights meta label_counts is not {num_classes} counts",
                            reason="weights")
        if samples is not None and sum(counts) != samples:
            raise WireError("weights meta label_counts do not add up to its samples",
                            reason="weights")
        counts = tuple(counts)
    attempt = meta.get("attempt")
    if attempt is not None and (not isinstance(attempt, str) or not 0 < len(attempt) <= 64):
        raise WireError("weights meta has a bad attempt id", reason="weights")
    return Contribution(epoch=epoch, samples=samples, label_counts=counts, attempt=attempt)


@dataclass(frozen=True)
class FleetAverage:
    """Who and what an average message is: everything but its tensors."""

    run: str
    epoch: int
    attempt: str
    devices: tuple[str, ...]
    samples: dict[str, int]
    time: float = field(default_factory=time.time)

    def meta(self) -> dict[str, Any]:
        return {"schema": AVERAGE_SCHEMA, "v": AVERAGE_VERSION, "run": self.run,
                "epoch": self.epoch, "attempt": self.attempt, "devices": list(self.devices),
                "samples": dict(self.samples), "time": self.time}


def encode_average(state: Mapping[str, torch.Tensor], average: FleetAverage) -> bytes:
    return encode_weights(dict(state), average.meta())


def decode_average(data: bytes) -> tuple[FleetAverage, dict[str, torch.Tensor]]:
    """The average and its state dict; WireError (reason ``average`` or the weights format's)
    on anything else."""
    meta, state = decode_weights(data)
    if meta.get("schema") != AVERAGE_SCHEMA:
        raise WireError(f"average message lacks schema {AVERAGE_SCHEMA!r}", reason="average")
    if meta.get("v") != AVERAGE_VERSION:
        raise WireError(f"average message version {meta.get('v')!r} is not {AVERAGE_VERSION}",
                        reason="version")
    try:
        devices = tuple(str(d) for d in meta["devices"])
        samples = {str(k): int(v) for k, v in dict(meta["samples"]).items()}
        average = FleetAverage(run=str(meta["run"]), epoch=int(meta["epoch"]),
                               attempt=str(meta["attempt"]), devices=devices, samples=samples,
                               time=float(meta.get("time", 0.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"average message is malformed: {exc}", reason="average") from None
    if average.epoch < 0 or not math.isfinite(average.time):
        raise WireError("average message has a bad epoch or time", reason="average")
    return average, state
