"""A full disk in the cloud trainer's run directory: a clear error, no half-written files.

Uses a real 64 KiB tmpfs mounted by the test (root only), not a mock.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from cloud_trainer.checkpoint import atomic_write_bytes
from toolkit.core.errors import HiertrainError


@pytest.fixture
def tiny_fs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs for the full-disk test: {r.stderr.strip()}")
        pytest.skip(f"needs root to mount a tmpfs: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


def test_full_disk_is_one_clear_error_and_leaves_the_old_file(tiny_fs):
    target = tiny_fs / "checkpoint.pt"
    atomic_write_bytes(target, b"old checkpoint")
    with pytest.raises(HiertrainError, match="check free space"):
        atomic_write_bytes(target, b"x" * (1 << 20))
    assert target.read_bytes() == b"old checkpoint"  # the previous checkpoint survives
    assert sorted(p.name for p in tiny_fs.iterdir()) == ["checkpoint.pt"]  # no temp left
