"""``CloudConfig``: everything a training run of ``cloud-trainer`` needs, checked up front.

Kept apart from the loop (and free of torch) so the CLI, the mode strategies and
the entry point can all name it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.core.errors import HiertrainError
from toolkit.core.protocol import topics
from toolkit.core.protocol.messages import CLOUD_DEVICE
from toolkit.core.protocol.modes import DEFAULT_MODE, check_mode
from toolkit.core.security import LinkSecurity
from toolkit.core.transport import LinkShape

MAX_BATCH_FACTOR = 8
"""Largest accepted activation batch, in multiples of the manifest's batch size."""
GRAD_BITS = (32, 8)
DEFAULT_AVERAGE_WAIT_S = 120.0
"""--fleet-average-wait: seconds a round waits after its first delivery for the other devices."""
AMP_MODES = ("off", "bf16", "fp16")
"""--amp: float32, bfloat16 autocast, float16 autocast with loss scaling (cloud_trainer.device)."""


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
    """Broker credentials, TLS files, and the run key (``toolkit.core.security``): with it,
    each device's messages are checked with that device's key derived from the run key
    (``toolkit.core.keys``), and unsigned and badly signed ones are dropped (``unsigned``,
    ``bad_signature``). A device key file is refused: the cloud must derive every key."""
    device: str = "auto"
    """Where the cloud computes: auto (a GPU when torch sees one), cpu, cuda or cuda:N
    (``cloud_trainer.device``)."""
    amp: str = "off"
    """Mixed precision of the training step: off, bf16 or fp16 (GPU, loss-scaled)."""
    eval_interval: float = 0.0
    """Seconds between the starts of two evaluations (0: back to back); evaluations run on
    their own thread and coalesce per edge (``cloud_trainer.eval_worker``)."""
    infer_max_age: float = 1.0
    """Seconds an inference answer's copy of the cloud segment may lag the trained one."""
    trace: str | None = None
    """Append one JSON line per trained batch to this file (device, seq, samples, wall-clock
    time trained): publish-to-trained latency for benchmarks and debugging."""
    tensorboard: bool = True
    """Mirror the metrics and fleet figures to ``<run-dir>/tensorboard`` (when the package is
    installed; ``cloud_trainer.tensorboard``)."""
    session_expiry: int = 3600
    """Seconds the broker keeps this trainer's MQTT session (and the batches queued for
    it) after it disconnects or dies; 0: clean sessions (``docs/delivery.md``)."""
    fleet_average: bool = False
    """Average the edges' segments at each epoch end (FedAvg, sample-weighted) and send the
    average back to every device as its next start (``cloud_trainer.fleet_average``)."""
    fleet_average_wait: float | None = None
    """Seconds a round waits, after its first delivery, for the other expected devices
    (None: ``DEFAULT_AVERAGE_WAIT_S``); then it averages those that delivered."""
    fleet_average_quorum: int | None = None
    """Fewest devices a round averages once the wait ran out; fewer skip the round (None: 1)."""

    @property
    def average_wait_s(self) -> float:
        return DEFAULT_AVERAGE_WAIT_S if self.fleet_average_wait is None \
            else self.fleet_average_wait

    @property
    def average_quorum(self) -> int:
        return 1 if self.fleet_average_quorum is None else self.fleet_average_quorum

    def check(self) -> None:
        check_mode(self.mode)
        if self.grad_bits not in GRAD_BITS:
            raise HiertrainError(f"--grad-bits must be one of {list(GRAD_BITS)}, "
                                 f"got {self.grad_bits}")
        topics.validate_id(self.run_id, "run id")
        if self.security is not None:
            self.security.require_run_key("cloud-trainer")
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
        if self.amp not in AMP_MODES:
            raise HiertrainError(f"--amp must be one of {list(AMP_MODES)}, got {self.amp!r}")
        if self.eval_interval < 0 or self.infer_max_age < 0:
            raise HiertrainError("--eval-interval and --infer-max-age must be >= 0 seconds")
        if not self.idle_timeout > 0:
            raise HiertrainError(f"--idle-timeout must be > 0 seconds, got {self.idle_timeout}")
        self._check_fleet_average()

    def _check_fleet_average(self) -> None:
        if not self.fleet_average:
            for name in ("fleet_average_wait", "fleet_average_quorum"):
                if getattr(self, name) is not None:
                    raise HiertrainError(f"--{name.replace('_', '-')} only applies with "
                                         "--fleet-average; add it or drop the option")
            return
        if self.mode != "ht":
            raise HiertrainError(f"--fleet-average averages the edges of --mode ht runs, not "
                                 f"--mode {self.mode}; drop it")
        expected = len(self.device_ids) if self.device_ids is not None else self.devices
        if expected is None:
            raise HiertrainError("--fleet-average needs --devices N or --device-ids A,B: each "
                                 "round waits for the devices it expects")
        if not self.average_wait_s > 0:
            raise HiertrainError(f"--fleet-average-wait must be > 0 seconds, got "
                                 f"{self.fleet_average_wait}")
        if not 1 <= self.average_quorum <= expected:
            raise HiertrainError(f"--fleet-average-quorum must be between 1 and the {expected} "
                                 f"expected device(s), got {self.fleet_average_quorum}")
