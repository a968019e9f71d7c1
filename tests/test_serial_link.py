"""The serial transport through real pseudo-terminal pairs opened with pyserial.

Two ptys are joined by :class:`toolkit.lab.pty_relay.PtyRelay`, which can
flip and drop bytes; each side opens its pty by name exactly as it would open a
UART. Checks: frames with damage are rejected, every message arrives intact and
exactly once through a noisy line, a corrupted frame is detected and resent,
flow control holds the sender instead of losing data, and a device talks to a
real broker through ``toolkit gateway`` with topics, properties, subscriptions
and its last will intact, also from a process that has no paho installed.
"""

from __future__ import annotations

import json
import os
import queue
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import serial

from toolkit.core.errors import HiertrainError
from toolkit.core.transport import open_link
from toolkit.core.transport.arq import ReliableChannel
from toolkit.core.transport.framing import (
    DataFrame,
    FrameSplitter,
    decode,
    encode_data,
)
from toolkit.core.transport.serial_link import SerialLink, parse_serial_url
from toolkit.deploy.gateway import Gateway, GatewayConfig
from toolkit.lab.broker import EmbeddedBroker
from toolkit.lab.pty_relay import PtyRelay

pytestmark = pytest.mark.serial

BAUD = 921600
REPO = Path(__file__).resolve().parents[1]


def _channels(relay: PtyRelay, **kw):
    ports = [serial.Serial(p, BAUD, timeout=0.05) for p in relay.ports]
    chans = [ReliableChannel(p, baud=BAUD, name=f"side{i}", **kw) for i, p in enumerate(ports)]
    return ports, chans


def _close(ports, chans) -> None:
    for c in chans:
        c.close()
    for p in ports:
        p.close()


def test_a_damaged_frame_is_rejected_and_the_stream_resynchronises():
    good = encode_data(DataFrame(7, 3, 1, bytes(range(256)) * 2))
    assert decode(good[:-1]) == DataFrame(7, 3, 1, bytes(range(256)) * 2)
    bad = bytearray(good)
    bad[40] ^= 0x04
    splitter = FrameSplitter(max_frame=2048)
    dropped = good[:30] + good[31:]
    frames = splitter.feed(bytes(bad) + dropped + good)
    assert frames == [DataFrame(7, 3, 1, bytes(range(256)) * 2)]  # only the intact one
    assert splitter.bad_frames == 2


def test_every_message_arrives_intact_exactly_once_through_a_noisy_line():
    rng = random.Random(1)
    msgs = [i.to_bytes(4, "big") + os.urandom(rng.choice([1, 200, 3000, 30000]))
            for i in range(24)]
    back = [os.urandom(rng.randrange(1, 5000)) for _ in range(6)]
    with PtyRelay(corrupt=5e-4, drop=2e-4, seed=3) as relay:
        ports, (a, b) = _channels(relay)
        try:
            got_b: list[bytes] = []
            got_a: list[bytes] = []

            def sink(ch, out, n):
                for _ in range(n):
                    m = ch.recv(timeout=60)
                    if m is None:
                        return
                    out.append(m)

            threads = [threading.Thread(target=sink, args=(b, got_b, len(msgs))),
                       threading.Thread(target=sink, args=(a, got_a, len(back)))]
            for t in threads:
                t.start()
            for m in back:
                b.send(m)
            for m in msgs:
                a.send(m)
            for t in threads:
                t.join(timeout=90)
            assert got_b == msgs  # intact, in order, none missing, none twice
            assert got_a == back
            assert a.flush(10) and b.flush(10)
            assert b.recv(timeout=0.5) is None  # and nothing more
            assert relay.stats.flipped > 0 and relay.stats.dropped > 0
            assert b.stats.bad_frames > 0
            assert a.stats.frames_retransmitted > 0
        finally:
            _close(ports, [a, b])


def test_a_corrupted_frame_is_detected_and_resent():
    msg = os.urandom(2000)  # 8 frames of 256 bytes; byte 700 sits in the third
    with PtyRelay(corrupt_at=(700,)) as relay:
        ports, (a, b) = _channels(relay)
        try:
            a.send(msg)
            assert b.recv(timeout=20) == msg
            assert relay.stats.flipped == 1
            # the receiver saw the frame fail (twice if the flip made a 0x00 and split it)...
            assert 1 <= b.stats.bad_frames <= 2
            assert a.stats.frames_retransmitted >= 1  # ...and the sender resent it
            assert b.stats.messages_received == 1
        finally:
            _close(ports, [a, b])


def test_a_slow_receiver_holds_the_sender_back_without_losing_anything():
    msgs = [os.urandom(1500) for _ in range(12)]
    with PtyRelay() as relay:
        ports, (a, b) = _channels(relay, rx_queue=2)
        try:
            sender = threading.Thread(target=lambda: [a.send(m) for m in msgs])
            sender.start()
            time.sleep(1.5)  # nobody reads at b: its queue fills and it advertises window 0
            assert not a.idle  # the sender is held back, not done
            assert b.stats.messages_received <= 3
            got = [b.recv(timeout=20) for _ in msgs]
            sender.join(timeout=20)
            assert got == msgs
        finally:
            _close(ports, [a, b])


def test_serial_url_parsing():
    addr = parse_serial_url("serial:///dev/ttyUSB0?baud=9600&window=8")
    assert (addr.host, addr.port, addr.options["window"]) == ("/dev/ttyUSB0", 9600, 8)
    assert addr.url == "serial:///dev/ttyUSB0?baud=9600"
    for bad in ("serial://", "serial:///dev/x?speed=9", "serial:///dev/x?baud=fast"):
        with pytest.raises(HiertrainError):
            parse_serial_url(bad)
    with pytest.raises(HiertrainError, match="cannot open serial port"):
        open_link("serial:///dev/does-not-exist?baud=9600", "x").connect(timeout=1)


class RunningGateway:
    """A ``toolkit gateway`` on the relay's far end, in a thread, and a cloud-side MQTT client.

    ``up`` receives what the cloud's subscriptions see (``(topic, payload, props)``, or what
    ``on_message`` puts there); leaving the block stops the gateway and closes the client.
    """

    def __init__(self, broker: EmbeddedBroker, relay: PtyRelay, subscriptions: tuple[str, ...],
                 on_message=None, **options) -> None:
        self.gateway = Gateway(GatewayConfig(serial=relay.ports[1], baud=BAUD,
                                             broker=broker.url, **options))
        self.result: dict = {}
        self.thread = threading.Thread(
            target=lambda: self.result.update(self.gateway.run() or {}), daemon=True)
        self.cloud = open_link(broker.url, "cloud")
        self.up: queue.Queue = queue.Queue()
        for sub in subscriptions:
            self.cloud.subscribe(sub, on_message or (lambda t, p, pr: self.up.put((t, p, pr))))

    def __enter__(self) -> RunningGateway:
        self.thread.start()
        self.cloud.connect(timeout=10)
        return self

    def join(self, timeout: float) -> dict:
        """Wait for a ``once`` gateway to end by itself; its run report."""
        self.thread.join(timeout=timeout)
        return self.result

    def __exit__(self, *exc: object) -> None:
        self.gateway.stop()
        self.thread.join(timeout=10)
        self.cloud.close()


@pytest.mark.mqtt
def test_device_reaches_the_broker_through_the_gateway_unchanged():
    with EmbeddedBroker() as broker, PtyRelay(corrupt=1e-3, drop=5e-4, seed=5) as relay, \
            RunningGateway(broker, relay, ("hiertrain/r/+/act", "hiertrain/r/+/status"),
                           once=True, liveness_s=3.0) as gw:
        cloud, up = gw.cloud, gw.up
        dev = open_link(f"serial://{relay.ports[0]}?baud={BAUD}", "dev-1")
        assert isinstance(dev, SerialLink)
        down: queue.Queue = queue.Queue()
        dev.set_will("hiertrain/r/d/status", b"offline", retain=True)
        dev.subscribe("hiertrain/r/d/infer/reply", lambda t, p, pr: down.put((t, p, pr)))
        try:
            dev.connect(timeout=20)
            payloads = [os.urandom(n) for n in (1, 900, 40000)]
            for i, p in enumerate(payloads):
                dev.publish("hiertrain/r/d/act", p, properties={
                    "response_topic": "hiertrain/r/d/infer/reply",
                    "correlation_data": bytes([i]), "user_properties": [("k", str(i))]})
            for i, p in enumerate(payloads):
                topic, payload, props = up.get(timeout=10)
                assert (topic, payload) == ("hiertrain/r/d/act", p)
                assert props["correlation_data"] == bytes([i])
                assert props["response_topic"] == "hiertrain/r/d/infer/reply"
                assert props["user_properties"] == [("k", str(i))]
            cloud.publish("hiertrain/r/d/infer/reply", b"answer",
                          properties={"correlation_data": b"c"})
            assert down.get(timeout=10) == ("hiertrain/r/d/infer/reply", b"answer",
                                            {"correlation_data": b"c"})
            assert dev.bytes_sent == sum(map(len, payloads))
        finally:
            dev.close()  # clean: BYE, so the will must not be published
        result = gw.join(20)
        assert result["published"] == 3 and result["forwarded"] == 1
        assert result["wills_published"] == 0
        try:
            late = up.get(timeout=1.0)
        except queue.Empty:
            late = None
        assert late is None, late


@pytest.mark.mqtt
def test_a_device_that_goes_silent_gets_its_will_published():
    with EmbeddedBroker() as broker, PtyRelay() as relay, \
            RunningGateway(broker, relay, ("hiertrain/r/d/status",), liveness_s=2.0) as gw:
        dev = open_link(f"serial://{relay.ports[0]}?baud={BAUD}", "dev-2")
        dev.set_will("hiertrain/r/d/status", b"offline", retain=True)
        dev.connect(timeout=20)
        dev.publish("hiertrain/r/d/status", b"online", retain=True)
        assert gw.up.get(timeout=10)[1] == b"online"
        dev.channel.close()  # the device dies: no BYE, no more frames
        assert gw.up.get(timeout=15)[1] == b"offline"


@pytest.mark.mqtt
def test_one_gateway_serves_device_processes_one_after_another():
    """edge-runtime train, then infer, then train again: each a new process on the same line
    while the gateway keeps running; stale frames and keepalives of the previous process
    must not reset the new one's session."""
    with EmbeddedBroker() as broker, PtyRelay() as relay, \
            RunningGateway(broker, relay, ("hiertrain/r/+/act",)) as gw:
        for i in range(4):
            dev = open_link(f"serial://{relay.ports[0]}?baud={BAUD}", f"dev-{i}")
            dev.connect(timeout=20)
            dev.publish("hiertrain/r/d/act", f"run {i}".encode())
            assert gw.up.get(timeout=10)[1] == f"run {i}".encode()
            if i % 2:  # the next process starts while the gateway's keepalives cross
                time.sleep(1.2)
                dev.channel.close()  # died without BYE
            else:
                dev.close()


# A board process without paho: the three module names paho's import goes through are None,
# so any import of paho (direct or behind our back) raises instead of loading it.
_NO_PAHO_DEVICE = textwrap.dedent("""
    import json, queue, sys
    sys.modules["paho"] = None
    sys.modules["paho.mqtt"] = None
    sys.modules["paho.mqtt.client"] = None

    import toolkit.core.transport
    import toolkit.core.transport.arq
    import toolkit.core.transport.framing
    import toolkit.core.transport.serial_link
    import toolkit.core.transport.serial_proto
    from toolkit.core.errors import HiertrainError
    from toolkit.core.transport import open_link

    errors = []
    for attempt in (lambda: __import__("toolkit.core.transport.mqtt"),
                    lambda: open_link("mqtt://127.0.0.1:1883", "x")):
        try:
            attempt()
        except Exception as exc:  # noqa: BLE001 - the test checks the type
            errors.append([type(exc).__name__, str(exc)])
        else:
            errors.append(["none", ""])

    port, baud = sys.argv[1], sys.argv[2]
    got = queue.Queue()
    dev = open_link(f"serial://{port}?baud={baud}", "no-paho")
    dev.subscribe("hiertrain/r/+/infer/reply", lambda t, p, pr: got.put((t, p, pr)))
    dev.connect(timeout=20)
    dev.publish("hiertrain/r/d/act", b"from a board without paho",
                properties={"correlation_data": b"q1"})
    topic, payload, props = got.get(timeout=20)
    dev.close()
    print(json.dumps({"errors": errors, "topic": topic, "payload": payload.decode(),
                      "correlation": props.get("correlation_data", b"").decode(),
                      "paho_blocked": sys.modules.get("paho", "loaded") is None}))
""")


@pytest.mark.mqtt
def test_a_device_without_paho_talks_through_the_gateway_and_mqtt_says_what_is_missing():
    def answer(topic: str, payload: bytes, props: dict) -> None:
        gw.up.put((topic, payload, props))
        gw.cloud.publish("hiertrain/r/d/infer/reply", b"reply to " + payload, qos=0,
                         properties={"correlation_data": props.get("correlation_data", b"")})

    with EmbeddedBroker() as broker, PtyRelay() as relay, \
            RunningGateway(broker, relay, ("hiertrain/r/+/act",), on_message=answer,
                           once=True, liveness_s=3.0) as gw:
        up = gw.up
        proc = subprocess.run(
            [sys.executable, "-c", _NO_PAHO_DEVICE, relay.ports[0], str(BAUD)],
            capture_output=True, text=True, timeout=120, cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)})
        assert proc.returncode == 0, proc.stderr
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert up.get(timeout=5) == ("hiertrain/r/d/act", b"from a board without paho",
                                     {"correlation_data": b"q1"})
        assert out["topic"] == "hiertrain/r/d/infer/reply"
        assert out["payload"] == "reply to from a board without paho"
        assert out["correlation"] == "q1"
        assert out["paho_blocked"]
        # Asking for MQTT there is one clear line naming the missing package.
        for kind, message in out["errors"]:
            assert kind == "HiertrainError", (kind, message)
            assert "\n" not in message and "pip install 'paho-mqtt>=2'" in message
