"""Provisioning over serial: ``toolkit flash`` -> ``edge-runtime provision`` as real processes
on pseudo-terminal pairs (one with byte corruption and drops), an interrupted flash that
resumes, and a transfer that fails its hashes and is not installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from edge_runtime.provision import install, partial_dir
from toolkit.core.artifacts.manifest import load_manifest, sha256_file
from toolkit.core.errors import HiertrainError
from toolkit.lab.launch import ProcessGroup
from toolkit.lab.pty_relay import PtyRelay

pytestmark = pytest.mark.serial


ARTIFACTS = {"digits": True, "batch": 32, "exit_channels": 16}
"""conftest.exported options (smallcnn on 8x8 digits); the artifacts fixture: tests/conftest.py"""


def _provision(procs: ProcessGroup, port: str, dest: Path, baud: int) -> subprocess.Popen:
    """``edge-runtime provision`` as process "board" (stdout: its JSON result)."""
    return procs.start("board", ["edge_runtime", "provision", "--port", port, "--baud",
                                 str(baud), "--dest", str(dest), "--timeout", "120"],
                       separate_stderr=True)


def _flash(procs: ProcessGroup, port: str, artifacts: Path, baud: int) -> subprocess.Popen:
    """``toolkit flash`` as process "flash" (stdout: its JSON result)."""
    return procs.start("flash", ["toolkit", "flash", "--port", port, "--baud", str(baud),
                                 "--artifacts", str(artifacts), "--board", "rpi4",
                                 "--timeout", "120"], separate_stderr=True)


def _communicate(procs: ProcessGroup, name: str, timeout: float) -> tuple[str, str]:
    """Wait for ``name``; its (stdout, stderr), like ``Popen.communicate``."""
    procs.wait(name, timeout)
    return procs.output(name), procs.errors(name)


def _same_files(a: Path, b: Path) -> None:
    for name in load_manifest(a).data["artifacts"]:
        assert sha256_file(a / name) == sha256_file(b / name), name
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()


def test_flash_through_a_noisy_line_installs_verified_artifacts(artifacts, tmp_path, procs):
    dest = tmp_path / "board" / "artifacts"
    with PtyRelay(corrupt=5e-4, drop=2e-4, seed=11) as relay:
        board = _provision(procs, relay.ports[1], dest, 921600)
        _flash(procs, relay.ports[0], artifacts, 921600)
        out, err = _communicate(procs, "flash", 150)
        assert out, err
        board_out, board_err = _communicate(procs, "board", 30)
    assert board.returncode == 0, board_err
    result, board_result = json.loads(out), json.loads(board_out)
    assert result["ok"] and board_result["ok"]
    assert result["channel"]["frames_retransmitted"] > 0  # the damage happened and was repaired
    assert board_result["channel"]["bad_frames"] > 0
    _same_files(artifacts, dest)
    assert (dest / "board.yaml").read_text().count("name: rpi4") == 1
    assert not list(dest.parent.glob(".artifacts.partial-*"))  # renamed into place


@pytest.mark.slow  # ~35 s of paced serial transfer: .ci/run runs it with the long tests
def test_an_interrupted_flash_resumes_where_it_stopped(artifacts, tmp_path, procs):
    dest = tmp_path / "artifacts"
    total = sum((artifacts / n).stat().st_size
                for n in ["manifest.json", *load_manifest(artifacts).data["artifacts"]])
    key = sha256_file(artifacts / "manifest.json")
    baud = 115200  # ~11 KB/s: the ~180 KB set takes ~16 s, so there is time to interrupt
    with PtyRelay() as relay:
        _provision(procs, relay.ports[1], dest, baud)
        _flash(procs, relay.ports[0], artifacts, baud)
        partial = partial_dir(dest.resolve(), key)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            got = sum(f.stat().st_size for f in partial.glob("*")) if partial.is_dir() else 0
            if got > total // 4:
                break
            time.sleep(0.2)
        procs.kill("flash")  # the cable is pulled mid-flash
        assert not dest.exists()  # nothing half-written is ever in place
        held = sum(f.stat().st_size for f in partial.glob("*"))
        assert 0 < held < total
        _flash(procs, relay.ports[0], artifacts, baud)  # the same name again: a restart
        out, err = _communicate(procs, "flash", 120)
        assert out, err
        board_out, board_err = _communicate(procs, "board", 30)
    result = json.loads(out)
    assert result["ok"], result
    assert result["bytes_skipped"] > 0  # the second flash resumed...
    assert result["bytes_sent"] < total  # ...and did not send everything again
    assert result["bytes_sent"] + result["bytes_skipped"] >= total
    assert json.loads(board_out)["resumed_bytes"] == result["bytes_skipped"]
    _same_files(artifacts, dest)


def test_a_transfer_that_fails_its_hash_is_not_installed(artifacts, tmp_path):
    partial = tmp_path / ".art.partial-x"
    shutil.copytree(artifacts, partial)
    offer = [{"name": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(partial.iterdir())]
    victim = partial / "edge_train.pte"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(bytes(data))
    dest = tmp_path / "art"
    with pytest.raises(HiertrainError, match="edge_train.pte does not match"):
        install(partial, dest, offer)
    assert not dest.exists()
    assert not victim.exists()  # dropped, so the next flash resends it
