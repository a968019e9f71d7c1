"""Link shaping (toolkit/core/transport/shaping.py) against real brokers and real sockets on
127.0.0.1.

* the bytes charged per publish are the bytes paho really writes (a raw socket server reads them);
* a stream through mosquitto (or the embedded broker) holds the configured rate within 10 %;
* latency delays every message and is pipelined; a fast producer is slowed to the link's rate;
* bad flag values are one-line CLI errors; ``edge-runtime train --link-kbps`` really slows a run.

Timing assertions are lower bounds where the model guarantees them (a sleep can only be late),
and the one two-sided check (rate within 10 %) runs ~3 s so that one late wake-up on a loaded
machine costs a few percent at most: the scheduler sleeps to absolute deadlines and catches up.
"""

from __future__ import annotations

import json
import os
import queue
import random
import socket
import struct
import threading
import time
from typing import Any

import pytest

from tests.conftest import run_cli
from toolkit.core.errors import HiertrainError
from toolkit.core.transport import LinkShape, ShapedLink, open_link
from toolkit.core.transport.mqtt import MqttLink
from toolkit.core.transport.shaping import mqtt_publish_size
from toolkit.lab.broker import EmbeddedBroker, MosquittoBroker, find_mosquitto

pytestmark = pytest.mark.mqtt

Broker = EmbeddedBroker | MosquittoBroker


@pytest.fixture(scope="module")
def broker(request: pytest.FixtureRequest) -> Broker:
    """mosquitto when installed (C, never the bottleneck), else the embedded broker."""
    return request.getfixturevalue("mosquitto_broker" if find_mosquitto() else "embedded_broker")


def _cid(name: str) -> str:
    return f"shape-{name}-{os.getpid()}-{random.getrandbits(24):06x}"


class _Arrivals:
    """A subscriber that timestamps every message on arrival (paho's thread only enqueues)."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.q: queue.Queue[tuple[float, str, bytes]] = queue.Queue()
        self.link = open_link(broker.url, _cid("sub"))
        self.link.subscribe(topic, lambda t, p, _props: self.q.put((time.monotonic(), t, p)))
        self.link.connect(timeout=10)

    def take(self, n: int, timeout: float) -> list[tuple[float, str, bytes]]:
        deadline = time.monotonic() + timeout
        out = []
        for _ in range(n):
            out.append(self.q.get(timeout=max(0.01, deadline - time.monotonic())))
        return out


def _shaped(broker: Broker, shape: LinkShape, **kw: Any) -> ShapedLink:
    link = ShapedLink(open_link(broker.url, _cid("pub")), shape, **kw)
    link.connect(timeout=10)
    return link


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kbps, latency", [(0, 0), (-5, 0), (float("nan"), 0), (float("inf"), 0),
                                           (100, -1), (None, float("nan"))])
def test_bad_shapes_are_refused(kbps, latency):
    with pytest.raises(HiertrainError, match="--link-"):
        LinkShape(kbps=kbps, latency_ms=latency)


def test_no_flags_means_no_shaping():
    assert LinkShape.from_options(None, 0.0) is None
    assert LinkShape.from_options(None, None) is None
    assert LinkShape.from_options(None, 5.0) == LinkShape(None, 5.0)


# --------------------------------------------------------------- packet size vs the real bytes
class _RawBroker:
    """Just enough of an MQTT broker on 127.0.0.1 to accept paho's session and record each
    PUBLISH packet exactly as it arrived on the socket (fixed header included)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]
        self.publishes: list[bytes] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @staticmethod
    def _read(conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _packet(self, conn: socket.socket) -> bytes:
        head = self._read(conn, 1)
        length, mult, raw = 0, 1, b""
        while True:
            b = self._read(conn, 1)
            raw += b
            length += (b[0] & 0x7F) * mult
            mult *= 128
            if not b[0] & 0x80:
                break
        return head + raw + self._read(conn, length), len(head + raw)

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
            conn.settimeout(20)
            v5 = False
            with conn:
                while True:
                    try:
                        pkt, hlen = self._packet(conn)
                    except EOFError:
                        return
                    kind, body = pkt[0] >> 4, pkt[hlen:]
                    if kind == 1:  # CONNECT: protocol name "MQTT", then the level
                        v5 = body[6] == 5
                        conn.sendall(b"\x20\x03\x00\x00\x00" if v5 else b"\x20\x02\x00\x00")
                    elif kind == 3:  # PUBLISH
                        self.publishes.append(pkt)
                        if (pkt[0] >> 1) & 3:
                            tlen = struct.unpack(">H", body[:2])[0]
                            conn.sendall(b"\x40\x02" + body[2 + tlen : 4 + tlen])  # PUBACK
                    elif kind == 12:  # PINGREQ
                        conn.sendall(b"\xd0\x00")
                    elif kind == 14:  # DISCONNECT
                        return
        except BaseException as exc:  # noqa: BLE001 -- reported by the test
            self.error = exc

    def close(self) -> None:
        self.sock.close()
        self._thread.join(5)


_CASES = [  # topic, payload length, qos, properties
    ("t", 0, 0, None),
    ("hiertrain/run-1/robot-0/act", 1, 1, None),
    ("hiertrain/run-1/robot-0/act", 100, 1, None),
    ("t/é/ü", 120, 0, None),  # multi-byte UTF-8 topic; remaining length near 127
    ("t", 123, 1, None),
    ("t", 124, 1, None),  # remaining length crosses 127: a 2-byte varint
    ("hiertrain/r/d/act", 16_360, 1, None),  # crosses 16383: 3-byte varint
    ("hiertrain/r/d/act", 2_100_000, 1, None),  # crosses 2097151: 4-byte varint
    ("hiertrain/r/d/infer", 300, 1,
     {"response_topic": "hiertrain/r/d/infer/reply", "correlation_data": bytes(16)}),
    ("x", 10, 1, {"user_properties": [("k", "v"), ("codec", "int8-ü")]}),
]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_packet_size_is_what_paho_writes(protocol):
    raw = _RawBroker()
    inner = MqttLink(raw.url, _cid("raw"), protocol="3.1.1" if protocol == "3.1.1" else "5",
                     publish_timeout=20)
    link = ShapedLink(inner, LinkShape(kbps=None))
    try:
        link.connect(timeout=10)
        assert link.protocol_version == protocol
        for topic, n, qos, props in _CASES:
            link.publish(topic, os.urandom(n), qos=qos, properties=props)
        link.flush(30)
        deadline = time.monotonic() + 20
        while len(raw.publishes) < len(_CASES) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        link.close()
        raw.close()
    assert raw.error is None, raw.error
    got = [len(p) for p in raw.publishes]
    want = [mqtt_publish_size(t, n, qos=q, protocol=protocol, properties=p)
            for t, n, q, p in _CASES]
    assert got == want
    assert link.stats.bytes_charged == sum(got)
    assert link.stats.payload_bytes == sum(n for _, n, _, _ in _CASES)


# ------------------------------------------------------------------------------ the model
def test_rate_holds_within_10_percent(broker):
    """~3 s of 1 kB messages at 200 kbit/s; rate = bytes charged / (last arrival - first send)."""
    kbps, seconds, size = 200.0, 3.0, 1000
    shape = LinkShape(kbps=kbps)
    topic = f"shape/rate/{random.getrandbits(32):08x}"
    sub = _Arrivals(broker, topic)
    link = _shaped(broker, shape)
    try:
        per_msg = mqtt_publish_size(topic, size, qos=1, protocol=link.protocol_version)
        n = round(seconds * shape.bytes_per_s / per_msg)
        first_send = time.monotonic()
        for i in range(n):
            link.publish(topic, i.to_bytes(4, "big") + os.urandom(size - 4))
        arrivals = sub.take(n, timeout=seconds + 30)
    finally:
        link.close()
        sub.link.close()
    assert [int.from_bytes(p[:4], "big") for _, _, p in arrivals] == list(range(n))
    charged = link.stats.bytes_charged
    assert charged == n * per_msg
    achieved_kbps = charged * 8 / (arrivals[-1][0] - first_send) / 1000
    assert abs(achieved_kbps - kbps) <= 0.10 * kbps, (achieved_kbps, link.summary())
    # and the model's own arithmetic: the first message cannot arrive before it was serialized
    assert arrivals[0][0] - first_send >= shape.transmit_s(per_msg) * 0.999


def test_latency_delays_every_message_and_is_pipelined(broker):
    latency_s, n = 0.2, 20
    topic = f"shape/lat/{random.getrandbits(32):08x}"
    sub = _Arrivals(broker, topic)
    link = _shaped(broker, LinkShape(kbps=None, latency_ms=latency_s * 1000))
    sent = []
    try:
        for i in range(n):
            sent.append(time.monotonic())
            link.publish(topic, i.to_bytes(4, "big"))
        arrivals = sub.take(n, timeout=30)
    finally:
        link.close()
        sub.link.close()
    for (t_arr, _, payload) in arrivals:
        i = int.from_bytes(payload[:4], "big")
        assert t_arr - sent[i] >= latency_s, (i, t_arr - sent[i])
    # pipelined: 20 messages take about one latency, not 20 (which would be 4 s)
    assert arrivals[-1][0] - sent[0] < latency_s + 2.0


def test_fast_producer_is_slowed_to_link_speed(broker):
    """Back-pressure: publish() blocks once the transmit buffer is full."""
    kbps, buf, size, n = 160.0, 8 * 1024, 2000, 20
    shape = LinkShape(kbps=kbps)
    topic = f"shape/bp/{random.getrandbits(32):08x}"
    link = _shaped(broker, shape, buffer_bytes=buf)
    try:
        per_msg = mqtt_publish_size(topic, size, qos=1, protocol=link.protocol_version)
        t0 = time.monotonic()
        for _ in range(n):
            link.publish(topic, bytes(size))
        producer_s = time.monotonic() - t0
        # the last publish returns once all but a buffer's worth has been serialized
        assert producer_s >= shape.transmit_s(n * per_msg - buf) * 0.999, producer_s
        assert link.stats.blocked_s >= 0.9 * producer_s - 0.1
        # A full buffer that is draining on schedule is the link's honest speed, not a
        # failure: a short timeout still gets in, after the schedule makes room (a
        # status behind a big weights upload on a slow radio must not fail).
        t1 = time.monotonic()
        link.publish(topic, bytes(size), timeout=0.05)
        assert time.monotonic() - t1 >= shape.transmit_s(per_msg) * 0.9
        link.flush(timeout=30)  # everything accepted was handed to the broker
        assert time.monotonic() - t0 >= shape.transmit_s((n + 1) * per_msg) * 0.999
        assert link.stats.delivered == n + 1
    finally:
        link.close()
    assert link.stats.unsent == 0


def test_close_sends_what_is_queued(broker):
    topic = f"shape/close/{random.getrandbits(32):08x}"
    sub = _Arrivals(broker, topic)
    link = _shaped(broker, LinkShape(kbps=80.0, latency_ms=50))
    try:
        for _ in range(5):
            link.publish(topic, bytes(1000))  # 5 kB at 10 kB/s: ~0.5 s of queue
        link.close()
        assert len(sub.take(5, timeout=10)) == 5
    finally:
        sub.link.close()
    assert link.stats.delivered == 5 and link.stats.unsent == 0
    with pytest.raises(RuntimeError):
        link.publish(topic, b"late")


def test_failures_surface_and_close_reports_unsent():
    """The broker dies: the next publish raises the earlier failure; close drops and counts."""
    b: Broker = MosquittoBroker() if find_mosquitto() else EmbeddedBroker()
    b.start(timeout=10)
    link = ShapedLink(MqttLink(b.url, _cid("dead"), publish_timeout=1.0),
                      LinkShape(kbps=None, latency_ms=10), close_grace_s=0.5)
    try:
        link.connect(timeout=10)
        b.stop()
        link.publish("shape/dead", b"accepted: the modelled link cannot know")
        deadline = time.monotonic() + 20
        while link.stats.failed == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert link.stats.failed == 1
        with pytest.raises(HiertrainError, match="earlier message"):
            link.publish("shape/dead", b"x")
        for _ in range(5):  # each real publish now takes its 1 s timeout
            link.publish("shape/dead", bytes(100))
    finally:
        t0 = time.monotonic()
        link.close()
        b.stop()
    assert time.monotonic() - t0 < 5
    s = link.stats
    assert s.messages == 6 and s.delivered == 0  # the refused "x" was never accepted
    assert s.unsent >= 3 and s.failed + s.unsent >= 5  # at most one was mid-publish at close


@pytest.mark.mosquitto
@pytest.mark.skipif(not find_mosquitto(), reason="needs Debian's mosquitto (.ci/run installs it)")
def test_a_stalled_broker_runs_into_the_publish_timeout():
    """The schedule's own backlog extends a publish's deadline; a broker that stops answering
    (frozen with SIGSTOP: no PUBACKs) does not, so publish() fails after its timeout."""
    import signal

    b = MosquittoBroker()
    b.start(timeout=10)
    link = ShapedLink(MqttLink(b.url, _cid("stall"), publish_timeout=30.0),
                      LinkShape(kbps=8000.0), buffer_bytes=4000, close_grace_s=0.5)
    try:
        link.connect(timeout=10)
        link.publish("shape/stall", bytes(1000))
        link.flush(timeout=10)
        os.kill(b._proc.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(HiertrainError, match="did not accept"):
            for _ in range(50):  # ~1 ms of link time each: the schedule is never the wait
                link.publish("shape/stall", bytes(1000), timeout=1.0)
        assert 1.0 <= time.monotonic() - t0 < 20
    finally:
        os.kill(b._proc.pid, signal.SIGCONT)
        link.close()
        b.stop()


# ------------------------------------------------------------------------------------ CLIs
@pytest.mark.parametrize("command, flags, name", [
    ("train", ["--link-kbps", "0"], "--link-kbps"),
    ("train", ["--link-latency-ms", "-1"], "--link-latency-ms"),
    ("infer", ["--link-kbps", "-3"], "--link-kbps"),
])
def test_edge_cli_refuses_bad_link_values(tmp_path, command, flags, name):
    r = run_cli("edge-runtime", command, "--artifacts", str(tmp_path / "none"), "--broker",
                "mqtt://127.0.0.1:1", "--device-id", "d0", *flags, timeout=120)
    assert r.returncode == 3, r.stderr  # a HiertrainError: bad input (toolkit.core.entry)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and name in lines[0], r.stderr


@pytest.mark.parametrize("command", ["train", "serve"])
def test_cloud_cli_refuses_bad_link_values(tmp_path, command):
    r = run_cli("cloud-trainer", command, "--artifacts", str(tmp_path / "none"), "--broker",
                "mqtt://127.0.0.1:1", "--run-dir", str(tmp_path / "run"), "--link-kbps", "0",
                timeout=120)
    assert r.returncode == 3, r.stderr  # a HiertrainError: bad input (toolkit.core.entry)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--link-kbps" in lines[0]


# ------------------------------------------------------------------------------- end to end
ARTIFACTS = {"digits": True, "batch": 32, "exit_channels": 16}
"""conftest.exported options (smallcnn on 8x8 digits); the artifacts fixture: tests/conftest.py"""


@pytest.mark.slow
def test_edge_train_is_slowed_by_the_link(broker, artifacts, tmp_path):
    """A small run whose unshaped wall time is well under a second takes at least
    bytes * 8 / rate once its uplink is 160 kbit/s."""
    kbps = 160.0
    report = tmp_path / "edge.json"
    t0 = time.monotonic()
    r = run_cli("edge-runtime", "train", "--artifacts", str(artifacts), "--broker", broker.url,
                "--device-id", "slow-0", "--run-id", f"shape{random.getrandbits(24):06x}",
                "--epochs", "1", "--limit", "320", "--backend", "torch", "--threads", "1",
                "--link-kbps", str(kbps), "--link-latency-ms", "20", "--state-dir",
                str(tmp_path), "--report", str(report), "--quiet",
                "--confirm-timeout", "0", timeout=300)  # no trainer: nothing to confirm
    process_s = time.monotonic() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(report.read_text())
    link = rep["link"]
    assert link["kbps"] == kbps and link["latency_ms"] == 20
    assert link["unsent"] == 0 and link["failed"] == 0
    # the wire bytes are more than the payload (MQTT headers) but not much more
    assert rep["bytes_sent"] < link["bytes_charged"] < 1.05 * rep["bytes_sent"] + 1000
    rate = kbps * 1000 / 8
    # wall_s runs from the first batch until everything was handed to the broker
    assert rep["wall_s"] >= rep["act_bytes_sent"] / rate, rep
    assert process_s >= link["bytes_charged"] / rate
    assert rep["act_bytes_sent"] / rate > 1.0  # the run is long enough for the check to mean it
    assert "shaped link 160" in r.stdout


@pytest.mark.slow
def test_inference_round_trip_pays_both_latencies(broker, artifacts, tmp_path, procs):
    """edge-runtime infer (uplink 150 ms) asks cloud-trainer serve (downlink 250 ms): every cloud
    answer takes at least both latencies, and both summaries report their shaped link."""
    import signal

    import torch

    from toolkit.core.artifacts.manifest import load_manifest
    from toolkit.core.models.segments import load_segments
    from toolkit.core.protocol.messages import CLOUD_DEVICE
    from toolkit.core.protocol.topics import status_topic

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cloud = load_segments(load_manifest(artifacts)).cloud  # untrained is fine: we time it
    torch.save(cloud.state_dict(), run_dir / "cloud_final.pt")
    run = f"shapeinf{random.getrandbits(24):06x}"
    online = _Arrivals(broker, status_topic(run, CLOUD_DEVICE))
    serve = procs.start("serve", [
        "cloud_trainer", "serve", "--artifacts", str(artifacts), "--broker", broker.url,
        "--run-dir", str(run_dir), "--run-id", run, "--duration", "240",
        "--link-latency-ms", "250", "--link-kbps", "1000", "--quiet", "--json"],
        separate_stderr=True)
    try:
        deadline = time.monotonic() + 120
        while b"online" not in online.take(1, timeout=max(0.1, deadline - time.monotonic()))[0][2]:
            pass
        report = tmp_path / "infer.json"
        r = run_cli("edge-runtime", "infer", "--artifacts", str(artifacts), "--broker",
                    broker.url, "--device-id", "asker", "--run-id", run, "--limit", "6",
                    "--threshold", "1.0", "--backend", "torch", "--threads", "1",
                    "--link-latency-ms", "150", "--report", str(report), "--quiet", timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        online.link.close()
        procs.send_signal("serve", signal.SIGTERM)
        procs.wait("serve", 60)
        out, err = procs.output("serve"), procs.errors("serve")
    assert serve.returncode == 0, err[-3000:]
    rep = json.loads(report.read_text())
    assert rep["answered_by_cloud"] >= 1, rep
    assert rep["cloud_latency_ms"] >= 150 + 250, rep
    assert rep["link"]["latency_ms"] == 150 and rep["link"]["kbps"] is None
    served = json.loads(out.strip().splitlines()[-1])
    assert served["answered"] >= rep["answered_by_cloud"]
    assert served["link"]["latency_ms"] == 250 and served["link"]["kbps"] == 1000
    assert served["link"]["messages"] >= served["answered"]
