"""benchmarks/fleet.py end to end: 5 light edges against the real cloud-trainer CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, require_mosquitto


@pytest.mark.mqtt
@pytest.mark.slow
def test_fleet_benchmark_small_grid(artifacts: Path, tmp_path: Path) -> None:
    """Every published batch trained exactly once with one worker and with two, latency
    and ack figures present, and a rerun resumes."""
    require_mosquitto()
    out = tmp_path / "fleet.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this tree, not an installed copy
    argv = [sys.executable, "benchmarks/fleet.py", "--edges", "5", "--workers", "1,2",
            "--seconds", "5", "--rate", "2", "--artifacts", str(artifacts), "--out", str(out),
            "--plot"]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    rows = {r["workers"]: r for r in json.loads(out.read_text())}
    ran = rows[1]
    assert ran["status"] == "ok", ran
    assert ran["published"] > 0 and ran["lost"] == 0 and ran["trained_twice"] == 0
    assert ran["latency_ms"]["p50"] > 0 and ran["ack_bytes_per_edge"]["mean"] > 0
    assert ran["machine"]["cores"] == os.cpu_count() and "fleet.py" in ran["command"]
    two = rows[2]
    assert two["status"] == "ok", two
    assert two["published"] > 0 and two["lost"] == 0 and two["trained_twice"] == 0
    assert out.with_suffix(".png").is_file()
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=120)
    assert again.returncode == 0 and "publishing" not in again.stdout, again.stdout
