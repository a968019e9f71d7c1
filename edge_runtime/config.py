"""Configurations of the edge runtime's two jobs, kept free of heavy imports.

The CLI builds these before anything imports torch, so argument mistakes fail
fast; ``edge_runtime.train`` and ``edge_runtime.infer`` re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from toolkit.core.data.augment import Augment
from toolkit.core.protocol.modes import DEFAULT_MODE, MODES
from toolkit.core.security import LinkSecurity

__all__ = ["BACKENDS", "DEFAULT_GRAD_TIMEOUT", "DEFAULT_MODE", "DEFAULT_OUTBOX", "MODES",
           "InferConfig", "TrainConfig"]

BACKENDS: tuple[str, ...] = ("executorch", "torch")
"""``executorch``: the exported program, as on a board; ``torch``: eager, same math."""

DEFAULT_GRAD_TIMEOUT = 120.0
"""Split mode: seconds to wait for the cloud trainer to come online, and for each gradient."""

DEFAULT_OUTBOX = 64
"""Activation batches the publisher may hold before ``submit`` blocks (link back-pressure)."""


@dataclass
class TrainConfig:
    artifacts: str | Path
    broker: str
    device_id: str
    data: str | None = None
    run_id: str = "default"
    epochs: int = 3
    backend: str | None = None  # None: executorch for ht, torch for split (cloud: no compute)
    shard: str = "0/1"  # "index/count": this device's share of a dataset shared by devices
    # a label-skewed shard instead of a strided one: "dirichlet:ALPHA" or "classes:K"
    # (toolkit.core.data.skew); None: strided, every device a similar class mix
    shard_skew: str | None = None
    seed: int = 0
    limit: int | None = None
    quiet: bool = False
    connect_timeout: float = 30.0
    report: str | Path | None = None  # optional path for a JSON report
    state_dir: str | Path = "."  # where edge_weights-<device>.pt is written
    outbox: int = DEFAULT_OUTBOX
    # model a slow uplink (toolkit.core.transport.shaping); None: as is
    link_kbps: float | None = None
    link_latency_ms: float = 0.0
    # ht (this method), split or cloud (baselines), see toolkit.core.protocol.modes
    mode: str = DEFAULT_MODE
    grad_timeout: float = DEFAULT_GRAD_TIMEOUT  # split only
    float_act: bool = False  # split only: send the cut activation as raw float32
    # toolkit.core.protocol.codec name; None: the manifest's (int8 if it has none)
    codec: str | None = None
    security: LinkSecurity | None = None  # credentials, TLS, signing (toolkit.core.security)
    # Delivery and resume (docs/delivery.md; ht mode):
    resume: bool = False  # continue from <state_dir>'s checkpoint and spool; else start afresh
    spool_dir: str | Path | None = None  # where the spool lives; None: state_dir
    spool_mb: float | None = None  # spool budget; None: the board profile's mqtt.spool_mb
    checkpoint_every: int = 20  # batches between edge checkpoints
    confirm_timeout: float = 300.0  # at the end, wait this long for the cloud's acks
    # board profile (name or .yaml path; edge_runtime.board): spool budget and a batch check
    board: str | None = None
    # Streaming data (docs/data.md): image folders are decoded on the fly by `workers`
    # processes (None: cores - 1), augmented as `augment` says; `max_batches` ends the run
    # after that many batches (None: every epoch)
    workers: int | None = None
    augment: Augment = field(default_factory=Augment)
    max_batches: int | None = None
    # toolkit.core.lr_schedule: the manifest's learning rate over the run; the cloud follows
    lr_schedule: str = "constant"
    # --live (docs/data.md): `data` is a directory that keeps growing; labels from a sidecar
    # or a callback, a replay buffer of `replay` frames, the end after `idle_timeout` s idle
    live: bool = False
    labels: str | None = None
    replay: int = 512
    idle_timeout: float = 60.0
    # --fleet-average (edge_runtime.fleet_average): start each epoch from the fleet's average,
    # waiting at most fleet_average_wait s for it (None: its default)
    fleet_average: bool = False
    fleet_average_wait: float | None = None


@dataclass
class InferConfig:
    artifacts: str | Path
    broker: str
    device_id: str
    data: str | None = None
    run_id: str = "default"
    threshold: float = 0.8
    limit: int | None = 200
    weights: str | Path | None = None  # None: initial; a path; or "retained" (from the broker)
    timeout: float = 10.0  # per cloud request, and for fetching retained weights
    backend: str = "executorch"
    seed: int = 0
    quiet: bool = False
    connect_timeout: float = 30.0
    report: str | Path | None = None
    # model a slow uplink (toolkit.core.transport.shaping); None: as is
    link_kbps: float | None = None
    link_latency_ms: float = 0.0
    security: LinkSecurity | None = None  # credentials, TLS, signing (toolkit.core.security)
