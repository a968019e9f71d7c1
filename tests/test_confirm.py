"""The end of an edge's run: it exits only once the cloud trainer confirmed every batch.

docs/delivery.md, "Acks": a batch leaves the edge's spool only when the trainer acks it as
trained *and checkpointed*. An edge that exits with batches still unconfirmed leaves them to
a trainer crash (it loses what it trained since its last checkpoint, and nobody resends),
so after its last batch the edge waits for the acks while a trainer for the run exists,
and exits with code 5 (spool kept for ``--resume``) when they do not come in time.

Real processes on a real broker; every wait is bounded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import InProcessCloud, wait_until
from toolkit.core.errors import RunIncompleteError
from toolkit.lab.launch import ProcessGroup, StatusWatcher

pytestmark = [pytest.mark.mqtt, pytest.mark.faults]

BATCHES = 12
"""Edge batches per run (``--limit`` 12 x 16 samples, one epoch): fewer than the trainer's
``--checkpoint-every``, so no periodic checkpoint (and ack) happens during the run."""


def _run_id(tag: str) -> str:
    return f"{tag}{os.getpid()}"


class _Cloud:
    """A cloud trainer on a thread of this process (no second torch start-up), online when
    built: an edge started next publishes into its session."""

    def __init__(self, artifacts: Path, url: str, run_dir: Path, run: str,
                 devices: list[str]) -> None:
        self.watch = StatusWatcher(url, run)
        self.cloud = InProcessCloud(artifacts, url, run_dir, run, device_ids=devices,
                                    checkpoint_every=1000, idle_timeout=120, reraise=False)
        wait_until(lambda: self.watch.cloud_state() in ("online", "training"), 60,
                   "the cloud trainer to come online")

    def running(self) -> bool:
        return self.cloud.thread.is_alive()

    def close(self) -> None:
        self.cloud.close()
        self.watch.close()


def _edge(procs: ProcessGroup, name: str, artifacts: Path, url: str, run: str, device: str,
          state: Path, *extra: str) -> Path:
    """Start an edge process; returns where its report will be."""
    report = state / f"report-{name}.json"
    procs.start(name, ["edge_runtime", "train", "--artifacts", str(artifacts), "--broker", url,
                       "--device-id", device, "--run-id", run, "--epochs", "1", "--limit",
                       str(16 * BATCHES), "--backend", "torch", "--threads", "1", "--quiet",
                       "--state-dir", str(state), "--report", str(report), *extra])
    return report


def _delivery(report: Path) -> dict:
    return json.loads(report.read_text())["delivery"]


def test_a_short_run_waits_for_the_acks_of_its_last_batches(artifacts, broker, procs,
                                                           tmp_path):
    """A run too short for the trainer's first periodic checkpoint: the edge must not exit
    before its batches are acked. The trainer waits for a second edge, so it is not done
    with the run: it must checkpoint and ack a device as soon as that device is done and
    complete, not at its next periodic checkpoint (never, here) or at the run's end."""
    run = _run_id("short")
    cloud = _Cloud(artifacts, broker.url, tmp_path / "cloud", run, ["e0", "e1"])
    try:
        report = _edge(procs, "e0", artifacts, broker.url, run, "e0", tmp_path / "e0",
                       "--confirm-timeout", "30")
        rc = procs.wait("e0", 120)
        assert rc == 0, procs.tail("e0")
        d = _delivery(report)
        assert d["confirmed"] is True and d["spool_pending"] == 0, d
        assert d["batches_confirmed"] == BATCHES and d["incomplete"] is None
        assert cloud.running()  # still waiting for e1: the ack did not come from its end
    finally:
        cloud.close()


def test_an_edge_resumed_after_its_last_batch_delivers_its_spool(artifacts, broker, procs,
                                                                tmp_path):
    """The faults soak's stall (benchmarks/results/faults_soak_rerun.log, round 3): an edge
    killed after its last batch, with batches still in its spool, is resumed. It has nothing
    left to train, but it must send its spool and wait for the trainer's acks; the trainer
    then completes the run. Here the first attempt trains every batch with no trainer
    online (and --confirm-timeout 0, so it exits), which leaves the same state as the kill:
    a checkpoint at the end and a spool of unconfirmed batches that reached no trainer."""
    from edge_runtime.train import TrainConfig, run_training

    run = _run_id("resumed")
    state = tmp_path / "edge"
    first = run_training(TrainConfig(
        artifacts=artifacts, broker=broker.url, device_id="e0", run_id=run, epochs=1,
        limit=16 * BATCHES, backend="torch", quiet=True, state_dir=state, connect_timeout=10,
        confirm_timeout=0))
    assert first["delivery"]["spool_pending"] == BATCHES
    cloud = _Cloud(artifacts, broker.url, tmp_path / "cloud", run, ["e0"])
    try:
        second = _edge(procs, "edge", artifacts, broker.url, run, "e0", state, "--resume",
                       "--confirm-timeout", "60")
        rc = procs.wait("edge", 120)
        d = _delivery(second)
        assert d["resumed"]["seq"] == BATCHES  # nothing left to train
        assert rc == 0 and d["spool_pending"] == 0 and d["confirmed"] is True, (rc, d)
        summary = cloud.cloud.join(60)
    finally:
        cloud.close()
    assert cloud.cloud.error is None, cloud.cloud.error
    assert summary is not None and summary["complete"]
    assert summary["per_device"]["e0"]["trained"] == BATCHES


def test_unconfirmed_batches_end_the_run_with_exit_5_unless_the_wait_is_turned_off(
        artifacts, broker, tmp_path):
    """No trainer for the run: the edge cannot get its batches confirmed. It says so and
    ends incomplete (exit 5: RunIncompleteError) at once, its spool kept for --resume,
    instead of reporting success; --confirm-timeout 0 opts out of the check. A trainer that
    was online and goes offline is waited for, up to --confirm-timeout."""
    from edge_runtime.train import TrainConfig, run_training

    def cfg(run: str, state: Path, timeout: float) -> TrainConfig:
        return TrainConfig(artifacts=artifacts, broker=broker.url, device_id="e0", run_id=run,
                           epochs=1, limit=16 * 3, backend="torch", quiet=True,
                           state_dir=state, report=state / "report.json",
                           connect_timeout=10, confirm_timeout=timeout)

    run = _run_id("nocloud")
    with pytest.raises(RunIncompleteError, match="no cloud trainer") as exc:
        run_training(cfg(run, tmp_path / "a", 60))
    assert "--resume" in str(exc.value)
    d = _delivery(tmp_path / "a" / "report.json")  # the report is written all the same
    assert d["confirmed"] is False and d["spool_pending"] == 3 and d["confirm_wait_s"] < 10
    summary = run_training(cfg(run + "b", tmp_path / "b", 0))
    assert summary["delivery"]["confirmed"] is None
    assert summary["delivery"]["spool_pending"] == 3

    # A trainer that said it is online and then went offline (killed): wait for it, bounded.
    run = _run_id("gone")
    watch = StatusWatcher(broker.url, run)
    cloud = InProcessCloud(artifacts, broker, tmp_path / "cloud", run, device_ids=["other"],
                           idle_timeout=60, reraise=False)
    try:
        wait_until(lambda: watch.cloud_state() == "online", 30, "the trainer to come online")
    finally:
        cloud.close()  # stopped before the run is done: its status is no longer online
    with pytest.raises(RunIncompleteError, match="within 3 s"):
        run_training(cfg(run, tmp_path / "c", 3))
    d = _delivery(tmp_path / "c" / "report.json")
    assert d["confirmed"] is False and 3 <= d["confirm_wait_s"] < 10
    watch.close()
