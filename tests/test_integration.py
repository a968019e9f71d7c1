"""The mission's core loop end to end: broker, cloud trainer and two edge runtimes as separate
OS processes on 127.0.0.1, real digits data, once on the embedded broker and once on mosquitto.

Asserts: every published batch was received and trained exactly once (sequence numbers), exit
and full-model accuracy far above chance (10 classes: 0.1), and the edges never blocked on the
cloud (time spent waiting to publish is a small part of their wall time).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.lab.broker import EmbeddedBroker
from toolkit.lab.launch import ProcessGroup, start_cloud

EPOCHS = 4
EDGES = 2
TIMEOUT_S = 300


ARTIFACTS = {"digits": True, "batch": 32, "exit_channels": 16, "verify": True,
             "lowering": "xnnpack"}
"""conftest.exported options: the default export (XNNPACK, parity-checked) end to end"""


def _run_training(procs: ProcessGroup, url: str, artifacts: Path, tmp: Path,
                  run_id: str) -> tuple[dict, list[dict]]:
    cloud_dir = tmp / "cloud"
    cloud = start_cloud(procs, ["cloud_trainer", "--artifacts", str(artifacts), "--broker", url,
                                "--run-dir", str(cloud_dir), "--run-id", run_id, "--devices",
                                str(EDGES), "--threads", "1", "--quiet"], url, run_id)
    edges = [
        procs.start(f"edge-{i}", [
            "edge_runtime", "train", "--artifacts", str(artifacts), "--broker", url,
            "--device-id", f"robot-{i}", "--run-id", run_id, "--epochs", str(EPOCHS),
            "--shard", f"{i}/{EDGES}", "--report", str(tmp / f"edge-{i}.json"),
            "--state-dir", str(tmp), "--threads", "1", "--quiet"])
        for i in range(EDGES)
    ]
    procs.wait_all(timeout=TIMEOUT_S)
    logs = {f.name: f.read_text()[-3000:] for f in tmp.glob("*.log")}
    assert all(p.returncode == 0 for p in [*edges, cloud]), logs
    summary = json.loads((cloud_dir / "cloud_summary.json").read_text())
    reports = [json.loads((tmp / f"edge-{i}.json").read_text()) for i in range(EDGES)]
    return summary, reports


def _check(summary: dict, reports: list[dict]) -> None:
    for i, rep in enumerate(reports):
        dev = summary["per_device"][f"robot-{i}"]
        assert rep["batches_published"] > 0
        assert dev["published"] == rep["batches_published"]
        assert dev["trained"] == rep["batches_published"]  # every batch, exactly once
        assert dev.get("duplicates", 0) >= 0
        # the edge never waited for the cloud: publishing blocked for a sliver of its time
        assert rep["publish_wait_s"] < 0.2 * rep["wall_s"], rep
        assert rep["payload_bytes_per_sample"] < rep["float32_bytes_per_sample"] / 2
    assert summary["batches_trained"] == sum(r["batches_published"] for r in reports)
    assert summary["full_accuracy"] > 0.6, summary
    assert summary["exit_accuracy"] > 0.5, summary
    assert not summary.get("dropped"), summary["dropped"]


@pytest.mark.mqtt
def test_hierarchical_training_on_the_embedded_broker(artifacts, tmp_path, procs):
    with EmbeddedBroker() as broker:
        summary, reports = _run_training(procs, broker.url, artifacts, tmp_path, "it-amqtt")
    _check(summary, reports)


@pytest.mark.mqtt
@pytest.mark.mosquitto
def test_hierarchical_training_on_mosquitto(artifacts, tmp_path, procs, mosquitto_broker):
    summary, reports = _run_training(procs, mosquitto_broker.url, artifacts, tmp_path, "it-mosq")
    _check(summary, reports)
