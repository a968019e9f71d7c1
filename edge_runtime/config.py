"""Configurations of the edge runtime's two jobs, kept free of heavy imports.

The CLI builds these before anything imports torch, so argument mistakes fail
fast; ``edge_runtime.train`` and ``edge_runtime.infer`` re-export them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BACKENDS: tuple[str, ...] = ("executorch", "torch")
"""``executorch``: the exported program, as on a board; ``torch``: eager, same math."""

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
    backend: str = "executorch"
    shard: str = "0/1"  # "index/count": this device's share of a dataset shared by devices
    seed: int = 0
    limit: int | None = None
    quiet: bool = False
    connect_timeout: float = 30.0
    report: str | Path | None = None  # optional path for a JSON report
    state_dir: str | Path = "."  # where edge_weights-<device>.pt is written
    outbox: int = DEFAULT_OUTBOX
    codec: str | None = None  # toolkit.codec name; None: the manifest's (int8 if it has none)


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
