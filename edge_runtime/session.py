"""What every training mode's loop shares: status messages, the end of a run, the report keys.

The loops (``ht_loop``, ``split_learning``, ``upload``) and ``train.run_training``,
which runs them, import this module; it imports none of them, so the modes can
share code without an import cycle.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from edge_runtime.backends import EdgeBackend
from edge_runtime.config import TrainConfig
from edge_runtime.publisher import Publisher
from toolkit.core.lr_schedule import STATUS_KEY, LrSchedule
from toolkit.core.privacy import public_state
from toolkit.core.protocol.messages import Status, encode_weights
from toolkit.core.protocol.topics import status_topic, weights_topic
from toolkit.core.transport import Link, drain_s

log = logging.getLogger("edge_runtime")

FLUSH_TIMEOUT_S = 120.0
STATUS_TIMEOUT_S = 10.0


def weights_path(state_dir: str | Path, device: str) -> Path:
    """Where training leaves the final edge weights of ``device``."""
    return Path(state_dir) / f"edge_weights-{device}.pt"


def lr_schedule(cfg: TrainConfig, samples: int, batch_size: int) -> LrSchedule:
    """The run's learning-rate schedule over ``cfg.epochs`` of ``samples`` (a live source,
    ``samples`` 0, has no end to schedule towards: ``run_training`` refuses that)."""
    return LrSchedule(cfg.lr_schedule, cfg.epochs, samples // batch_size)


def schedule_extra(schedule: LrSchedule) -> dict[str, Any]:
    """What every edge status carries so that the cloud follows the same schedule."""
    return {STATUS_KEY: schedule.to_dict()}


def publish_status(link: Link, status: Status) -> None:
    link.publish(status_topic(status.run, status.device), status.encode(), retain=True,
                 timeout=STATUS_TIMEOUT_S)


def link_totals(summary: dict[str, Any], link: Link) -> dict[str, Any]:
    """The keys every mode's report carries, for comparing the modes (see docs/runtime.md).

    ``bytes_up``/``bytes_down``: application payload bytes this device sent / received
    over the whole run, everything included (status, weights, gradients).
    """
    return {
        "samples": summary["samples_published"],
        "bytes_up": link.bytes_sent,
        "bytes_down": link.bytes_received,
        "full_accuracy": summary.get("full_accuracy"),  # the cloud measures it: cloud_summary
        "exit_accuracy": summary.get("exit_accuracy"),
    }


def flush_outbox(publisher: Publisher, link: Link) -> None:
    """Wait until everything submitted reached the broker, however slow the link.

    On a shaped (slow) link the bound grows by the time the bytes still queued
    need at its rate: an 11 MB weights upload at 500 kbit/s takes three minutes
    and is not a broker that stopped answering.
    """
    pending = publisher.stats.bytes_submitted - publisher.stats.bytes_acked
    publisher.flush(FLUSH_TIMEOUT_S + drain_s(link, pending))
    link.flush(FLUSH_TIMEOUT_S + drain_s(link))  # a shaped link still holds its buffer


def publish_epoch_weights(publisher: Publisher, backend: EdgeBackend, run: str, device: str,
                          epoch: int, seq: int, *, seen_classes: list[int] | None = None,
                          extra: dict[str, Any] | None = None) -> None:
    """Retained edge weights at an epoch's end: the cloud assembles and scores the full model;
    ``seen_classes`` lets ``edge-runtime infer --weights retained`` mask the others; ``extra``
    adds meta fields (the epoch's samples and labels: toolkit.core.protocol.fleet_average)."""
    meta: dict[str, Any] = {"run": run, "device": device, "epoch": epoch, "last_seq": seq - 1,
                            **(extra or {})}
    if seen_classes is not None:
        meta["seen_classes"] = seen_classes
    # without the proxy decoder of an adversarial defence: it stays on the board
    state = public_state(backend.state_dict())
    publisher.submit(weights_topic(run, device), encode_weights(state, meta), retain=True,
                     kind="weights")


def publish_done(link: Link, run: str, device: str, *, epochs: int, seq: int, samples: int,
                 exit_accuracy: float | None, extra: dict[str, Any]) -> None:
    """The retained "done" status: the cloud trains until it has ``seq`` batches of us."""
    publish_status(link, Status(role="edge", device=device, run=run, state="done",
                                 epoch=epochs - 1, batches_published=seq,
                                 samples_published=samples, last_seq=seq - 1,
                                 exit_accuracy=exit_accuracy, extra=extra))


def report_failure(link: Link, run: str, device: str, exc: BaseException) -> None:
    """Best effort: tell the cloud (retained) why this device stopped."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        text = "interrupted"
    try:
        publish_status(link, Status(role="edge", device=device, run=run, state="error",
                                     message=text[:500]))
    except Exception:  # noqa: BLE001 -- the original error matters more
        log.warning("could not publish the error status", exc_info=log.isEnabledFor(10))
