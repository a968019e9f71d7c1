"""``toolkit demo``, the README's main job, as a user runs it: one command, real processes."""

from __future__ import annotations

import json

import pytest

KEYS = {"exit_accuracy", "full_accuracy", "samples_published", "batches_published",
        "batches_trained", "bytes_per_sample", "float32_bytes_per_sample", "wall_s"}


@pytest.mark.mqtt
def test_demo_runs_end_to_end_and_writes_its_summary(cli, tmp_path):
    run_dir = tmp_path / "run"
    r = cli("toolkit", "demo", "--run-dir", str(run_dir), "--epochs", "2", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "full-model accuracy" in r.stdout and "bytes per sample" in r.stdout
    s = json.loads((run_dir / "summary.json").read_text())
    assert KEYS <= set(s)
    assert s["batches_trained"] == s["batches_published"] > 0
    assert s["samples_published"] == s["batches_published"] * 32
    assert s["full_accuracy"] > 0.5 and s["exit_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert s["bytes_per_sample"] < s["float32_bytes_per_sample"] / 3
    assert (run_dir / "cloud" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "artifacts" / "manifest.json").is_file()


def test_demo_refuses_a_bad_broker_url(cli, tmp_path):
    r = cli("toolkit", "demo", "--run-dir", str(tmp_path / "r"), "--broker", "http://x",
            timeout=300)
    assert r.returncode == 3
    assert "Traceback" not in r.stderr and "error:" in r.stderr and "http://x" in r.stderr
    assert not (tmp_path / "r" / "artifacts").exists()  # refused before any work
