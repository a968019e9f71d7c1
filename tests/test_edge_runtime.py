"""The edge runtime against real parts: exported artifacts, the ExecuTorch runtime, real
digits data, an embedded MQTT broker on 127.0.0.1 and real edge-runtime processes.

Every wait is bounded; a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import queue
import secrets
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from edge_runtime.backends import ExecuTorchBackend, TorchBackend, make_backend
from edge_runtime.cli import main
from edge_runtime.infer import InferConfig, InferEngine, run_inference
from edge_runtime.publisher import Publisher
from edge_runtime.train import TrainConfig, load_training_data, run_training
from tests.conftest import wait_until
from toolkit.build.parity import relative_errors
from toolkit.core.data.datasets import batches, load_dataset, normalize
from toolkit.core.errors import BrokerUnreachableError, HiertrainError
from toolkit.core.protocol.codec import decode
from toolkit.core.protocol.messages import decode_status, decode_weights, encode_infer_reply
from toolkit.core.protocol.quant import QuantScheme
from toolkit.core.protocol.topics import (
    act_topic,
    infer_request_wildcard,
    parse_topic,
    status_topic,
    weights_topic,
)
from toolkit.core.protocol.wire import message_size
from toolkit.core.transport import open_link
from toolkit.lab.broker import free_port

# Backend equivalence after 10 SGD steps (lr 0.05, momentum 0.9) on real digits batches.
# Measured: worst per-tensor relative error 1e-6 (a BatchNorm bias; everything else
# <= 4e-7), first-step losses identical. Both backends compute the same function and
# differ only in float32 summation order (tests/test_export_parity.py); the gap grows
# with the number of steps (~4e-2 after 110 steps: SGD with momentum amplifies
# differences), so the bound is stated for 10 steps, with 100x headroom.
WEIGHTS_TOL = 1e-4
LOSS_TOL = 1e-4
BATCH = 32


def _uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


ARTIFACTS = {"digits": True, "batch": BATCH, "exit_channels": 16, "verify": True,
             "lowering": "xnnpack"}
"""conftest.exported options: the default lowering, which the ExecuTorch backend tests run
(and one test reads from the manifest); the same export as tests/test_integration.py's, made
once for both. artifacts, manifest and broker: tests/conftest.py"""


class Collector:
    """A subscriber link that records every message per topic, in arrival order."""

    def __init__(self, url: str, topics: list[str]):
        self.messages: dict[str, list[bytes]] = {}
        self.lock = threading.Lock()
        self.link = open_link(url, _uid("collector"))
        for t in topics:
            self.link.subscribe(t, self._on)
        self.link.connect(timeout=10)

    def _on(self, topic: str, payload: bytes, props: dict) -> None:
        with self.lock:
            self.messages.setdefault(topic, []).append(bytes(payload))

    def get(self, topic: str) -> list[bytes]:
        with self.lock:
            return list(self.messages.get(topic, []))

    def statuses(self, topic: str):
        return [decode_status(p) for p in self.get(topic)]

    def close(self) -> None:
        self.link.close()


# --------------------------------------------------------------------------- backends


def _digits_batches(manifest, n: int):
    ds = load_training_data(manifest, None, "0/1", limit=None, seed=0)
    out = []
    for i, b in enumerate(batches(ds, BATCH, epoch=0, seed=0)):
        if i >= n:
            break
        out.append(b)
    return out


def test_backends_train_the_same_weights(manifest):
    et, eager = ExecuTorchBackend(manifest), TorchBackend(manifest)
    initial = eager.state_dict()
    et_losses, eager_losses = [], []
    for x, y in _digits_batches(manifest, 10):
        a, b = et.step(x, y), eager.step(x, y)
        et_losses.append(a.loss)
        eager_losses.append(b.loss)
        assert a.cut.shape == b.cut.shape == (BATCH, *manifest.cut_shape)
        assert a.exit_logits.shape == (BATCH, manifest.num_classes)
    assert abs(et_losses[0] - eager_losses[0]) < LOSS_TOL
    for la, lb in zip(et_losses, eager_losses, strict=True):
        assert abs(la - lb) < 1e-3 * max(1.0, abs(lb)), (et_losses, eager_losses)

    sa, sb = et.state_dict(), eager.state_dict()
    assert list(sa) == list(sb) == list(initial)  # same keys as EdgeTrainStep.state_dict()
    floats = [k for k in sb if sb[k].is_floating_point()]
    moved = relative_errors({k: sb[k] for k in floats}, {k: initial[k] for k in floats})
    assert max(moved.values()) > 1e-2  # training moved the weights: the comparison means something
    errors = relative_errors({k: sa[k] for k in floats}, {k: sb[k] for k in floats})
    worst = max(errors, key=errors.get)
    assert errors[worst] < WEIGHTS_TOL, f"{worst}: {errors[worst]:.2e}"
    for k in sb:
        if not sb[k].is_floating_point():  # num_batches_tracked
            assert torch.equal(sa[k], sb[k]) and int(sb[k]) == 10, k


def test_executorch_backend_resumes_from_a_state_dict(manifest):
    trained = TorchBackend(manifest)
    data = _digits_batches(manifest, 4)
    for x, y in data[:3]:
        trained.step(x, y)
    state = trained.state_dict()
    et, eager = ExecuTorchBackend(manifest), TorchBackend(manifest)
    et.load_state_dict(state)  # before any step: materialises the program's parameters
    eager.load_state_dict(state)
    got = et.state_dict()
    for k in state:
        assert torch.equal(got[k], state[k]), k
    x, y = data[3]
    assert abs(et.step(x, y).loss - eager.step(x, y).loss) < LOSS_TOL


@pytest.mark.parametrize("backend", ["torch", "executorch"])
def test_wrong_batch_shape_names_both_shapes(manifest, backend):
    be = make_backend(backend, manifest)
    with pytest.raises(HiertrainError, match=rf"\[8, 1, 8, 8\].*\[{BATCH}, 1, 8, 8\]"):
        be.step(torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.int64))
    with pytest.raises(HiertrainError, match="unknown backend"):
        make_backend("tflite", manifest)


def test_xnnpack_program_on_a_runtime_without_xnnpack_names_the_fix(manifest, monkeypatch):
    """The default export delegates to XNNPACK; a board runtime built without it must say
    how to re-export, not fail deep inside the loader."""
    import toolkit.core.et_program

    assert manifest.data["programs"]["edge_train"]["lowering"]["convolutions"] == "xnnpack"
    monkeypatch.setattr(toolkit.core.et_program, "registered_backends", lambda: [])
    with pytest.raises(HiertrainError, match="--lowering matmul"):
        ExecuTorchBackend(manifest)


# --------------------------------------------------------------------------- over MQTT


@pytest.mark.mqtt
def test_training_publishes_every_batch_once_with_weights_and_status(
        artifacts, manifest, broker, tmp_path):
    run, dev = _uid("run"), "edge-a"
    topics = [act_topic(run, dev), weights_topic(run, dev), status_topic(run, dev)]
    sub = Collector(broker.url, topics)
    try:
        summary = run_training(TrainConfig(
            artifacts=artifacts, broker=broker.url, device_id=dev, run_id=run, epochs=2,
            limit=320, quiet=True, connect_timeout=10, state_dir=tmp_path,
            report=tmp_path / "report.json", confirm_timeout=0))  # no trainer to confirm
        n = summary["batches_published"]
        assert n == 2 * (320 // BATCH) and summary["samples_published"] == n * BATCH
        wait_until(lambda: len(sub.get(topics[0])) >= n, 20, f"{n} activation messages")
        wait_until(lambda: any(s.state == "done" for s in sub.statuses(topics[2])), 10,
                   "done status")
        acts = [decode(p, expected_run_id=run) for p in sub.get(topics[0])]
        statuses = sub.statuses(topics[2])
        weights = sub.get(topics[1])
    finally:
        sub.close()

    assert sorted(a.seq for a in acts) == list(range(n))  # every seq exactly once
    ds = load_training_data(manifest, None, "0/1", limit=320, seed=0)
    expected = {}
    for epoch in range(2):
        for i, (_, y) in enumerate(batches(ds, BATCH, epoch=epoch, seed=0)):
            expected[len(expected)] = (epoch, i, y)
    scheme = QuantScheme.from_dict(manifest.data["quantization"])
    for a in acts:
        epoch, i, y = expected[a.seq]
        assert (a.epoch, a.batch_index, a.device_id) == (epoch, i, dev)
        assert torch.equal(a.labels, y)
        assert a.scheme is not None and a.scheme == scheme
        assert tuple(a.tensor.shape) == (BATCH, *manifest.cut_shape)

    assert [s.state for s in statuses] == ["online", "training", "training", "done"]
    done = statuses[-1]
    assert (done.batches_published, done.samples_published, done.last_seq) == (n, n * BATCH, n - 1)
    assert done.exit_accuracy == pytest.approx(summary["exit_accuracy"])
    for key in ("wall_s", "bytes_sent", "publish_wait_s", "train_s", "backend"):
        assert key in done.extra, key
    assert done.extra["backend"] == "executorch"

    meta, state = decode_weights(weights[-1])
    # the epoch's samples, labels and the attempt id: the fleet's model (docs/fleet.md)
    attempt, counts = meta.pop("attempt"), meta.pop("label_counts")
    assert meta == {"run": run, "device": dev, "epoch": 1, "last_seq": n - 1,
                    "samples": n // 2 * BATCH,
                    "seen_classes": list(range(10))}  # inference masks the others
    assert len(attempt) == 8 and sum(counts) == n // 2 * BATCH and len(counts) == 10
    saved = torch.load(summary["weights_path"], weights_only=True)
    assert Path(summary["weights_path"]) == tmp_path / f"edge_weights-{dev}.pt"
    assert list(state) == list(saved) and all(torch.equal(state[k], saved[k]) for k in saved)

    # int8 codes + a small header per batch: a quarter of float32, plus overhead.
    per_sample = message_size((BATCH, *manifest.cut_shape), scheme, run_id=run,
                              device_id=dev) / BATCH
    assert summary["payload_bytes_per_sample"] == pytest.approx(per_sample)
    int8 = manifest.data["cut"]["int8_bytes_per_sample"]
    assert int8 < summary["payload_bytes_per_sample"] < int8 * 1.1
    assert summary["payload_bytes_per_sample"] < summary["float32_bytes_per_sample"] / 3
    assert (tmp_path / "report.json").is_file()


@pytest.mark.mqtt
def test_edge_never_waits_for_a_cloud_that_is_not_there(artifacts, broker, tmp_path):
    """Training never waits for the cloud; only the end does, for its acks, which
    --confirm-timeout 0 turns off (tests/test_confirm.py has the end without it)."""
    summary = run_training(TrainConfig(
        artifacts=artifacts, broker=broker.url, device_id="lonely", run_id=_uid("run"),
        epochs=2, limit=640, quiet=True, connect_timeout=10, state_dir=tmp_path,
        confirm_timeout=0))
    assert summary["delivery"]["confirmed"] is None
    assert summary["batches_published"] == 2 * 640 // BATCH
    # Nobody subscribes; the broker acknowledges anyway and the outbox never fills.
    assert summary["publish_wait_s"] < 0.05 * summary["wall_s"] + 0.05, summary
    assert summary["train_s"] < summary["wall_s"]


@pytest.mark.mqtt
def test_publisher_errors_surface_on_the_next_call(broker):
    link = open_link(broker.url, _uid("pub"))
    link.connect(timeout=10)
    pub = Publisher(link, maxsize=2)
    pub.submit("hiertrain/t/d/act", b"x")
    pub.flush(10)
    assert pub.stats.acked == 1 and pub.stats.bytes_acked == 1
    link.close()  # the publisher thread's next publish fails
    pub.submit("hiertrain/t/d/act", b"y")
    with pytest.raises(HiertrainError, match="publishing"):
        pub.flush(10)
    with pytest.raises(HiertrainError):
        pub.submit("hiertrain/t/d/act", b"z")
    pub.close()


@pytest.mark.mqtt
def test_cli_train_shows_no_progress_bars_when_its_output_is_captured(artifacts, broker, cli,
                                                                      tmp_path):
    """Without --quiet, a run whose output goes to a pipe (a log, a supervisor, this test)
    still logs its epochs but draws no progress bar: bars are for terminals."""
    run = _uid("run")
    res = cli("edge-runtime", "train", "--artifacts", str(artifacts), "--broker", broker.url,
              "--device-id", "d0", "--run-id", run, "--epochs", "1", "--limit", "64",
              "--backend", "torch", "--threads", "1", "--state-dir", str(tmp_path),
              "--confirm-timeout", "0", timeout=300)  # no trainer: nothing to confirm
    assert res.returncode == 0, res.stderr
    assert "epoch 1/1: loss" in res.stderr  # the info log is there
    for bar in ("\r", "batch/s", "%|", "it/s"):
        assert bar not in res.stderr and bar not in res.stdout, (bar, res.stderr)


@pytest.mark.mqtt
def test_split_run_without_a_cloud_trainer_is_incomplete_exit_5(artifacts, broker, cli,
                                                                 tmp_path):
    """A run that could not do its work (split learning, nobody sends gradients) is not a
    configuration error: RunIncompleteError, exit code 5, one line."""
    res = cli("edge-runtime", "train", "--artifacts", str(artifacts), "--broker", broker.url,
              "--device-id", "d0", "--run-id", _uid("run"), "--mode", "split",
              "--grad-timeout", "2", "--epochs", "1", "--limit", "64", "--quiet",
              "--threads", "1", "--state-dir", str(tmp_path), timeout=300)
    assert res.returncode == 5, res.stderr  # ExitCode.INCOMPLETE
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith("error: no live cloud trainer") and "Traceback" not in res.stderr


def test_every_cli_flag_has_help_without_hand_written_defaults():
    """``edge-runtime <cmd> --help`` explains every flag; defaults come from the shared
    formatter, never typed into the help (they went stale), and an unset default is not
    shown as "None"."""
    import argparse

    from edge_runtime.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    security = {"username", "password_file", "ca_file", "cert_file", "key_file",
                "hmac_key_file"}  # toolkit.core.security's own group
    assert set(sub.choices) == {"train", "infer", "provision", "cluster", "personalise"}
    for name, sp in sub.choices.items():
        for action in sp._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            assert action.help, f"{name} {action.option_strings[0]} has no help"
            if action.dest not in security:
                assert "(default" not in action.help, (name, action.option_strings[0])
        text = sp.format_help()
        assert "(default: None)" not in text, name
        assert "(default: 3)" in sub.choices["train"].format_help()  # --epochs: from argparse


@pytest.mark.mqtt
def test_killed_edge_leaves_a_retained_offline_status(artifacts, broker, tmp_path, procs):
    run, dev = _uid("run"), "doomed"
    topic = status_topic(run, dev)
    sub = Collector(broker.url, [topic, act_topic(run, dev)])
    proc = procs.start("edge", [
        "edge_runtime", "train", "--artifacts", str(artifacts), "--broker", broker.url,
        "--device-id", dev, "--run-id", run, "--epochs", "500", "--backend", "torch", "--quiet",
        "--state-dir", str(tmp_path)])
    try:
        wait_until(lambda: len(sub.get(act_topic(run, dev))) >= 5 or proc.poll() is not None, 60,
              "the edge process to publish activations")
        assert proc.poll() is None, procs.tail("edge")
        procs.kill("edge")  # SIGKILL: no clean disconnect, so the broker sends the will
        wait_until(lambda: any(s.state == "offline" for s in sub.statuses(topic)), 15,
              "the last will")
    finally:
        procs.kill("edge")
        sub.close()
    late = Collector(broker.url, [topic])  # a node joining later sees the retained will
    try:
        wait_until(lambda: bool(late.get(topic)), 10, "the retained status")
        assert late.statuses(topic)[-1].state == "offline"
    finally:
        late.close()


# --------------------------------------------------------------------------- bad input


def test_unreachable_broker_fails_in_time_with_one_line(artifacts, cli, tmp_path):
    url = f"mqtt://127.0.0.1:{free_port()}"  # nothing listens there
    t = time.monotonic()
    res = cli("edge-runtime", "train", "--artifacts", str(artifacts), "--broker", url,
              "--device-id", "d0", "--connect-timeout", "3", "--state-dir", str(tmp_path),
              "--backend", "torch", timeout=120)
    elapsed = time.monotonic() - t
    assert res.returncode == 4, res.stderr  # ExitCode.BROKER_UNREACHABLE
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and url in errors[0], res.stderr
    assert "Traceback" not in res.stderr
    assert "retrying" in res.stderr  # it said it was retrying
    assert elapsed < 60

    t = time.monotonic()  # in-process: the connect itself is bounded by the timeout
    with pytest.raises(BrokerUnreachableError, match=url):
        run_training(TrainConfig(artifacts=artifacts, broker=url, device_id="d0", quiet=True,
                                 connect_timeout=2, state_dir=tmp_path, backend="torch"))
    assert time.monotonic() - t < 2 + 10


def test_tampered_artifacts_are_refused(artifacts, tmp_path, capsys):
    bad = tmp_path / "art"
    shutil.copytree(artifacts, bad)
    blob = bytearray((bad / "edge_train.pte").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "edge_train.pte").write_bytes(bytes(blob))
    # In-process main(): the same code path as the console script (which the tests above
    # run as real processes) without paying for another torch import.
    rc = main(["train", "--artifacts", str(bad), "--broker", f"mqtt://127.0.0.1:{free_port()}",
               "--device-id", "d0", "--connect-timeout", "3", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 3  # ExitCode.BAD_INPUT: a HiertrainError (ManifestError)
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "does not match the manifest" in err and "edge_train.pte" in err


def test_bad_arguments_are_one_line_errors(artifacts, tmp_path):
    for kw, pattern in ((dict(shard="2/2"), "shard"), (dict(device_id="a/b"), "device id"),
                        (dict(epochs=0), "epochs")):
        cfg = {"artifacts": artifacts, "broker": "mqtt://127.0.0.1:1", "device_id": "d0",
               "quiet": True, "state_dir": tmp_path, **kw}
        with pytest.raises(HiertrainError, match=pattern):
            run_training(TrainConfig(**cfg))


# --------------------------------------------------------------------------- inference


class FakeCloud:
    """Answers every inference request with the true label of the sample it names
    (the request's ``seq`` is the test-sample index) and records what it was asked."""

    def __init__(self, url: str, run: str, labels: torch.Tensor, cut_shape):
        self.labels, self.cut_shape = labels, cut_shape
        self.inbox: queue.Queue = queue.Queue()
        self.asked: list[int] = []
        self.problems: list[str] = []
        self.stop = threading.Event()
        self.link = open_link(url, _uid("fake-cloud"))
        self.link.subscribe(infer_request_wildcard(run),
                            lambda t, p, props: self.inbox.put((t, p, props)))
        self.link.connect(timeout=10)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                topic, payload, props = self.inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            batch = decode(payload)
            parse_topic(topic)
            if batch.labels is not None or tuple(batch.tensor.shape) != (
                    1, *self.cut_shape):
                self.problems.append(f"bad request {batch.seq}")
            self.asked.append(batch.seq)
            label = int(self.labels[batch.seq])
            probs = [[1.0 if c == label else 0.0 for c in range(10)]]
            self.link.publish(props["response_topic"], encode_infer_reply([label], probs),
                              properties={"correlation_data": props["correlation_data"]})

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.link.close()


@pytest.mark.mqtt
def test_inference_exits_early_and_asks_the_cloud_otherwise(artifacts, manifest, broker,
                                                           tmp_path):
    run, dev, limit, threshold = _uid("run"), "edge-i", 120, 0.5
    summary = run_training(TrainConfig(
        artifacts=artifacts, broker=broker.url, device_id=dev, run_id=run, epochs=1,
        quiet=True, connect_timeout=10, state_dir=tmp_path, confirm_timeout=0))
    test = load_dataset(None, "test", input_shape=manifest.input_shape, limit=limit, seed=0)
    cloud = FakeCloud(broker.url, run, test.y, manifest.cut_shape)
    try:
        result = run_inference(InferConfig(
            artifacts=artifacts, broker=broker.url, device_id=dev, run_id=run,
            threshold=threshold, limit=limit, weights="retained", timeout=10, quiet=True,
            connect_timeout=10, report=tmp_path / "infer.json"))
    finally:
        cloud.close()
    assert not cloud.problems
    assert result["weights"]["source"] == "retained"
    assert result["samples"] == limit and result["cloud_timeouts"] == 0
    assert 0 < result["exit_rate"] < 1, result
    assert result["answered_by_cloud"] == len(cloud.asked) == limit - result["answered_locally"]
    assert result["cloud_accuracy"] == 1.0  # the fake cloud's answers were the ones used
    assert result["local_latency_ms"] > 0 and result["cloud_latency_ms"] > 0

    # Exactly the samples the exit is unsure about went to the cloud (reference: eager torch
    # with the saved weights; a sample within float noise of the threshold may go either way).
    state = torch.load(summary["weights_path"], weights_only=True)
    ref = InferEngine("torch", manifest, state)
    norm = manifest.data["model"]["normalization"]
    x = normalize(test.x, norm["mean"], norm["std"])
    unsure, borderline = set(), set()
    for i in range(limit):
        conf = float(torch.softmax(ref.run(x[i : i + 1])[1], dim=1).max())
        if conf < threshold:
            unsure.add(i)
        if abs(conf - threshold) < 1e-4:
            borderline.add(i)
    assert set(cloud.asked) - borderline == unsure - borderline


def test_inference_weights_file_must_exist(artifacts, tmp_path):
    with pytest.raises(HiertrainError, match="does not exist"):
        run_inference(InferConfig(artifacts=artifacts, broker="mqtt://127.0.0.1:1",
                                  device_id="d0", weights=str(tmp_path / "nope.pt")))
