"""``toolkit bundle``: a real tarball from a real export, unpacked and checked like a board
would use it: artifacts pass their hashes, the systemd unit's command line is one the edge
runtime accepts, and the same inputs give the same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import tarfile
import zipfile

import pytest

from edge_runtime.cli import build_parser
from tests.conftest import REPO, InProcessCloud, run_cli, unit_argv, wait_until
from toolkit.core.artifacts.manifest import load_manifest
from toolkit.lab.launch import StatusWatcher

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
    # A crashed or rebooted board continues its run (docs/deploy.md), on the profile's
    # settings: --board supplies the threads and the spool budget, so the unit sets neither.
    assert args.resume and args.board == "/opt/hiertrain/board.yaml"
    assert args.threads is None and args.spool_mb is None
    install = (root / "INSTALL.md").read_text()
    assert "systemctl enable --now hiertrain-edge.service" in install
    assert "load_manifest" in install
    # The lean install: the board's list and hiertrain's wheel, installed --no-deps
    # (tests/test_aarch64.py installs the wheel and runs this unit's command on aarch64).
    (whl,) = root.glob("hiertrain-*-py3-none-any.whl")
    assert (root / "board-requirements.txt").read_bytes() == (
        REPO / "toolkit/deploy/board-requirements.txt").read_bytes()
    assert (f"pip install --no-deps -r hiertrain-edge/board-requirements.txt "
            f"hiertrain-edge/{whl.name}") in install
    assert "download.pytorch.org/whl/cpu" in install
    # docs/deploy.md gives the same two install commands (with the wheel's name as a glob)
    docs = (REPO / "docs/deploy.md").read_text()
    for line in install.splitlines():
        if "bin/pip install" in line:
            assert line.strip().replace(whl.name, "hiertrain-*.whl") in docs, line
    assert "firmware_configs/rpi4.yaml" in zipfile.ZipFile(whl).namelist()


def test_bundle_without_the_wheel_says_where_hiertrain_comes_from(artifacts, tmp_path):
    out = tmp_path / "edge-bundle.tar.gz"
    r = run_cli("toolkit", "bundle", "--board", "rpi4", "--artifacts", str(artifacts),
                "--out", str(out), "--no-wheel", timeout=120)
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tar:
        names = tar.getnames()
        install = tar.extractfile("hiertrain-edge/INSTALL.md").read().decode()
    assert not [n for n in names if n.endswith(".whl")]
    assert "hiertrain-edge/board-requirements.txt" in names
    assert "board-requirements.txt hiertrain==" in install and "package index" in install


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


@pytest.mark.mqtt
def test_the_units_command_resumes_safely_on_an_empty_state_dir(artifacts, broker, tmp_path):
    """The bundle's unit always passes --resume: on a board's first start (an empty state
    directory, no checkpoint, no spool) that must start the run at seq 0, and it reads the
    profile from the installed board.yaml (a profile whose batch differs from the export's
    is reported, not applied)."""
    out = tmp_path / "edge-bundle.tar.gz"
    r = run_cli("toolkit", "bundle", "--board", "rpi5", "--artifacts", str(artifacts),
                "--out", str(out), "--no-wheel", timeout=120)  # runs from the source tree
    assert r.returncode == 0, r.stderr
    with tarfile.open(out) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    root = tmp_path / "x" / "hiertrain-edge"
    prefix, state = tmp_path / "opt", tmp_path / "state"  # state: does not exist yet
    prefix.mkdir()
    (prefix / "board.yaml").write_bytes((root / "board.yaml").read_bytes())
    os.symlink(artifacts, prefix / "artifacts")
    run = f"unit{os.getpid()}"
    env = {"HIERTRAIN_BROKER": broker.url, "HIERTRAIN_DEVICE_ID": "robot-1",
           "HIERTRAIN_RUN_ID": run, "HIERTRAIN_DATA": "digits", "HIERTRAIN_EPOCHS": "1"}
    argv = unit_argv(root, env, prefix, state)
    argv.remove("--quiet")  # keep the info log: what the profile set
    watch = StatusWatcher(broker.url, run)
    cloud = InProcessCloud(artifacts, broker, tmp_path / "cloud", run, device_ids=["robot-1"],
                           idle_timeout=60, threads=1)
    try:
        wait_until(lambda: watch.cloud_state() in ("online", "training"), 30,
                   "the cloud trainer to come online")
        edge = subprocess.run(argv + ["--backend", "torch", "--limit", "320"],
                              capture_output=True, text=True, timeout=240, cwd=REPO)
        assert edge.returncode == 0, edge.stderr
        summary = cloud.join(120)
    finally:
        cloud.close()
        watch.close()
    report = json.loads((state / "last-run.json").read_text())
    assert report["delivery"]["resumed"] == {"epoch": 0, "batch": 0, "seq": 0}
    assert "no checkpoint" in edge.stderr and "starting afresh" in edge.stderr
    assert report["batches_published"] == 10 and report["delivery"]["replayed_not_resent"] == 0
    assert summary["per_device"]["robot-1"]["trained"] == 10  # seqs 0..9, none dropped
    assert report["config"]["board"] == f"{prefix}/board.yaml"
    assert report["delivery"]["spool_bytes_max"] == 1024 << 20  # rpi5: spool_mb 1024
    assert "board profile rpi5" in edge.stderr and "--threads 4" in edge.stderr
    assert "exported with batch 32" in edge.stderr  # the profile says 64: reported only
