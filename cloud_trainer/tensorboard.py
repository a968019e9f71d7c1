"""Training curves and fleet metrics as TensorBoard event files, where PyTorch users look.

``metrics.jsonl`` stays the record a run resumes from and the tests read; this module
mirrors it (and the fleet figures of ``cloud_trainer.fleet_status``) into
``<run-dir>/tensorboard`` through ``torch.utils.tensorboard``, so ``tensorboard --logdir
runs/`` shows every run of a server side by side. The ``tensorboard`` package comes with
the ``cloud`` extra; a server without it keeps its JSON metrics and logs why once.

Tags: ``train/loss``, ``train/accuracy``, ``eval/full_accuracy``, ``eval/exit_accuracy``
(and ``eval/full_accuracy/<edge>`` per edge whose weights were used), ``fleet/...`` for
throughput, queue and lag; the step is always the number of batches trained.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"


class TensorBoardSink:
    """Writes scalars to ``run_dir/tensorboard``; a no-op when tensorboard is missing."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self._writer: Any = None
        self._lock = threading.Lock()  # the training and the evaluation thread both write
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.info("no TensorBoard event files: the tensorboard package is not installed "
                     "(pip install 'hiertrain[cloud]'); metrics.jsonl has the same figures")
            return
        self._writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    @property
    def active(self) -> bool:
        return self._writer is not None

    def record(self, rec: dict[str, Any]) -> None:
        """One metrics.jsonl record (``cloud_trainer.metrics``) as scalars."""
        if self._writer is None:
            return
        step = int(rec.get("batches_trained", 0))
        if rec.get("kind") == "train":
            self.scalars(step, {"train/loss": rec.get("loss"),
                                "train/accuracy": rec.get("train_acc")})
        elif rec.get("kind") == "eval":
            values = {"eval/full_accuracy": rec.get("full_accuracy"),
                      "eval/exit_accuracy": rec.get("exit_accuracy")}
            edge = rec.get("edge_device")
            if edge:
                values[f"eval/full_accuracy/{edge}"] = rec.get("full_accuracy")
            self.scalars(step, values)

    def scalars(self, step: int, values: dict[str, Any]) -> None:
        if self._writer is None:
            return
        with self._lock:
            for tag, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self._writer is not None:
            with self._lock:
                self._writer.close()
            self._writer = None
