"""The run directory: writability up front, atomic files, and the resumable checkpoint.

Every file the trainer writes goes through :mod:`toolkit.core.artifacts.atomic` (re-exported
here for the trainer's modules): a crash or a ``SIGKILL`` mid-write leaves the
previous complete file, never half of one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from toolkit.core.artifacts.atomic import atomic_torch_save, atomic_write, atomic_write_bytes
from toolkit.core.artifacts.safeload import describe_load_error
from toolkit.core.errors import HiertrainError

__all__ = ["atomic_torch_save", "atomic_write", "atomic_write_bytes", "ensure_run_dir",
           "load_checkpoint", "save_checkpoint"]

CHECKPOINT = "checkpoint.pt"
CHECKPOINT_VERSION = 1
SUMMARY = "cloud_summary.json"
CLOUD_FINAL = "cloud_final.pt"
"""The trained cloud segment: what ``cloud-trainer serve`` loads."""
FULL_MODEL = "full_model.pt"
FLEET_MODEL = "fleet_model.pt"
"""``--fleet-average``: the averaged edge with the cloud segment (``cloud_trainer.fleet_model``)."""


def ensure_run_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` if needed and prove a file can be written there."""
    run_dir = Path(path).expanduser()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise HiertrainError(
            f"cannot write to run directory {run_dir} ({exc.strerror or exc}); "
            "pass a --run-dir that is a writable directory"
        ) from None
    return run_dir


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    atomic_torch_save(run_dir / CHECKPOINT, {"version": CHECKPOINT_VERSION, **state})


def load_checkpoint(run_dir: Path, *, run_id: str, manifest_sha: str) -> dict[str, Any] | None:
    """The checkpoint of this run and these artifacts, None if there is none.

    A checkpoint of another run or other artifacts is an error rather than
    something to overwrite: it may be the only copy of a long run's state.
    """
    import torch

    path = run_dir / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise HiertrainError(
            f"cannot read checkpoint {path} ({describe_load_error(exc)}); delete it to start "
            "the run afresh"
        ) from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise HiertrainError(f"{path} is not a cloud-trainer checkpoint; use another --run-dir")
    if state.get("run_id") != run_id or state.get("manifest_sha") != manifest_sha:
        raise HiertrainError(
            f"{path} belongs to run {state.get('run_id')!r} with other artifacts or run id "
            f"(this is run {run_id!r}); use another --run-dir or delete the checkpoint"
        )
    return state
