"""Shared fixtures: real files in tmp dirs, real processes, real brokers on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(
    *args: str, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run one of the console entry points as a real OS process."""
    module = {"toolkit": "toolkit", "edge-runtime": "edge_runtime",
              "cloud-trainer": "cloud_trainer"}[args[0]]
    return subprocess.run(
        [sys.executable, "-m", module, *args[1:]], capture_output=True, text=True,
        timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
    )


@pytest.fixture
def cli():
    return run_cli
