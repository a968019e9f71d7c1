"""The edge's --threads holds for ExecuTorch's own thread pool, and the bench's ExecuTorch
step profile runs: the two things `toolkit bench` relies on to give its edge one core."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

ARTIFACTS = {"digits": True, "batch": 32, "exit_channels": 16, "verify": True,
             "lowering": "xnnpack"}
"""The export tests/test_edge_runtime.py uses (made once per session for both)."""

_COUNT = """
import argparse, os, sys
import torch
from edge_runtime.cli_args import setup
if sys.argv[2] != "unset":
    setup(argparse.Namespace(threads=int(sys.argv[2]), quiet=True))
else:
    torch.set_num_threads(1)
from toolkit.core.et_program import TrainingProgram
before = len(os.listdir("/proc/self/task"))
p = TrainingProgram.from_file(sys.argv[1] + "/edge_train.pte")
p.forward_backward(torch.zeros(32, 1, 8, 8), torch.zeros(32, dtype=torch.int64))
print(len(os.listdir("/proc/self/task")) - before)
"""


def _new_threads(artifacts: Path, threads: str) -> int:
    r = subprocess.run([sys.executable, "-c", _COUNT, str(artifacts), threads], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return int(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/task").is_dir() or (os.cpu_count() or 1) < 2,
                    reason="counts threads in /proc; needs two cores to tell")
def test_edge_threads_size_executorchs_pool(artifacts: Path) -> None:
    """Unset, ExecuTorch starts a worker per extra core whatever torch was told; the edge's
    --threads 1 (edge_runtime.cli_args.setup) keeps it to the calling thread."""
    assert _new_threads(artifacts, "unset") >= 1
    assert _new_threads(artifacts, "1") == 0


def test_executorch_step_profile(artifacts: Path) -> None:
    from toolkit.plan.profiling import measure_executorch_step

    step = measure_executorch_step(artifacts, threads=1)
    assert step["step_s"] > 0 and step["min_s"] <= step["step_s"] <= step["max_s"]
    assert (step["batch"], step["threads"], step["lowering"]) == (32, 1, "xnnpack")
    assert step["steps"] >= 1


def test_executorch_step_of_nothing_is_one_line(tmp_path: Path) -> None:
    from toolkit.core.errors import HiertrainError
    from toolkit.plan.profiling import measure_executorch_step

    with pytest.raises(HiertrainError, match="failed") as e:
        measure_executorch_step(tmp_path / "missing", threads=1)
    assert "\n" not in str(e.value)
