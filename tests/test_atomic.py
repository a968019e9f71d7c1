"""Atomic writes are durable: the file is synced before the rename and the directory after it.

Without the directory's fsync a power cut can lose the rename itself and bring back the
previous checkpoint, after the cloud trainer acked batches from the new one.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from toolkit.core.artifacts import atomic
from toolkit.core.artifacts.atomic import atomic_write_bytes


def _record(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every fsync (what it synced: 'dir' or 'file', and its path) and replace, in order."""
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append((f"fsync-{kind}", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:  # noqa: ANN001 -- os.replace's own signature
        real_replace(src, dst)
        events.append(("replace", str(dst)))

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    return events


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs /proc/self/fd (Linux)")
def test_the_directory_is_synced_after_the_rename(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    events = _record(monkeypatch)
    target = tmp_path / "checkpoint.pt"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    kinds = [k for k, _ in events]
    assert kinds == ["fsync-file", "replace", "fsync-dir"], events
    assert events[2][1] == str(tmp_path)  # the target's own directory


def test_a_directory_that_cannot_be_opened_or_synced_is_tolerated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Platforms without directory fsync (Windows cannot open one; some file systems answer
    EINVAL) still get the atomic replace."""
    real_open = os.open

    def no_dirs(path, flags, *a):  # noqa: ANN001, ANN002
        if Path(path).is_dir():
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a)

    monkeypatch.setattr(atomic.os, "open", no_dirs)
    atomic_write_bytes(tmp_path / "a", b"1")
    assert (tmp_path / "a").read_bytes() == b"1"
    monkeypatch.setattr(atomic.os, "open", real_open)

    def einval(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")

    monkeypatch.setattr(atomic.os, "fsync", einval)
    atomic_write_bytes(tmp_path / "b", b"2")
    assert (tmp_path / "b").read_bytes() == b"2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary left
