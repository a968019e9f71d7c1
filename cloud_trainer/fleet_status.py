"""The fleet at a glance: ``<run-dir>/fleet_status.json``, rewritten every few seconds.

Why a file: an operator with a hundred robots on one trainer needs to see which of them
are behind, silent or failing without attaching to the process or the broker. The
training loop writes this file atomically every ``status_every`` seconds;
``cloud-trainer status --run-dir DIR`` prints it as a table (``--json`` as is), and any
monitoring system can read it. The same figures go to TensorBoard (``fleet/...``).

Per edge: batches trained and published, ``lag`` (published but not trained yet: in the
broker, in flight or in the queue), batches waiting in the trainer's queue, the longest
and the latest queue wait, seconds since its last message, its state, and the full-model
accuracy of the last evaluation with its weights.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cloud_trainer.checkpoint import atomic_write
from toolkit.core.errors import HiertrainError

FLEET_STATUS = "fleet_status.json"
SCHEMA = "hiertrain.fleet_status"
VERSION = 1


class Throughput:
    """Samples and batches trained per second over the last status interval."""

    def __init__(self) -> None:
        self._last: tuple[float, int, int] | None = None
        self.samples_per_s: float | None = None
        self.batches_per_s: float | None = None

    def update(self, batches: int, samples: int) -> None:
        now = time.monotonic()
        if self._last is not None and now > self._last[0]:
            dt = now - self._last[0]
            self.batches_per_s = round((batches - self._last[1]) / dt, 3)
            self.samples_per_s = round((samples - self._last[2]) / dt, 2)
        self._last = (now, batches, samples)


def build_status(*, run_id: str, mode: str, state: str, learner: Any, ingest: Any,
                 throughput: Throughput, ack_bytes: dict[str, int]) -> dict[str, Any]:
    """The status document from the live objects of a run (read-only, thread-safe reads)."""
    lr = learner
    waiting = ingest.queue.lanes()
    last_seen = ingest.last_seen_by_device()
    per_acc = lr.per_device_accuracy()
    now = time.time()
    devices: dict[str, Any] = {}
    for d, v in lr.fleet.per_device().items():
        published = v["published"]
        trained = v["trained"]
        seen = last_seen.get(d)
        waits = ingest.waits.device(d)
        devices[d] = {
            "state": v["state"],
            "trained": trained,
            "published": published,
            "lag": None if published is None else max(0, published - trained),
            "queued": waiting.get(d, 0),
            "duplicates": v["duplicates"],
            "failed": v["failed"],
            "last_seen_s": None if seen is None else round(now - seen, 1),
            "queue_wait_last_s": round(waits["last_s"], 4) if waits else None,
            "queue_wait_max_s": round(waits["max_s"], 4) if waits else None,
            "full_accuracy": per_acc.get(d),
            "full_accuracy_on_own_labels": lr.fleet_model.accuracy_on_labels(d, d),
            "ack_bytes": ack_bytes.get(d, 0),
        }
    worker = lr.eval_worker
    return {
        "schema": SCHEMA, "v": VERSION, "run": run_id, "mode": mode, "state": state,
        "time": now, "compute": lr.place.describe(),
        "batches_trained": lr.batches_trained, "samples_trained": lr.samples_trained,
        "batches_per_s": throughput.batches_per_s, "samples_per_s": throughput.samples_per_s,
        "queue": {"depth": ingest.queue.qsize(), "limit": ingest.queue_size,
                  "wait": ingest.waits.summary()},
        "evaluations": {"pending": worker.pending() if worker else 0,
                        "done": worker.evaluations if worker else None,
                        "coalesced": worker.coalesced if worker else None,
                        "max_wait_s": round(worker.max_wait_s, 3) if worker else None},
        "last_eval": {k: lr.last_eval.get(k) for k in
                      ("batches_trained", "full_accuracy", "exit_accuracy", "edge_device")},
        "dropped": lr.drops.snapshot(),
        "devices": devices,
        "fleet_model": lr.fleet_model.status(list(devices)),
    }


def fleet_scalars(status: dict[str, Any]) -> dict[str, Any]:
    """The figures of ``status`` that TensorBoard plots over time."""
    lags = [d["lag"] for d in status["devices"].values() if d["lag"] is not None]
    return {
        "fleet/samples_per_s": status["samples_per_s"],
        "fleet/queue_depth": status["queue"]["depth"],
        "fleet/queue_wait_p99_s": status["queue"]["wait"]["p99_s"],
        "fleet/devices": len(status["devices"]),
        "fleet/lag_max": max(lags) if lags else None,
        "fleet/evaluations_pending": status["evaluations"]["pending"],
    }


def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    text = json.dumps(status, indent=1, sort_keys=True).encode()
    atomic_write(run_dir / FLEET_STATUS, lambda f: f.write(text))


def read_status(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir).expanduser() / FLEET_STATUS
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise HiertrainError(f"no {FLEET_STATUS} in {path.parent}: no cloud trainer has run "
                             "there yet (it writes the file every few seconds)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise HiertrainError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise HiertrainError(f"{path} is not a fleet status file")
    return data


def format_status(status: dict[str, Any]) -> str:
    """A table for a terminal: one line for the run, one per edge (most behind first)."""
    age = time.time() - float(status.get("time", 0))
    q = status["queue"]
    wait = q["wait"]
    head = (f"run {status['run']} ({status['mode']}, {status['state']}, on "
            f"{status['compute']['device']}), written {age:.0f} s ago: "
            f"{status['batches_trained']} batches trained, "
            f"{status['samples_per_s'] or 0:g} samples/s, queue {q['depth']}/{q['limit']}, "
            f"queue wait p50 {_s(wait['p50_s'])} p99 {_s(wait['p99_s'])}, "
            f"{status['evaluations']['pending']} evaluation(s) pending")
    rows = [("edge", "state", "trained", "published", "lag", "queued", "wait max",
             "last seen", "full acc")]
    devices = sorted(status["devices"].items(), key=lambda kv: -(kv[1]["lag"] or 0))
    for d, v in devices:
        rows.append((d, str(v["state"]), str(v["trained"]), _n(v["published"]), _n(v["lag"]),
                     str(v["queued"]), _s(v["queue_wait_max_s"]), _s(v["last_seen_s"]),
                     "-" if v["full_accuracy"] is None else f"{v['full_accuracy']:.3f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    return "\n".join([head, *lines])


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:g} s"


def _n(v: int | None) -> str:
    return "-" if v is None else str(v)
