"""Atomic file writes, shared by the cloud trainer's run directory and the edge's state dir.

Write a temporary file next to the target, fsync it, ``os.replace`` it, then fsync the
directory: a crash or a ``SIGKILL`` mid-write leaves the previous complete file, never half
of one -- checkpoints in particular, which a restart trusts to know what has been trained
already. The rename is an entry in the directory, which is a file of its own: until the
directory is synced, a power cut can bring back the old entry (or none), and a cloud that
acked batches from a checkpoint whose rename was lost would have lied to its edges.
"""

from __future__ import annotations

import errno
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
        fsync_dir(path.parent)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        name = f"{what} {path}" if what else str(path)
        raise HiertrainError(f"cannot write {name} ({exc.strerror or exc}); {hint}") from None


def fsync_dir(directory: Path) -> None:
    """Make a rename (or a new file) in ``directory`` durable: fsync the directory itself.

    POSIX only: where a directory cannot be opened (Windows raises PermissionError) or
    synced (some file systems refuse with EINVAL), there is nothing more to do.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, **kw: Any) -> None:
    atomic_write(path, lambda f: f.write(data), **kw)


def atomic_torch_save(path: Path, obj: Any, **kw: Any) -> None:
    import torch  # lazily: callers check their directories before paying for torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue(), **kw)
