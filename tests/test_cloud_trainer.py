"""cloud_trainer against real parts: exported artifacts, an embedded MQTT broker on
127.0.0.1 and a fake edge written here (an eager ``EdgeTrainStep`` publishing exactly what
the runtime spec says; ``edge_runtime`` is deliberately not imported). Every wait is bounded.

The end-to-end training test, the process that is SIGKILLed, ``serve`` (SIGTERM) and the
CLI error run ``python -m cloud_trainer`` as real processes; the protocol tests
(duplicates, malformed input, back-pressure, idle timeout, the resumed half of the resume
test) call ``run_cloud`` on a thread here, which exercises the same code without paying
another torch start-up each (keeps the file well under two minutes on two busy CPUs).
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from cloud_trainer.ledger import Ledger, SeqSet
from tests.conftest import InProcessCloud
from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.data.datasets import batches, load_dataset, normalize, shard
from toolkit.core.models.segments import load_segments
from toolkit.core.protocol import topics
from toolkit.core.protocol.messages import Status, decode_infer_reply, decode_status, encode_weights
from toolkit.core.protocol.quant import QuantScheme, quantize
from toolkit.core.protocol.wire import ActivationBatch, encode
from toolkit.core.transport import Link, open_link
from toolkit.lab.broker import EmbeddedBroker
from toolkit.lab.launch import ProcessGroup

REPO = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- fixtures


# artifacts, manifest, broker (embedded) and one torch thread: tests/conftest.py


def _run_id() -> str:
    return f"t{random.getrandbits(32):08x}"


def _link(broker: EmbeddedBroker, name: str) -> Link:
    link = open_link(broker.url, f"{name}-{os.getpid()}-{random.getrandbits(24):06x}")
    return link


def start_cloud(procs: ProcessGroup, artifacts: Path, broker: EmbeddedBroker, run_dir: Path,
                run: str, *extra: str) -> None:
    """``python -m cloud_trainer`` as process "cloud" (stdout in cloud.log, stderr in
    cloud.err)."""
    procs.start("cloud", ["cloud_trainer", "--artifacts", str(artifacts), "--broker",
                          broker.url, "--run-dir", str(run_dir), "--run-id", run, "--quiet",
                          "--threads", "1", *extra], separate_stderr=True)


class StatusWatch:
    """Collects one device's status messages (retained ones included)."""

    def __init__(self, broker: EmbeddedBroker, run: str, device: str = "cloud") -> None:
        self.q: queue.Queue[Status] = queue.Queue()
        self.link = _link(broker, "watch")
        self.link.subscribe(topics.status_topic(run, device),
                            lambda t, p, props: self.q.put(decode_status(p)))
        self.link.connect(timeout=10)

    def wait_for(self, state: str, timeout: float, after: float = 0.0,
                 procs: ProcessGroup | None = None) -> Status:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if procs is not None and procs.returncode("cloud") is not None:
                pytest.fail(f"cloud exited early ({procs.returncode('cloud')}):\n"
                            f"{procs.tail('cloud')}")
            try:
                st = self.q.get(timeout=0.2)
            except queue.Empty:
                continue
            if st.state == state and st.time >= after:
                return st
        pytest.fail(f"no {state!r} status within {timeout} s"
                    + (f":\n{procs.tail('cloud')}" if procs else ""))

    def close(self) -> None:
        self.link.close()


class FakeEdge:
    """What the edge runtime does, per the spec, with the eager ``EdgeTrainStep``."""

    def __init__(self, broker: EmbeddedBroker, manifest: Manifest, run: str, device: str,
                 index: int = 0, count: int = 1) -> None:
        self.run, self.device, self.index = run, device, index
        self.manifest = manifest
        self.step = load_segments(manifest).step.train()
        opt = manifest.data["optimizer"]
        self.opt = torch.optim.SGD(self.step.parameters(), lr=opt["lr"],
                                   momentum=opt["momentum"], weight_decay=opt["weight_decay"])
        norm = manifest.data["model"]["normalization"]
        ds = shard(load_dataset(None, "train", input_shape=manifest.input_shape), index, count)
        ds.x = normalize(ds.x, norm["mean"], norm["std"])
        self.ds = ds
        self.scheme = QuantScheme.from_dict(manifest.data["quantization"])
        self.seq = 0
        self.samples = 0
        self.link = _link(broker, device)
        self.link.set_will(topics.status_topic(run, device),
                           Status("edge", device, run, "offline").encode())
        self.link.connect(timeout=10)

    def status(self, state: str, epoch: int = 0, **extra: Any) -> None:
        st = Status("edge", self.device, self.run, state, epoch=epoch,
                    batches_published=self.seq, samples_published=self.samples,
                    last_seq=self.seq - 1, extra=extra)
        self.link.publish(topics.status_topic(self.run, self.device), st.encode(), retain=True)

    def message(self, seq: int, cut: torch.Tensor, y: torch.Tensor, epoch: int = 0,
                run: str | None = None) -> bytes:
        return encode(ActivationBatch(run or self.run, self.device, seq, epoch, seq,
                                      quantized=quantize(cut, self.scheme), labels=y))

    def send(self, payload: bytes) -> None:
        self.link.publish(topics.act_topic(self.run, self.device), payload)

    def sample(self, n: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``n`` (cut, labels) pairs from the untrained edge, for tests that need no learning."""
        out = []
        with torch.no_grad():
            for i, (x, y) in enumerate(batches(self.ds, self.manifest.batch_size, epoch=0,
                                               seed=self.index)):
                if i >= n:
                    break
                out.append((self.step.edge(x), y))
        return out

    def publish_new(self, cut: torch.Tensor, y: torch.Tensor, epoch: int = 0) -> int:
        seq = self.seq
        self.send(self.message(seq, cut, y, epoch))
        self.seq += 1
        self.samples += len(y)
        return seq

    def train_epoch(self, epoch: int) -> None:
        for x, y in batches(self.ds, self.manifest.batch_size, epoch=epoch, seed=self.index):
            out = self.step(x, y)
            self.opt.zero_grad()
            out[0].backward()
            self.opt.step()
            self.step.apply_stats(out[3:])
            self.publish_new(out[1], y, epoch)
        self.status("training", epoch)
        self.link.publish(topics.weights_topic(self.run, self.device),
                          encode_weights(self.step.state_dict(),
                                         {"run": self.run, "device": self.device,
                                          "epoch": epoch, "last_seq": self.seq - 1}),
                          retain=True)

    def close(self) -> None:
        self.link.close()


@contextmanager
def cloud_with_edge(artifacts: Path, manifest: Manifest, broker: EmbeddedBroker, run_dir: Path,
                    run: str, **cloud_options: Any) -> Iterator[tuple[InProcessCloud, FakeEdge,
                                                                       StatusWatch]]:
    """An in-process cloud trainer, online, and one fake edge ``e0`` already online.

    Everything is closed on the way out, the cloud first (its join may still be running).
    """
    watch = StatusWatch(broker, run)
    cloud = InProcessCloud(artifacts, broker, run_dir, run, **cloud_options)
    edge = None
    try:
        watch.wait_for("online", 30)
        edge = FakeEdge(broker, manifest, run, "e0")
        edge.status("online")
        yield cloud, edge, watch
    finally:
        cloud.close()
        if edge:
            edge.close()
        watch.close()


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "cloud_summary.json").read_text())


# --------------------------------------------------------------------------- unit


def test_seqset_and_ledger_state_roundtrip() -> None:
    s = SeqSet()
    for v in (0, 1, 3, 2, 7):
        assert s.add(v)
    assert not s.add(2) and s.low == 4 and s.above == {7} and len(s) == 5
    assert s.covers(4) and not s.covers(5)
    s.discard(1)
    assert 1 not in s and 0 in s and 2 in s and len(s) == 4

    ledger = Ledger()
    assert ledger.claim("a", 0) and not ledger.claim("a", 0)
    ledger.mark_trained("a", 0)
    ledger.claim("a", 1)  # claimed, never trained: not in the checkpoint
    restored = Ledger()
    restored.load_state_dict(ledger.state_dict())
    assert restored.is_trained("a", 0) and not restored.is_trained("a", 1)
    assert restored.claim("a", 1) and not restored.claim("a", 0)
    assert restored.duplicates("a") == 2


# --------------------------------------------------------------------------- end to end


@pytest.mark.mqtt
def test_two_edges_train_every_batch_once(artifacts: Path, manifest: Manifest,
                                          broker: EmbeddedBroker, tmp_path: Path,
                                          procs: ProcessGroup) -> None:
    run, run_dir = _run_id(), tmp_path / "run"
    watch = StatusWatch(broker, run)
    start_cloud(procs, artifacts, broker, run_dir, run, "--devices", "2", "--idle-timeout", "30")
    edges: list[FakeEdge] = []
    try:
        watch.wait_for("online", 40, procs=procs)
        edges = [FakeEdge(broker, manifest, run, f"edge{i}", i, 2) for i in range(2)]
        for e in edges:
            e.status("online")

        # Hierarchical inference against the live (training) cloud, with correlation data.
        replies: queue.Queue[tuple[bytes, dict]] = queue.Queue()
        reply_topic = topics.infer_reply_topic(run, "edge0")
        edges[0].link.subscribe(reply_topic, lambda t, p, props: replies.put((p, props)))
        cut, _ = edges[0].sample(1)[0]
        req = encode(ActivationBatch(run, "edge0", 0, 0, 0, quantized=quantize(
            cut[:2], edges[0].scheme)))
        edges[0].link.publish(topics.infer_request_topic(run, "edge0"), req, properties={
            "response_topic": reply_topic, "correlation_data": b"corr-42"})
        payload, props = replies.get(timeout=15)
        assert props["correlation_data"] == b"corr-42"
        reply = decode_infer_reply(payload)
        assert reply["error"] == "" and len(reply["pred"]) == 2 and len(reply["prob"][0]) == 10

        for epoch in range(2):
            for e in edges:
                e.train_epoch(epoch)
        for e in edges:
            e.status("done", 1)
        assert procs.wait("cloud", 60) == 0, procs.tail("cloud")
    finally:
        procs.kill("cloud")
        for e in edges:
            e.close()
        watch.close()

    s = _summary(run_dir)
    for e in edges:
        assert s["per_device"][e.device]["trained"] == e.seq == s["per_device"][e.device][
            "published"]
        assert s["per_device"][e.device]["duplicates"] == 0
    assert s["batches_trained"] == sum(e.seq for e in edges)
    assert s["complete"] and s["dropped"] == {}
    assert s["full_accuracy"] > 0.5, s
    assert s["max_queue_depth"] <= 64 and s["bytes_received"] > 0
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"train", "eval"} <= {x["kind"] for x in lines}
    assert (run_dir / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    for name in ("cloud_final.pt", "full_model.pt", "checkpoint.pt"):
        assert (run_dir / name).stat().st_size > 0
    assert "trained" in procs.output("cloud")


@pytest.mark.mqtt
def test_duplicates_train_once(artifacts: Path, manifest: Manifest, broker: EmbeddedBroker,
                               tmp_path: Path) -> None:
    run = _run_id()
    with cloud_with_edge(artifacts, manifest, broker, tmp_path / "run", run,
                         device_ids=["e0"]) as (cloud, edge, _):
        sent = [edge.message(edge.publish_new(c, y), c, y) for c, y in edge.sample(10)]
        for seq in (2, 5, 7, 2):  # at-least-once redelivery, one of them twice
            edge.send(sent[seq])
        edge.status("done")
        s = cloud.join(40)
    dev = s["per_device"]["e0"]
    assert (dev["trained"], dev["published"], dev["duplicates"]) == (10, 10, 4)
    assert s["batches_trained"] == 10 and s["dropped"] == {}


@pytest.mark.mqtt
def test_malformed_messages_are_counted_and_dropped(
    artifacts: Path, manifest: Manifest, broker: EmbeddedBroker, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = _run_id()
    caplog.set_level("WARNING", logger="cloud_trainer")
    with cloud_with_edge(artifacts, manifest, broker, tmp_path / "run", run,
                         device_ids=["e0"]) as (cloud, edge, _):
        (cut, y), (cut1, y1) = edge.sample(2)
        for _ in range(2):  # twice: counted twice, logged once
            damaged = bytearray(edge.message(0, cut, y))
            damaged[-10] ^= 0xFF  # a payload byte flipped in transit
            edge.send(bytes(damaged))                                      # crc
        edge.send(edge.message(0, cut, y, run="another-run"))              # run_id
        edge.send(edge.message(0, cut[:, :8], y))                          # shape
        edge.send(b"this is not an activation batch at all" * 3)           # magic
        edge.send(edge.message(0, cut, torch.full_like(y, 10)))            # labels (10 classes)
        edge.link.publish(topics.status_topic(run, "e0"), b"{not json")    # status
        weights = bytearray(encode_weights(edge.step.state_dict(), {"run": run}))
        weights[20] ^= 0xFF
        edge.link.publish(topics.weights_topic(run, "e0"), bytes(weights))  # crc (weights)
        edge.publish_new(cut, y)  # seq 0 was only ever dropped: it is accepted when intact
        edge.publish_new(cut1, y1)
        edge.status("done")
        s = cloud.join(40)
    assert s["dropped"] == {"crc": 3, "labels": 1, "magic": 1, "run_id": 1, "shape": 1,
                            "status": 1}
    assert s["per_device"]["e0"]["trained"] == 2 and s["complete"]
    crc_warnings = [r for r in caplog.records if "(crc)" in r.getMessage()]
    assert len(crc_warnings) == 1 and crc_warnings[0].levelname == "WARNING"


@pytest.mark.mqtt
def test_backpressure_loses_nothing(artifacts: Path, manifest: Manifest, broker: EmbeddedBroker,
                                    tmp_path: Path) -> None:
    import threading

    run = _run_id()
    pubs: list[Link] = []
    with cloud_with_edge(artifacts, manifest, broker, tmp_path / "run", run, device_ids=["e0"],
                         queue_size=2) as (cloud, edge, _):
        try:
            cut, y = edge.sample(1)[0]
            msgs = [edge.message(seq, cut, y) for seq in range(50)]
            # A burst from 5 parallel publishers outpaces the trainer: the queue must push back.
            pubs = [_link(broker, f"burst{i}") for i in range(5)]
            for p in pubs:
                p.connect(timeout=10)

            def burst(i: int) -> None:
                for m in msgs[i::5]:
                    pubs[i].publish(topics.act_topic(run, "e0"), m, timeout=30)

            threads = [threading.Thread(target=burst, args=(i,)) for i in range(5)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            edge.seq, edge.samples = 50, 50 * len(y)
            edge.status("done")
            s = cloud.join(60)
        finally:
            for p in pubs:
                p.close()
    assert s["per_device"]["e0"]["trained"] == 50 and s["dropped"] == {}
    assert 1 <= s["max_queue_depth"] <= 2


@pytest.mark.mqtt
def test_resume_after_sigkill_trains_each_seq_once(artifacts: Path, manifest: Manifest,
                                                   broker: EmbeddedBroker,
                                                   tmp_path: Path, procs: ProcessGroup) -> None:
    """What this proves: a restarted cloud reloads its checkpoint and never trains a
    checkpointed seq again (replays of them are duplicates), while seqs trained after
    the last checkpoint -- lost with the killed process -- are trained exactly once more.
    The edge replays everything after the restart, since with clean MQTT sessions the
    broker does not keep what was published while the cloud was down. The killed cloud
    is a real process (SIGKILL); the restarted one runs in this process."""
    run, run_dir = _run_id(), tmp_path / "run"
    watch = StatusWatch(broker, run)
    start_cloud(procs, artifacts, broker, run_dir, run, "--device-ids", "e0",
                "--checkpoint-every", "5", "--idle-timeout", "20")
    edge = None
    restarted: InProcessCloud | None = None
    try:
        watch.wait_for("online", 40, procs=procs)
        edge = FakeEdge(broker, manifest, run, "e0")
        edge.status("online")
        samples = edge.sample(40)
        sent = [edge.message(edge.publish_new(c, y), c, y) for c, y in samples[:30]]
        deadline = time.monotonic() + 30
        ckpt_path = run_dir / "checkpoint.pt"
        while time.monotonic() < deadline:
            if ckpt_path.exists():
                ckpt = torch.load(ckpt_path, weights_only=True)
                if ckpt["ledger"]["trained"].get("e0", {}).get("low", 0) >= 10:
                    break
            time.sleep(0.05)
        else:
            pytest.fail(f"no checkpoint with 10 trained batches within 30 s:\n"
                        f"{procs.tail('cloud')}")
        procs.kill("cloud")
        ckpt = torch.load(ckpt_path, weights_only=True)
        checkpointed = SeqSet.from_dict(ckpt["ledger"]["trained"]["e0"])
        assert len(checkpointed) >= 10

        after = time.time()
        restarted = InProcessCloud(artifacts, broker, run_dir, run, device_ids=["e0"],
                                   checkpoint_every=5)
        watch.wait_for("online", 30, after=after)
        for m in sent:  # replay all of phase 1
            edge.send(m)
        for c, y in samples[30:]:
            edge.publish_new(c, y)
        edge.status("done")
        s = restarted.join(40)
    finally:
        procs.kill("cloud")
        if restarted:
            restarted.close()
        if edge:
            edge.close()
        watch.close()
    dev = s["per_device"]["e0"]
    assert dev["trained"] == dev["published"] == 40 == s["batches_trained"]
    assert s["resumed_batches"] == len(checkpointed)
    assert dev["duplicates"] == len(checkpointed)
    assert s["session_batches_trained"] == 40 - len(checkpointed)
    final = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert SeqSet.from_dict(final["ledger"]["trained"]["e0"]).covers(40)


@pytest.mark.mqtt
def test_idle_timeout_names_missing_and_incomplete_devices(
    artifacts: Path, manifest: Manifest, broker: EmbeddedBroker, tmp_path: Path
) -> None:
    from toolkit.core.errors import RunIncompleteError

    run, run_dir = _run_id(), tmp_path / "run"
    # Frequent own statuses: they come back through the wildcard and must not count
    # as activity, or the idle timeout would never fire.
    with cloud_with_edge(artifacts, manifest, broker, run_dir, run, devices=2,
                         idle_timeout=1.5, status_every=0.2) as (cloud, edge, watch):
        for c, y in edge.sample(3):
            edge.publish_new(c, y)
        edge.seq += 1  # says it published 4, but seq 3 never arrives
        edge.status("done")
        with pytest.raises(RunIncompleteError) as info:
            cloud.join(30)
        final = watch.wait_for("error", 10)
    msg = str(info.value)
    assert "no message for 1.5 s" in msg and "e0 is done but 3 of its 4 batches arrived" in msg
    assert "1 more device(s) never came online" in msg
    assert info.value.exit_code == 5
    assert info.value.summary == _summary(run_dir)  # what --json prints on exit 5
    s = _summary(run_dir)
    assert not s["complete"] and s["per_device"]["e0"]["trained"] == 3
    assert final.extra["per_device"] == {"e0": 3}


@pytest.mark.mqtt
def test_serve_answers_inference_with_correlation(artifacts: Path, manifest: Manifest,
                                                  broker: EmbeddedBroker,
                                                  tmp_path: Path, procs: ProcessGroup) -> None:
    from cloud_trainer.infer import cloud_predict

    run, run_dir = _run_id(), tmp_path / "run"
    run_dir.mkdir()
    cloud_model = load_segments(manifest).cloud
    torch.save(cloud_model.state_dict(), run_dir / "cloud_final.pt")
    watch = StatusWatch(broker, run)
    procs.start("cloud", ["cloud_trainer", "serve", "--artifacts", str(artifacts), "--broker",
                          broker.url, "--run-dir", str(run_dir), "--run-id", run, "--quiet",
                          "--duration", "60", "--json"],
                separate_stderr=True)
    link = None
    try:
        st = watch.wait_for("online", 40, procs=procs)
        assert st.extra["mode"] == "serve"
        link = _link(broker, "asker")
        replies: queue.Queue[tuple[bytes, dict]] = queue.Queue()
        reply_topic = topics.infer_reply_topic(run, "e0")
        link.subscribe(reply_topic, lambda t, p, props: replies.put((p, props)))
        link.connect(timeout=10)
        x = torch.rand(3, *manifest.cut_shape)
        q = quantize(x, QuantScheme.from_dict(manifest.data["quantization"]))
        req = encode(ActivationBatch(run, "e0", 0, 0, 0, quantized=q))
        for corr, payload in ((b"\x00\x01first", req), (b"second", b"garbage bytes here!!")):
            link.publish(topics.infer_request_topic(run, "e0"), payload, properties={
                "response_topic": reply_topic, "correlation_data": corr})
        got = {}
        for _ in range(2):
            payload, props = replies.get(timeout=15)
            got[props["correlation_data"]] = decode_infer_reply(payload)
        from toolkit.core.protocol.quant import dequantize

        want, _ = cloud_predict(cloud_model, dequantize(q))
        assert got[b"\x00\x01first"]["pred"] == want and got[b"\x00\x01first"]["error"] == ""
        assert got[b"second"]["pred"] == [] and got[b"second"]["error"].startswith("magic")
        procs.send_signal("cloud", signal.SIGTERM)
        assert procs.wait("cloud", 20) == 0, procs.tail("cloud")
    finally:
        procs.kill("cloud")
        if link:
            link.close()
        watch.close()
    result = json.loads(procs.output("cloud"))
    assert result["answered"] == 1 and result["refused"] == 1


def test_unwritable_run_dir_is_one_line_error(artifacts: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = subprocess.run(
        [sys.executable, "-m", "cloud_trainer", "--artifacts", str(artifacts),
         "--broker", "mqtt://127.0.0.1:1", "--run-dir", str(blocker / "run"), "--quiet"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert proc.returncode == 3  # bad input or configuration (toolkit.core.entry.ExitCode)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(blocker / "run") in lines[0]



# --------------------------------------------------------------------------- front door

SUMMARY_KEYS = {"run_id", "mode", "end", "complete", "missing", "batches_trained",
                "samples_trained", "per_device", "dropped", "full_accuracy", "exit_accuracy",
                "wall_s", "samples", "bytes_up", "bytes_down", "link"}


def test_version_and_help_defaults() -> None:
    from toolkit import __version__

    r = subprocess.run([sys.executable, "-m", "cloud_trainer", "--version"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == f"cloud-trainer {__version__}", r
    helps = {}
    for command in ("train", "serve"):
        r = subprocess.run([sys.executable, "-m", "cloud_trainer", command, "--help"],
                           capture_output=True, text=True, timeout=60, cwd=REPO)
        assert r.returncode == 0 and "--json" in r.stdout, r.stderr
        helps[command] = " ".join(r.stdout.split())
        # The formatter prints each default once; required flags print none.
        assert "(default: 30.0)" in helps[command] and "(default 30" not in helps[command]
        assert "--artifacts DIR artifacts directory of 'toolkit export' --broker" in helps[
            command]
    assert "(default: 120.0)" in helps["train"] and "(default 120)" not in helps["train"]


@pytest.mark.mqtt
def test_json_prints_the_summary_of_a_complete_run(artifacts: Path, manifest: Manifest,
                                                   broker: EmbeddedBroker, tmp_path: Path,
                                                   procs: ProcessGroup) -> None:
    run, run_dir = _run_id(), tmp_path / "run"
    watch = StatusWatch(broker, run)
    start_cloud(procs, artifacts, broker, run_dir, run, "--device-ids", "e0",
                "--idle-timeout", "30", "--json")
    edge = None
    try:
        watch.wait_for("online", 40, procs=procs)
        edge = FakeEdge(broker, manifest, run, "e0")
        edge.status("online")
        for c, y in edge.sample(3):
            edge.publish_new(c, y)
        edge.status("done")
        assert procs.wait("cloud", 60) == 0, procs.errors("cloud")
    finally:
        if edge:
            edge.close()
        watch.close()
    out = procs.output("cloud")
    assert len(out.strip().splitlines()) == 1  # one JSON object; logs went to stderr
    printed = json.loads(out)
    assert SUMMARY_KEYS <= set(printed) and printed == _summary(run_dir)
    assert printed["complete"] and printed["batches_trained"] == 3


@pytest.mark.mqtt
def test_idle_timeout_with_a_missing_device_exits_5(artifacts: Path, manifest: Manifest,
                                                    broker: EmbeddedBroker, tmp_path: Path,
                                                    procs: ProcessGroup) -> None:
    run, run_dir = _run_id(), tmp_path / "run"
    watch = StatusWatch(broker, run)
    edge = FakeEdge(broker, manifest, run, "e0")  # ready first: the idle clock is short
    batches = edge.sample(2)
    start_cloud(procs, artifacts, broker, run_dir, run, "--device-ids", "e0,e1",
                "--idle-timeout", "3", "--json")
    try:
        watch.wait_for("online", 40, procs=procs)
        edge.status("online")
        for c, y in batches:
            edge.publish_new(c, y)
        edge.status("done")
        assert procs.wait("cloud", 60) == 5, procs.errors("cloud")
    finally:
        edge.close()
        watch.close()
    errors = [x for x in procs.errors("cloud").splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "no message for 3 s" in errors[0]
    assert "e1 never appeared" in errors[0]
    printed = json.loads(procs.output("cloud"))  # --json: the summary, on exit 5 too
    assert SUMMARY_KEYS <= set(printed) and not printed["complete"]
    assert printed["end"] == "idle" and printed["per_device"]["e0"]["trained"] == 2


def test_unreachable_broker_exits_4(artifacts: Path, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "cloud_trainer", "--artifacts", str(artifacts),
         "--broker", f"mqtt://127.0.0.1:{port}", "--run-dir", str(tmp_path / "run"),
         "--connect-timeout", "2", "--threads", "1", "--quiet", "--json"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert proc.returncode == 4, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]  # + retry warnings
    assert len(errors) == 1 and "cannot reach MQTT broker" in errors[0], proc.stderr[-3000:]
    assert proc.stdout == ""  # no summary: nothing ran
