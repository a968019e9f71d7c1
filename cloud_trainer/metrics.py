"""Training and evaluation curves: ``metrics.jsonl`` (one JSON object a line) and ``curves.png``.

JSON lines because a run can be killed at any moment: every line written is
complete and a resumed run appends to the same file, so the curves of a
resumed run are continuous. Each line::

    {"kind": "train"|"eval", "batches_trained": int, "loss": float|null,
     "train_acc": float|null, "full_accuracy": float|null,
     "exit_accuracy": float|null, "time": unix seconds, ...}
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud_trainer.checkpoint import atomic_write
from toolkit.core.errors import HiertrainError
from toolkit.core.optional import require

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
CURVES = "curves.png"


class MetricsLog:
    """Appends records to ``metrics.jsonl`` and keeps them for the plot."""

    def __init__(self, run_dir: Path,
                 sink: Callable[[dict[str, Any]], None] | None = None,
                 enabled: bool = True) -> None:
        self.path = run_dir / METRICS
        self.enabled = enabled  # False: records are kept in memory only (a group's non-leader)
        self.sink = sink  # e.g. TensorBoard (cloud_trainer.tensorboard): sees each new record
        self._lock = threading.Lock()  # the training and the evaluation thread both append
        self.records: list[dict[str, Any]] = []
        if enabled and self.path.exists():  # resumed run: keep the earlier part of the curves
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if isinstance(rec, dict):
                    self.records.append(rec)

    def truncate_after(self, batches_trained: int) -> None:
        """Forget records past a checkpoint, which a resumed run is about to redo."""
        keep = [r for r in self.records if r.get("batches_trained", 0) <= batches_trained]
        if len(keep) == len(self.records) or not self.enabled:
            return
        self.records = keep
        text = "".join(json.dumps(r) + "\n" for r in keep)
        atomic_write(self.path, lambda f: f.write(text.encode()))

    def append(self, kind: str, batches_trained: int, **fields: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "kind": kind,
            "batches_trained": batches_trained,
            "loss": None,
            "train_acc": None,
            "full_accuracy": None,
            "exit_accuracy": None,
            "time": time.time(),
            **fields,
        }
        with self._lock:
            if self.enabled:
                try:
                    with open(self.path, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                except OSError as exc:
                    raise HiertrainError(f"cannot write {self.path} ({exc.strerror or exc}); "
                                         "check the run directory") from None
            self.records.append(rec)
        if self.sink is not None:
            self.sink(rec)
        return rec


class TrainWindow:
    """Loss/accuracy since the last "train" metrics line."""

    def __init__(self) -> None:
        self.loss = 0.0
        self.correct = 0
        self.samples = 0
        self.batches = 0

    def add(self, loss: float, correct: int, samples: int) -> None:
        self.loss += loss
        self.correct += correct
        self.samples += samples
        self.batches += 1

    def take(self) -> tuple[float, float] | None:
        """(mean loss, accuracy) since the last take, and start afresh; None if empty."""
        if not self.batches:
            return None
        out = (self.loss / self.batches, self.correct / max(1, self.samples))
        self.__init__()  # type: ignore[misc]
        return out


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Loss and accuracies against batches trained, as a PNG (matplotlib, Agg)."""
    matplotlib = require("matplotlib", "cloud", "plotting training curves")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train" and r.get("loss") is not None]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    try:
        if train:
            xs = [r["batches_trained"] for r in train]
            ax_loss.plot(xs, [r["loss"] for r in train], label="cloud train loss")
            ax_acc.plot(xs, [r["train_acc"] for r in train], label="cloud train accuracy",
                        alpha=0.6)
        for key, label in (("full_accuracy", "full model (held out)"),
                           ("exit_accuracy", "edge exit (held out)")):
            pts = [(r["batches_trained"], r[key]) for r in evals if r.get(key) is not None]
            if pts:
                ax_acc.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax_loss.set(xlabel="batches trained", ylabel="cross-entropy", title="loss")
        ax_acc.set(xlabel="batches trained", ylabel="accuracy", ylim=(0, 1), title="accuracy")
        for ax in (ax_loss, ax_acc):
            ax.grid(alpha=0.3)
            if ax.has_data():
                ax.legend(loc="best", fontsize=8)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    finally:
        plt.close(fig)
