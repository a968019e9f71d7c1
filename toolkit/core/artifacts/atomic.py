"""Atomic file writes, shared by the cloud trainer's run directory and the edge's state dir.

Write a temporary file next to the target, fsync it, then ``os.replace`` it: a
crash or a ``SIGKILL`` mid-write leaves the previous complete file, never half
of one -- checkpoints in particular, which a restart trusts to know what has
been trained already.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from toolkit.core.errors import HiertrainError

RUN_DIR_HINT = "check free space and permissions of the run directory"


def atomic_write(path: Path, write: Callable[[BinaryIO], None], *, what: str = "",
                 hint: str = RUN_DIR_HINT) -> None:
    """Write ``path`` via a temporary file and ``os.replace``; HiertrainError on disk errors,
    naming ``what`` (e.g. "the edge checkpoint") and ending with ``hint``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        name = f"{what} {path}" if what else str(path)
        raise HiertrainError(f"cannot write {name} ({exc.strerror or exc}); {hint}") from None


def atomic_write_bytes(path: Path, data: bytes, **kw: Any) -> None:
    atomic_write(path, lambda f: f.write(data), **kw)


def atomic_torch_save(path: Path, obj: Any, **kw: Any) -> None:
    import torch  # lazily: callers check their directories before paying for torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue(), **kw)
