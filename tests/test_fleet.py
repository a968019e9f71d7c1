"""A cloud trainer for a fleet (issue 15): device handling, evaluation off the training thread,
broker flow control, fair intake, per-device acks, the fleet status and TensorBoard.

The end-to-end tests run a real mosquitto (MQTT 5: receive maximum) on 127.0.0.1 and the
trainer in this process; the edges are the fake edges of ``tests/test_cloud_trainer.py``.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from cloud_trainer.device import Placement, resolve_device
from cloud_trainer.eval_worker import EvalWorker
from cloud_trainer.fair_queue import FairQueue
from tests.conftest import InProcessCloud, wait_until
from tests.test_cloud_trainer import FakeEdge, StatusWatch, _link, _run_id
from toolkit.core.errors import HiertrainError
from toolkit.core.protocol import topics
from toolkit.core.protocol.codec import BatchMeta, codec_for, decode
from toolkit.core.protocol.messages import decode_ack
from toolkit.core.protocol.quant import QuantScheme

NO_GPU = ("no CUDA GPU on this machine (torch.cuda.is_available() is False); this test runs "
          "where one exists")


@pytest.fixture(scope="module")
def broker(mosquitto_broker):
    """mosquitto: the receive maximum and the per-device topics are MQTT 5 / broker features."""
    return mosquitto_broker


def _batch(manifest: Any, seq: int, device: str = "cam", run: str = "r") -> Any:
    scheme = QuantScheme.from_dict(manifest.data["quantization"])
    bs = manifest.batch_size
    y = torch.arange(bs, dtype=torch.int64) % manifest.num_classes
    cut = torch.randn(bs, *manifest.cut_shape)
    msg = codec_for(scheme).encode(cut, y, BatchMeta(run, device, seq, 0, seq), base=scheme)
    return decode(msg), len(msg)


# --------------------------------------------------------------------------- device


def test_device_resolution_and_refusals() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(HiertrainError, match="is not a device|runs on"):
        resolve_device("tpu:0")
    if not torch.cuda.is_available():
        with pytest.raises(HiertrainError, match="--device cuda:1: .*use --device cpu"):
            resolve_device("cuda:1")
        with pytest.raises(HiertrainError, match="fp16 needs a GPU"):
            Placement.from_options("cpu", "fp16")


def test_dequantized_activation_is_the_wire_tensor(manifest) -> None:
    batch, _ = _batch(manifest, 0)
    place = Placement.from_options("cpu")
    assert torch.equal(place.activation(batch), batch.tensor)


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)
def test_cuda_dequantizes_on_the_gpu_and_trains(artifacts, manifest, tmp_path: Path) -> None:
    from cloud_trainer.config import CloudConfig
    from cloud_trainer.ingest import ActItem
    from cloud_trainer.learner import CloudLearner
    from cloud_trainer.modes.registry import strategy_for

    batch, n = _batch(manifest, 0, run="gpu")
    place = Placement.from_options("cuda")
    on_gpu = place.activation(batch)
    assert on_gpu.is_cuda and torch.allclose(on_gpu.cpu(), batch.tensor, atol=1e-6)
    for amp in ("off", "fp16"):
        cfg = CloudConfig(artifacts=artifacts, broker="mqtt://127.0.0.1:1",
                          run_dir=tmp_path / amp, run_id="gpu", device="cuda", amp=amp,
                          eval_limit=100)
        lr = CloudLearner(cfg, strategy_for(cfg))
        assert next(lr.cloud.parameters()).is_cuda
        lr.train_batch(ActItem(batch, n))
        assert lr.batches_trained == 1 and lr.evaluate(None, "test")["full_accuracy"] >= 0


def test_bf16_autocast_trains_on_the_cpu(artifacts, manifest, tmp_path: Path) -> None:
    """The mixed-precision path runs in the suite on a machine without a GPU."""
    from cloud_trainer.config import CloudConfig
    from cloud_trainer.ingest import ActItem
    from cloud_trainer.learner import CloudLearner
    from cloud_trainer.modes.registry import strategy_for

    cfg = CloudConfig(artifacts=artifacts, broker="mqtt://127.0.0.1:1", run_dir=tmp_path,
                      run_id="r", device="cpu", amp="bf16", eval_limit=100)
    lr = CloudLearner(cfg, strategy_for(cfg))
    before = {k: v.clone() for k, v in lr.cloud.state_dict().items()}
    batch, n = _batch(manifest, 0)
    lr.train_batch(ActItem(batch, n))
    assert lr.batches_trained == 1 and lr.fleet.failed == {}
    after = lr.cloud.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    assert all(v.dtype == before[k].dtype for k, v in after.items())  # weights stay float32


# --------------------------------------------------------------------------- eval worker, queue


def test_eval_worker_coalesces_per_edge_and_serves_oldest_first() -> None:
    gate = threading.Event()
    done: list[tuple[str | None, str]] = []

    def run(req: Any) -> None:
        gate.wait(10)
        done.append((req.device, req.trigger))

    w = EvalWorker(run)
    try:
        w.request("a", "weights")  # taken at once, blocks on the gate
        wait_until(lambda: w.pending() == 1 and not w._pending, 5, "the first evaluation to start")
        for trigger in ("w1", "w2", "w3"):
            w.request("b", trigger)  # coalesced into one, with the newest weights
        w.request("c", "weights")
        w.request("b", "w4")
        gate.set()
        assert w.drain(10)
    finally:
        w.close()
    assert done == [("a", "weights"), ("b", "w4"), ("c", "weights")]
    assert w.coalesced == 3 and w.evaluations == 3


def test_eval_worker_rate_limit_and_failures() -> None:
    starts: list[float] = []

    def run(req: Any) -> None:
        starts.append(time.monotonic())
        if req.device == "bad":
            raise RuntimeError("boom")

    w = EvalWorker(run, min_interval=0.3)
    try:
        for d in ("bad", "x", "y"):
            w.request(d, "t")
        assert w.drain(10)
    finally:
        w.close()
    assert len(starts) == 3 and w.failures == 1 and w.evaluations == 2
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) >= 0.28, gaps


def test_fair_queue_round_robins_edges_and_puts_control_first() -> None:
    q = FairQueue()
    for i in range(5):
        q.put(f"fast{i}", "fast")
    q.put("slow0", "slow")
    q.put("status", None)
    order = [q.get_nowait() for _ in range(q.qsize())]
    assert order == ["status", "fast0", "slow0", "fast1", "fast2", "fast3", "fast4"]
    with pytest.raises(queue.Empty):
        q.get_timed(0.05)


# --------------------------------------------------------------------------- broker flow control


@pytest.mark.mqtt
def test_receive_maximum_holds_messages_at_the_broker_without_blocking(broker) -> None:
    """Deferred acks: the broker sends at most ``receive_maximum`` unacknowledged messages,
    and the receiver's network thread keeps working (its own publishes complete)."""
    from toolkit.core.transport.mqtt import MqttLink

    run = _run_id()
    topic = topics.act_topic(run, "e0")
    got: list[bytes] = []
    releases: list[Any] = []
    rx = MqttLink(broker.url, f"rx-{run}", receive_maximum=2)

    def handler(t: str, payload: bytes, props: dict[str, Any]) -> None:
        releases.append(rx.defer_ack())
        got.append(payload)

    rx.subscribe(topic, handler)
    rx.connect(timeout=10)
    assert rx.protocol_version == "5"
    tx = _link(broker, "tx")
    tx.connect(timeout=10)
    try:
        for i in range(6):
            tx.publish(topic, b"m%d" % i, timeout=10)
        wait_until(lambda: len(got) >= 2, 10, "the first two messages")
        time.sleep(0.5)
        assert len(got) == 2  # the rest wait at the broker
        rx.publish(topics.status_topic(run, "x"), b"{}", timeout=5)  # not blocked
        releases[0]()
        releases[0]()  # a second release does nothing
        wait_until(lambda: len(got) >= 3, 10, "more messages after one release")
        time.sleep(0.3)
        # mosquitto 2.0 sends up to two for one PUBACK; still bounded, and never all
        assert 3 <= len(got) <= 4
        while len(got) < 6:
            for r in list(releases):
                r()
            time.sleep(0.05)
        assert got == [b"m%d" % i for i in range(6)]
    finally:
        tx.close()
        rx.close()


# --------------------------------------------------------------------------- the trainer


class AckWatch:
    """Every ack of a run, by the device topic it arrived on."""

    def __init__(self, broker: Any, run: str) -> None:
        self.acks: list[tuple[str, Any, int]] = []
        self.link = _link(broker, "ackwatch")
        self.link.subscribe(f"{topics.PREFIX}/{run}/+/ack", self._on)
        self.link.connect(timeout=10)

    def _on(self, topic: str, payload: bytes, props: dict[str, Any]) -> None:
        self.acks.append((topics.parse_topic(topic)[1], decode_ack(payload), len(payload)))

    def close(self) -> None:
        self.link.close()


@pytest.mark.mqtt
def test_fleet_run_acks_per_device_status_file_and_tensorboard(
        artifacts, manifest, broker, tmp_path: Path, monkeypatch) -> None:
    """Three edges; slow evaluations (each edge's weights ask for one) do not hold batches
    in the queue; each edge's acks come on its own topic and carry only its own seqs; the
    fleet status and TensorBoard show the run."""
    from cloud_trainer import evaluate
    from cloud_trainer.cli import main as cloud_main

    slow_s = 1.5
    real = evaluate.Evaluator.evaluate

    def slow(self: Any, *a: Any, **kw: Any) -> Any:
        time.sleep(slow_s)  # a held-out set that takes a while (a fleet's evaluations)
        return real(self, *a, **kw)

    monkeypatch.setattr(evaluate.Evaluator, "evaluate", slow)
    run = _run_id()
    devices = ["e0", "e1", "e2"]
    run_dir = tmp_path / "run"
    watch = StatusWatch(broker, run)
    acks = AckWatch(broker, run)
    cloud = InProcessCloud(artifacts, broker, run_dir, run, device_ids=devices,
                           checkpoint_every=5, status_every=0.5, eval_limit=100, queue_size=8)
    edges: list[FakeEdge] = []
    try:
        watch.wait_for("online", 30)
        edges = [FakeEdge(broker, manifest, run, d, index=i, count=3)
                 for i, d in enumerate(devices)]
        samples = {e.device: e.sample(4) for e in edges}
        for e in edges:
            e.status("online")
        for rnd in range(12):
            for e in edges:
                cut, y = samples[e.device][rnd % 4]
                e.publish_new(cut, y)
            if rnd % 4 == 3:  # epoch ends: weights, an evaluation each
                for e in edges:
                    e.link.publish(topics.weights_topic(run, e.device),
                                   _weights(e, rnd // 4), retain=True)
            time.sleep(0.1)
        for e in edges:
            e.status("done")
        s = cloud.join(120)
    finally:
        cloud.close()
        for e in edges:
            e.close()
        acks.close()
        watch.close()
    assert s is not None
    assert {d: s["per_device"][d]["trained"] for d in devices} == {d: 12 for d in devices}
    # evaluations ran (off the training thread) while batches kept moving
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["kind"] == "eval" and r["trigger"] == "weights" for r in evals) >= 2
    assert s["queue_wait"]["max_s"] < slow_s / 2, s["queue_wait"]
    # per-device acks
    by_device = {d: [a for dev, a, _ in acks.acks if dev == d] for d in devices}
    assert all(by_device[d] for d in devices), by_device.keys()
    for dev, ack, _ in acks.acks:
        assert set(ack.trained) <= {dev}, (dev, ack.trained)
    assert set(s["ack_bytes"]) == set(devices)
    last = {d: by_device[d][-1].confirmed(d) for d in devices}
    assert all(low == 12 for low, _ in last.values()), last
    # the fleet status file and the CLI that prints it
    status = json.loads((run_dir / "fleet_status.json").read_text())
    assert status["state"] == "done" and status["compute"]["device"] == "cpu"
    assert {d: (v["trained"], v["lag"]) for d, v in status["devices"].items()} == {
        d: (12, 0) for d in devices}
    assert all(v["full_accuracy"] is not None for v in status["devices"].values())
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cloud_main(["status", "--run-dir", str(run_dir)]) == 0
    table = out.getvalue()
    assert all(f"\n{d} " in table for d in devices) and "lag" in table, table
    # TensorBoard event files with the curves and the fleet figures
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"eval/full_accuracy", "fleet/samples_per_s", "fleet/queue_depth"} <= tags, tags
    assert any(t.startswith("eval/full_accuracy/e") for t in tags)


def _weights(edge: FakeEdge, epoch: int) -> bytes:
    from toolkit.core.protocol.messages import encode_weights

    return encode_weights(edge.step.state_dict(), {"run": edge.run, "device": edge.device,
                                                   "epoch": epoch, "last_seq": edge.seq - 1})


def test_status_command_without_a_run(tmp_path: Path, capsys) -> None:
    from cloud_trainer.cli import main as cloud_main

    assert cloud_main(["status", "--run-dir", str(tmp_path)]) != 0
    assert "no fleet_status.json" in capsys.readouterr().err


# --------------------------------------------------------------------------- several workers


class LightEdges:
    """Many edges on a few MQTT connections: replay real encoded batches, say online/done,
    and (like the spool) send again whatever is not acked when a new trainer appears."""

    def __init__(self, broker: Any, manifest: Any, run: str, devices: list[str],
                 per_device: int, links: int = 4) -> None:
        self.run, self.devices, self.per_device = run, devices, per_device
        sampler = FakeEdge(broker, manifest, run, "sampler")
        pool = sampler.sample(4)
        sampler.close()
        self.msgs = {d: [_encode_for(sampler, d, s, *pool[s % 4]) for s in range(per_device)]
                     for d in devices}
        self.links = [_link(broker, f"edges{i}") for i in range(links)]
        self.acked: dict[str, int] = {d: 0 for d in devices}
        self.instances: set[str] = set()
        self.seen_by: dict[str, set[str]] = {}  # trainer instances each edge has seen
        self.resends = 0
        self._lock = threading.Lock()
        for i, link in enumerate(self.links):
            for d in devices[i::links]:
                link.subscribe(topics.ack_topic(run, d), self._on_ack)
            link.connect(timeout=10)

    def _link_of(self, device: str) -> Any:
        return self.links[self.devices.index(device) % len(self.links)]

    def _on_ack(self, topic: str, payload: bytes, props: dict[str, Any]) -> None:
        device = topics.parse_topic(topic)[1]
        ack = decode_ack(payload)
        low, _ = ack.confirmed(device)
        with self._lock:
            self.acked[device] = max(self.acked[device], low)
            seen = self.seen_by.setdefault(device, set())
            new = ack.instance not in seen
            seen.add(ack.instance)
            self.instances.add(ack.instance)
        if new and len(seen) > 1:  # a restarted trainer: resend the unacked
            threading.Thread(target=self._resend, args=(device,), daemon=True).start()

    def _resend(self, device: str) -> None:
        with self._lock:
            start = self.acked[device]
        for seq in range(start, self.per_device):
            self.resends += 1
            self._link_of(device).publish(topics.act_topic(self.run, device),
                                          self.msgs[device][seq], timeout=30)

    def status(self, device: str, state: str, published: int) -> None:
        from toolkit.core.protocol.messages import Status

        st = Status("edge", device, self.run, state, batches_published=published,
                    last_seq=published - 1)
        self._link_of(device).publish(topics.status_topic(self.run, device), st.encode(),
                                      retain=True, timeout=30)

    def publish(self, device: str, seq: int) -> None:
        self._link_of(device).publish(topics.act_topic(self.run, device), self.msgs[device][seq],
                                      timeout=30)

    def publish_seqs(self, seqs: range) -> None:
        """Each edge's batches ``seqs``, edge after edge per seq (as a fleet sends)."""
        for seq in seqs:
            for d in self.devices:
                self.publish(d, seq)

    def all_done(self) -> None:
        for d in self.devices:
            self.status(d, "done", self.per_device)

    def close(self) -> None:
        for link in self.links:
            link.close()


def _complete_summary(proc: Any, out: str, err: str, edges: LightEdges) -> dict[str, Any]:
    """The leader's summary of a run that trained every batch of every edge."""
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert {d: v["trained"] for d, v in summary["per_device"].items()} == {
        d: edges.per_device for d in edges.devices}
    return summary


def _encode_for(edge: FakeEdge, device: str, seq: int, cut: torch.Tensor,
                y: torch.Tensor) -> bytes:
    from toolkit.core.protocol.quant import quantize
    from toolkit.core.protocol.wire import ActivationBatch, encode

    return encode(ActivationBatch(edge.run, device, seq, 0, seq,
                                  quantized=quantize(cut, edge.scheme), labels=y))


def _start_workers(artifacts: Path, broker: Any, run: str, run_dir: Path, devices: list[str],
                   trace: Path, *extra: str) -> Any:
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "cloud_trainer", "train", "--workers", "2",
           "--artifacts", str(artifacts), "--broker", broker.url, "--run-id", run,
           "--run-dir", str(run_dir), "--device-ids", ",".join(devices), "--trace", str(trace),
           "--checkpoint-every", "10", "--eval-limit", "100", "--idle-timeout", "60",
           "--threads", "1", "--no-tensorboard", "--quiet", "--json", *extra]
    # its own session: the test can end the launcher and its workers together (_stop)
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _stop(proc: Any) -> None:
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def _trace(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.mqtt
def test_two_workers_share_20_edges_and_train_every_batch_once(artifacts, manifest, broker,
                                                                tmp_path: Path) -> None:
    """``--workers 2``: the broker spreads the batches over both workers (shared
    subscription), each (device, seq) is trained by exactly one of them, and the leader's
    summary counts every batch of every edge."""
    run = _run_id()
    devices = [f"r{i:02d}" for i in range(20)]
    per_device = 6
    edges = LightEdges(broker, manifest, run, devices, per_device)
    trace = tmp_path / "trace.jsonl"
    proc = _start_workers(artifacts, broker, run, tmp_path / "run", devices, trace)
    try:
        wait_until(lambda: (tmp_path / "run" / "fleet_status.json").exists()
                   or proc.poll() is not None, 120, "the leader online")
        # online means every worker subscribed (a group barrier before the leader's status)
        for d in devices:
            edges.status(d, "online", 0)
        edges.publish_seqs(range(per_device))
        edges.all_done()
        out, err = proc.communicate(timeout=240)
    finally:
        _stop(proc)
        edges.close()
    assert _complete_summary(proc, out, err, edges)["dropped"] == {}
    rows = _trace(trace)
    keys = [(r["device"], r["seq"]) for r in rows]
    assert len(keys) == len(set(keys)) == 20 * per_device  # each batch once, fleet-wide
    share = {w: sum(r["worker"] == w for r in rows) for w in (0, 1)}
    assert share[0] > 0 and share[1] > 0, share  # the broker spread them


def _worker_pids(launcher_pid: int) -> list[int]:
    """The trainer workers under ``cloud-trainer --workers`` (python processes that run
    cloud_trainer, below the launcher)."""
    import psutil

    out = []
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        if "cloud_trainer" in cmd and "--workers" not in cmd:
            out.append(child.pid)
    return out


@pytest.mark.mqtt
@pytest.mark.slow
def test_a_killed_worker_costs_no_batch(artifacts, manifest, broker, tmp_path: Path) -> None:
    """SIGKILL one of two workers mid-run: the launcher restarts the group from the leader's
    checkpoint, the edges resend what was not acked (as their spool does), and every batch
    of every edge ends up trained once in the final model."""
    import os
    import signal

    run = _run_id()
    devices = [f"k{i:02d}" for i in range(20)]
    per_device = 10
    edges = LightEdges(broker, manifest, run, devices, per_device)
    trace = tmp_path / "trace.jsonl"
    run_dir = tmp_path / "run"
    proc = _start_workers(artifacts, broker, run, run_dir, devices, trace, "--max-restarts", "2")
    try:
        wait_until(lambda: (run_dir / "fleet_status.json").exists() or proc.poll() is not None,
                   120, "the leader online")
        time.sleep(1.0)
        for d in devices:
            edges.status(d, "online", 0)
        edges.publish_seqs(range(5))
        wait_until(lambda: trace.exists() and len(_trace(trace)) >= 40, 120,
                   "batches trained before the kill")
        wait_until(lambda: (run_dir / "checkpoint.pt").exists(), 60, "a first checkpoint")
        pids = _worker_pids(proc.pid)
        assert len(pids) == 2, pids
        os.kill(pids[-1], signal.SIGKILL)
        wait_until(lambda: len(set(_worker_pids(proc.pid)) - set(pids)) == 2
                   or proc.poll() is not None, 120, "the group restarted")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        edges.publish_seqs(range(5, per_device))
        edges.all_done()
        out, err = proc.communicate(timeout=300)
    finally:
        _stop(proc)
        edges.close()
    _complete_summary(proc, out, err, edges)
    assert len(edges.instances) >= 2  # the restarted group acked under a new instance


@pytest.mark.parametrize("flags, says", [
    (["--mode", "split"], "several trainer workers train --mode ht only, not --mode split"),
    (["--amp", "fp16"], "several trainer workers: use --amp bf16 or off"),
])
def test_workers_refuse_what_a_group_cannot_do_before_starting(tmp_path: Path, flags: list[str],
                                                               says: str) -> None:
    from tests.conftest import run_cli_in_process

    r = run_cli_in_process("cloud-trainer", "--workers", "2", "--artifacts", str(tmp_path),
                           "--broker", "mqtt://127.0.0.1:1", "--run-dir", str(tmp_path / "run"),
                           *flags)
    assert r.returncode == 3, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and says in lines[0], r.stderr


def test_group_environment_is_checked() -> None:
    from cloud_trainer.group import GroupEnv

    assert GroupEnv.from_env({}) is None and GroupEnv.from_env({"WORLD_SIZE": "1"}) is None
    assert GroupEnv.from_env({"WORLD_SIZE": "4", "RANK": "2"}) == GroupEnv(2, 4, 2)
    with pytest.raises(HiertrainError, match="RANK 5 is outside 0..3"):
        GroupEnv.from_env({"WORLD_SIZE": "4", "RANK": "5"})
    with pytest.raises(HiertrainError, match="must be integers"):
        GroupEnv.from_env({"WORLD_SIZE": "two"})
