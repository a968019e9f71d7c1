"""The end of a training run on disk: final models, curves, and ``cloud_summary.json``.

The summary's keys are an interface (``docs/runtime.md``: the keys every mode
reports, the fault tests, ``cloud-trainer --json``); they are all spelled here.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from torch import nn

from cloud_trainer.checkpoint import (
    CLOUD_FINAL,
    FLEET_MODEL,
    FULL_MODEL,
    SUMMARY,
    atomic_torch_save,
    atomic_write_bytes,
)
from cloud_trainer.evaluate import Evaluator
from cloud_trainer.ingest import Ingest
from cloud_trainer.metrics import CURVES, plot_curves
from toolkit.core.errors import HiertrainError
from toolkit.core.models.split import model_state_dict
from toolkit.core.transport import link_summary


def save_final_models(run_dir: Path, edge: nn.Module, cloud: nn.Module,
                      model_lock: threading.Lock) -> None:
    """``cloud_final.pt`` (what ``serve`` loads) and ``full_model.pt``: edge + cloud under the
    original model's own names, so it loads into the model the run was exported from
    (``toolkit.core.models.build_model``, or ``torchvision.models.<arch>``)."""
    with model_lock:  # saved from the CPU: the files load on a machine without the GPU
        cloud_state = {k: v.cpu() for k, v in cloud.state_dict().items()}
        full_state = {k: v.cpu() for k, v in model_state_dict(edge, cloud).items()}
    atomic_torch_save(run_dir / CLOUD_FINAL, cloud_state)
    atomic_torch_save(run_dir / FULL_MODEL, full_state)


def save_fleet_model(run_dir: Path, edge: nn.Module, cloud: nn.Module,
                     model_lock: threading.Lock) -> None:
    """``fleet_model.pt``: the averaged edge (``--fleet-average``) with the cloud segment, the
    fleet's model, loadable like ``full_model.pt``."""
    with model_lock:
        state = {k: v.cpu() for k, v in model_state_dict(edge, cloud).items()}
    atomic_torch_save(run_dir / FLEET_MODEL, state)


def save_curves(run_dir: Path, records: list[dict[str, Any]], title: str) -> None:
    """The curves' PNG; a server installed without matplotlib keeps its metrics, warned."""
    try:
        plot_curves(records, run_dir / CURVES, title=title)
    except HiertrainError as exc:
        logging.getLogger("cloud_trainer").warning("no %s: %s", CURVES, exc)


def build_summary(
    *, run_id: str, mode: str, end: str, missing: list[str], batches_trained: int,
    samples_trained: int, resumed_batches: int, per_device: dict[str, Any],
    dropped: dict[str, int], final: dict[str, Any], per_device_acc: dict[str, Any],
    evaluator: Evaluator, wall_s: float, last_batch_unix: float | None, ingest: Ingest,
    link: Any, bytes_down: dict[str, int],
) -> dict[str, Any]:
    """The run's summary; ``end`` is how the loop ended (complete, idle, stopped)."""
    return {
        "run_id": run_id,
        "mode": mode,
        "end": end,
        "complete": not missing,
        "missing": missing,
        "batches_trained": batches_trained,
        "samples_trained": samples_trained,
        "session_batches_trained": batches_trained - resumed_batches,
        "resumed_batches": resumed_batches,
        "per_device": per_device,
        "dropped": dropped,
        "full_accuracy": final["full_accuracy"],
        "exit_accuracy": final["exit_accuracy"],
        "eval_edge_device": final["edge_device"],
        "eval_edge_epoch": final["edge_epoch"],
        "per_device_full_accuracy": per_device_acc,
        "eval_data": evaluator.name,
        "eval_samples": len(evaluator),
        "wall_s": round(wall_s, 3),
        "last_batch_unix": last_batch_unix,
        "bytes_received": link.bytes_received,
        "messages_received": link.messages_received,
        "max_queue_depth": ingest.max_queue_depth,
        "backpressure_s": round(ingest.blocked_s, 3),
        "link": link_summary(link),
        # The keys every mode reports, for comparing them (docs/runtime.md):
        "samples": samples_trained,
        "bytes_up": sum(ingest.bytes_by_device.values()),
        "bytes_down": sum(bytes_down.values()),
        "bytes_up_per_device": dict(sorted(ingest.bytes_by_device.items())),
        "bytes_down_per_device": dict(sorted(bytes_down.items())),
    }


def write_summary(run_dir: Path, summary: dict[str, Any]) -> None:
    atomic_write_bytes(run_dir / SUMMARY, (json.dumps(summary, indent=2) + "\n").encode())
