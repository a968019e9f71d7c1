"""``toolkit bundle``: a real tarball from a real export, unpacked and checked like a board
would use it: artifacts pass their hashes, the systemd unit's command line is one the edge
runtime accepts, and the same inputs give the same bytes."""

from __future__ import annotations

import hashlib
import re
import shlex
import tarfile

import pytest

from edge_runtime.cli import build_parser
from tests.conftest import run_cli
from toolkit.core.artifacts.manifest import load_manifest

ARTIFACTS = {"digits": True, "batch": 32, "exit_channels": 16}
"""conftest.exported options (smallcnn on 8x8 digits); the artifacts fixture: tests/conftest.py"""


@pytest.mark.parametrize("board", ["rpi4", "jetson-orin-nano"])
def test_bundle_holds_what_a_board_needs(artifacts, tmp_path, board):
    out = tmp_path / "edge-bundle.tar.gz"
    r = run_cli("toolkit", "bundle", "--board", board, "--artifacts", str(artifacts),
                "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    root = tmp_path / "x" / "hiertrain-edge"
    load_manifest(root / "artifacts")  # every sha256 still matches
    assert f"name: {board}" in (root / "board.yaml").read_text()
    unit = (root / "hiertrain-edge.service").read_text()
    assert "[Install]" in unit and "WantedBy=multi-user.target" in unit
    budget = re.search(r"budget_mb:\s*(\d+)", (root / "board.yaml").read_text()).group(1)
    assert f"MemoryMax={budget}M" in unit
    env = dict(line.split("=", 1) for line in (root / "edge.env").read_text().splitlines()
               if line and not line.startswith("#"))
    exec_line = next(line for line in unit.replace("\\\n", "").splitlines()
                     if line.startswith("ExecStart="))
    argv = shlex.split(exec_line.removeprefix("ExecStart="))
    argv = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], a) for a in argv]
    assert argv[0].endswith("/edge-runtime")
    args = build_parser().parse_args(argv[1:])  # the edge runtime accepts this command line
    assert args.command == "train" and args.artifacts == "/opt/hiertrain/artifacts"
    install = (root / "INSTALL.md").read_text()
    assert "systemctl enable --now hiertrain-edge.service" in install
    assert "load_manifest" in install


def test_bundle_is_reproducible_and_refuses_tampered_artifacts(artifacts, tmp_path):
    a, b = tmp_path / "a.tar.gz", tmp_path / "b.tar.gz"
    for out in (a, b):
        assert run_cli("toolkit", "bundle", "--board", "rpi4", "--artifacts", str(artifacts),
                       "--out", str(out), timeout=120).returncode == 0
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in artifacts.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    (bad / "edge_train.pte").write_bytes(b"not the program")
    r = run_cli("toolkit", "bundle", "--board", "rpi4", "--artifacts", str(bad),
                "--out", str(tmp_path / "c.tar.gz"), timeout=120)
    assert r.returncode == 3 and "does not match the manifest" in r.stderr
    assert not (tmp_path / "c.tar.gz").exists()
