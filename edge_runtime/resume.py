"""The edge's checkpoint: where training stands, written atomically, for ``--resume``.

Saved every ``--checkpoint-every`` batches, at each epoch's end and at the end
of the run, to ``<state_dir>/edge_checkpoint-<run>-<device>.pt`` (a temporary
file, fsync, ``os.replace``, fsync of the directory: a kill or a power cut at any
instant leaves the previous complete checkpoint). It holds the edge weights with their
BatchNorm statistics, the optimizer state where the backend exposes it, the next sequence
number and the position in the data (epoch, batch), and the report's running counters.

What it does not hold, and why that is still exact: the batches trained after
the checkpoint. A resumed edge trains them again from the checkpointed state
(same data order, same weights), and those whose seq the spool already had
are not sent again (``Publisher.submit`` skips them), so the cloud trains each
seq once and the edge's weights have seen each batch once.

Both backends' momentum buffers are in the checkpoint (the ExecuTorch backend's
:class:`~edge_runtime.sgd.HostSGD` keeps them in Python), so a resumed edge continues
with the velocity it had.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from toolkit.core.artifacts.atomic import atomic_torch_save
from toolkit.core.artifacts.safeload import describe_load_error
from toolkit.core.errors import HiertrainError

EDGE_CHECKPOINT_VERSION = 1


def checkpoint_path(state_dir: str | Path, run: str, device: str) -> Path:
    return Path(state_dir) / f"edge_checkpoint-{run}-{device}.pt"


def spool_path(spool_dir: str | Path, run: str, device: str) -> Path:
    return Path(spool_dir) / f"spool-{run}-{device}.sqlite"


@dataclass
class Progress:
    """Where a run stands: the next batch to train is ``batch`` of ``epoch``, seq ``seq``."""

    epoch: int = 0
    batch: int = 0
    seq: int = 0
    samples: int = 0
    train_s: float = 0.0
    correct: int = 0  # running counters of the current epoch
    seen: int = 0
    loss_sum: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    exit_accuracy: float = 0.0
    seen_classes: list[int] = field(default_factory=list)  # toolkit.core.classes
    # the fleet's model (toolkit.core.protocol.fleet_average): this attempt's id, kept by
    # --resume, and the labels trained in the current epoch, per class
    attempt: str = ""
    label_counts: list[int] = field(default_factory=list)


def save_checkpoint(path: Path, *, run: str, device: str, manifest_sha: str, backend: Any,
                    progress: Progress) -> None:
    state = {
        "version": EDGE_CHECKPOINT_VERSION, "run": run, "device": device,
        "manifest_sha": manifest_sha, "backend": backend.name,
        "weights": backend.state_dict(), "optimizer": backend.optimizer_state(),
        "progress": asdict(progress),
    }
    atomic_torch_save(path, state, what="the edge checkpoint",
                      hint="check free space in --state-dir")


def load_checkpoint(path: Path, *, run: str, device: str, manifest_sha: str,
                    backend: Any) -> Progress | None:
    """Restore ``backend`` from ``path``; the progress, or None when there is no checkpoint."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- any unpickling failure means a bad file
        raise HiertrainError(f"cannot read the edge checkpoint {path} "
                             f"({describe_load_error(exc)}); delete it "
                             "or drop --resume to start afresh") from None
    if not isinstance(state, dict) or state.get("version") != EDGE_CHECKPOINT_VERSION:
        raise HiertrainError(f"{path} is not an edge checkpoint; delete it or drop --resume")
    if (state["run"], state["device"], state["manifest_sha"]) != (run, device, manifest_sha):
        raise HiertrainError(f"{path} belongs to run {state['run']!r}, device "
                             f"{state['device']!r} or other artifacts; drop --resume or use "
                             "another --state-dir")
    backend.load_state_dict(state["weights"])
    backend.load_optimizer_state(state.get("optimizer"))
    return Progress(**state["progress"])
