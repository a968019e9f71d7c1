"""Per-epoch training time of the three modes, from per-batch stage times and the link.

The equations (docs/plan.md derives them) are plain arithmetic on seconds and
bytes, kept free of torch so they can be checked by hand and called cheaply by
the planner and the benchmark. Only :func:`predict`, the convenience that
prices a measured :class:`~toolkit.plan.profiling.ModelProfile`, consults
``toolkit.plan.traffic`` (and through it ``toolkit.core.protocol.wire``) for exact message sizes,
imported when it is called.

One batch moves through up to five stages: edge compute, uplink transfer,
cloud compute, downlink transfer (split learning only) and the one-way link
latency. How the stages combine is what separates the modes:

* ``ht``: edge, uplink and cloud work on different batches at once (the edge
  never waits for the cloud), a three-stage pipeline:
  ``fill + (n - 1) * max(stage)`` where ``fill = edge + up + latency + cloud``.
* ``split``: every batch waits for its gradient before the next forward, so
  nothing overlaps: ``n * (edge_fwd + up + latency + cloud + down + latency + edge_bwd)``.
* ``cloud``: raw images are uploaded while the cloud trains on earlier ones,
  a two-stage pipeline: ``up + latency + cloud + (n - 1) * max(up, cloud)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from toolkit.core.errors import HiertrainError

if TYPE_CHECKING:
    from toolkit.plan.profiling import ModelProfile

MODES: tuple[str, ...] = ("ht", "split", "cloud")
RAW_BITS = 32
SUPPORTED_BITS: tuple[int, ...] = (2, 4, 8, RAW_BITS)
_STAGES = ("edge_s", "uplink_s", "cloud_s", "downlink_s", "latency_s")


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise HiertrainError(f"{name} must be a positive number, got {value!r}")
    if math.isinf(value):
        raise HiertrainError(f"{name} must be finite, got {value!r}")
    return float(value)


def _non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise HiertrainError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Link:
    """The edge-cloud link: rates in kbit/s (1 kbit = 1000 bits), one-way latency in ms.

    ``down_kbps`` is the cloud-to-edge rate (only split learning uses it); by
    default the link is symmetric.
    """

    kbps: float
    latency_ms: float = 0.0
    down_kbps: float | None = None

    def __post_init__(self) -> None:
        _positive("link rate (kbit/s)", self.kbps)
        _non_negative("link latency (ms)", self.latency_ms)
        if self.down_kbps is not None:
            _positive("downlink rate (kbit/s)", self.down_kbps)

    @property
    def latency_s(self) -> float:
        return self.latency_ms / 1000.0

    def up_s(self, nbytes: float) -> float:
        """Seconds to push ``nbytes`` up the link (serialisation only, no latency)."""
        return nbytes * 8 / (self.kbps * 1000.0)

    def down_s(self, nbytes: float) -> float:
        return nbytes * 8 / ((self.down_kbps or self.kbps) * 1000.0)

    def to_dict(self) -> dict:
        return {"kbps": self.kbps, "latency_ms": self.latency_ms,
                "down_kbps": self.down_kbps or self.kbps}


@dataclass(frozen=True)
class Prediction:
    """One mode's predicted epoch, with where the time goes.

    ``per_batch`` holds one batch's seconds in each stage (``latency_s`` counts
    every one-way trip that batch waits for). ``breakdown`` is the busy time
    of each stage over the epoch; in the pipelined modes the stages overlap,
    and ``epoch_s == sum(breakdown) - overlap_s``.
    """

    mode: str
    epoch_s: float
    n_batches: int
    per_batch: dict[str, float]
    breakdown: dict[str, float]
    overlap_s: float
    bottleneck: str
    up_bytes_per_batch: int
    down_bytes_per_batch: int

    def to_dict(self) -> dict:
        return {
            "mode": self.mode, "epoch_s": self.epoch_s, "n_batches": self.n_batches,
            "per_batch": dict(self.per_batch), "breakdown": dict(self.breakdown),
            "overlap_s": self.overlap_s, "bottleneck": self.bottleneck,
            "up_bytes_per_batch": self.up_bytes_per_batch,
            "down_bytes_per_batch": self.down_bytes_per_batch,
        }


def n_batches(samples: int, batch: int) -> int:
    """Batches in one epoch; a short last batch is priced as a full one (<= 1 batch high)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise HiertrainError(f"samples per epoch must be a positive integer, got {samples!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise HiertrainError(f"batch size must be a positive integer, got {batch!r}")
    return -(-samples // batch)


def pipeline_time(stages: Sequence[float], n: int, latency_s: float = 0.0) -> float:
    """``n`` items through stages that each work on one item at a time, in order.

    The first item takes every stage plus the latency (the fill); after that one
    item leaves every ``max(stages)`` seconds, the rate of the slowest stage.
    Exact for identical items and unbounded buffers between stages.
    """
    if n < 1:
        raise HiertrainError(f"a pipeline needs at least one item, got {n}")
    return sum(stages) + latency_s + (n - 1) * max(stages)


def _pipelined(mode: str, n: int, per_batch: dict[str, float], up_bytes: int,
               down_bytes: int, latency_s: float) -> Prediction:
    busy = {k: per_batch[k] for k in ("edge_s", "uplink_s", "cloud_s")}
    epoch = pipeline_time(list(busy.values()), n, latency_s)
    breakdown = {k: n * per_batch.get(k, 0.0) for k in _STAGES}
    breakdown["latency_s"] = latency_s
    bottleneck = max(busy, key=busy.get).removesuffix("_s")
    return Prediction(
        mode=mode, epoch_s=epoch, n_batches=n, per_batch=per_batch, breakdown=breakdown,
        overlap_s=sum(breakdown.values()) - epoch, bottleneck=bottleneck,
        up_bytes_per_batch=up_bytes, down_bytes_per_batch=down_bytes,
    )


def ht_epoch(n: int, edge_s: float, up_bytes: int, cloud_s: float, link: Link) -> Prediction:
    """Hierarchical training: edge step, upload of the cut activation + labels, cloud step.

    ``edge_s`` is the whole edge step (segment + exit head forward, backward,
    SGD, quantization); ``cloud_s`` the cloud segment's forward, backward and
    step. No gradient comes back, so the three stages overlap across batches.
    """
    per_batch = {"edge_s": edge_s, "uplink_s": link.up_s(up_bytes), "cloud_s": cloud_s,
                 "downlink_s": 0.0, "latency_s": link.latency_s}
    return _pipelined("ht", n, per_batch, up_bytes, 0, link.latency_s)


def split_epoch(n: int, edge_fwd_s: float, edge_bwd_s: float, up_bytes: int, cloud_s: float,
                down_bytes: int, link: Link) -> Prediction:
    """Classic split learning: nothing overlaps, each batch waits for its cut gradient.

    ``cloud_s`` includes the gradient with respect to the cut activation;
    ``edge_bwd_s`` the edge backward from that gradient plus the SGD step.
    """
    per_batch = {"edge_fwd_s": edge_fwd_s, "edge_bwd_s": edge_bwd_s,
                 "edge_s": edge_fwd_s + edge_bwd_s, "uplink_s": link.up_s(up_bytes),
                 "cloud_s": cloud_s, "downlink_s": link.down_s(down_bytes),
                 "latency_s": 2 * link.latency_s}
    stages = {k: per_batch[k] for k in _STAGES}
    breakdown = {k: n * v for k, v in stages.items()}
    return Prediction(
        mode="split", epoch_s=n * sum(stages.values()), n_batches=n, per_batch=per_batch,
        breakdown=breakdown, overlap_s=0.0,
        bottleneck=max(stages, key=stages.get).removesuffix("_s"),
        up_bytes_per_batch=up_bytes, down_bytes_per_batch=down_bytes,
    )


def cloud_epoch(n: int, up_bytes: int, cloud_s: float, link: Link) -> Prediction:
    """Cloud-only training: raw images are uploaded while the cloud trains the whole model."""
    per_batch = {"edge_s": 0.0, "uplink_s": link.up_s(up_bytes), "cloud_s": cloud_s,
                 "downlink_s": 0.0, "latency_s": link.latency_s}
    return _pipelined("cloud", n, per_batch, up_bytes, 0, link.latency_s)


def reduction(ht_s: float, other_s: float) -> float:
    """Fraction of ``other_s`` that hierarchical training saves (negative: ht is slower)."""
    return 1.0 - ht_s / other_s


def predict(
    mode: str,
    profile: ModelProfile,
    split: str | None,
    link: Link,
    samples: int,
    bits: int = 8,
    *,
    edge_speed: float = 1.0,
    cloud_speed: float = 1.0,
    grad_bits: int = 32,
) -> Prediction:
    """Price one mode for a measured profile.

    ``edge_speed`` and ``cloud_speed`` are each machine's compute speed relative
    to the machine that measured ``profile`` (1.0: the same machine; 0.2: five
    times slower), so measured seconds are divided by them. ``bits`` is the
    width of the uploaded cut activation codes (8, packed 4 or 2, or 32 for raw
    float32); the cut gradient of split learning is float32 (``grad_bits`` 32,
    classic) or int8 (8, the cloud trainer's ``--grad-bits 8``). ``split``
    is ignored by the ``cloud`` mode.
    """
    from toolkit.plan import traffic  # imports torch through toolkit.core.protocol.wire

    if mode not in MODES:
        raise HiertrainError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    if bits not in SUPPORTED_BITS:
        raise HiertrainError(
            f"activation bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {bits!r}"
        )
    edge_speed = _positive("edge speed", edge_speed)
    cloud_speed = _positive("cloud speed", cloud_speed)
    n = n_batches(samples, profile.batch)
    if mode == "cloud":
        up = traffic.image_bytes(profile.batch, profile.input_shape)
        return cloud_epoch(n, up, profile.full_step_s / cloud_speed, link)
    t = profile.split_times(split, bits)
    up = traffic.activation_bytes(profile.batch, t.cut_shape, bits)
    if mode == "ht":
        return ht_epoch(n, t.ht_edge_s / edge_speed, up, t.ht_cloud_s / cloud_speed, link)
    down = traffic.gradient_bytes(profile.batch, t.cut_shape, grad_bits)
    return split_epoch(n, t.split_edge_fwd_s / edge_speed, t.split_edge_bwd_s / edge_speed, up,
                       t.split_cloud_s / cloud_speed, down, link)
