"""Brokers and MQTT links against real brokers on 127.0.0.1.

Every broker-backed test runs twice: on the embedded amqtt broker (MQTT 3.1.1,
what the demo uses) and on mosquitto (MQTT 5, what a deployment uses).
Every wait is bounded; a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from toolkit.core.errors import HiertrainError
from toolkit.core.transport import BrokerAddress, open_link, parse_url
from toolkit.core.transport.base import (
    ENVELOPE_MAGIC,
    check_properties,
    topic_matches,
    unwrap_properties,
    wrap_properties,
)
from toolkit.core.transport.mqtt import MqttLink
from toolkit.lab import broker as broker_mod
from toolkit.lab.broker import EmbeddedBroker, MosquittoBroker, free_port
from toolkit.lab.launch import ProcessGroup

pytestmark = pytest.mark.mqtt

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024
Broker = EmbeddedBroker | MosquittoBroker


@pytest.fixture(
    scope="module",
    params=["amqtt", pytest.param("mosquitto", marks=pytest.mark.mosquitto)],
)
def broker(request: pytest.FixtureRequest) -> Broker:
    """Every test here runs on both brokers (conftest's embedded_broker, mosquitto_broker)."""
    name = "embedded_broker" if request.param == "amqtt" else "mosquitto_broker"
    return request.getfixturevalue(name)


def _link(broker: Broker, name: str, **kw: Any) -> MqttLink:
    return MqttLink(broker.url, f"{name}-{os.getpid()}-{random.getrandbits(24):06x}", **kw)


def _get(q: queue.Queue[Any], deadline: float) -> Any:
    try:
        return q.get(timeout=max(0.01, deadline - time.monotonic()))
    except queue.Empty:
        pytest.fail("timed out waiting for a message")


def test_ordered_delivery_including_16mb(
    broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(7)
    sizes = [0, 1, 100, 4096, 65536, 1 * MB] + [rng.randrange(1, 200_000) for _ in range(44)]
    sizes[25] = 16 * MB
    payloads = [i.to_bytes(4, "big") + rng.randbytes(max(0, n - 4)) for i, n in enumerate(sizes)]
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    topic = f"data/{random.getrandbits(32):08x}"
    with _link(broker, "sub") as sub, _link(broker, "pub") as pub:
        sub.subscribe(topic, lambda t, p, props: got.put((t, p)))
        sub.connect(timeout=5)
        pub.connect(timeout=5)
        big_ack_s = 0.0
        t0 = time.monotonic()
        for i, p in enumerate(payloads):
            start = time.perf_counter()
            pub.publish(topic, p, qos=1, timeout=30)
            if i == 25:
                big_ack_s = time.perf_counter() - start
        deadline = time.monotonic() + 30
        received = [_get(got, deadline) for _ in payloads]
        elapsed = time.monotonic() - t0
        assert [t for t, _ in received] == [topic] * len(payloads)
        for i, ((_, p), want) in enumerate(zip(received, payloads, strict=True)):
            assert len(p) == len(want) and p == want, f"message {i} ({len(want)} B) differs"
        total = sum(len(p) for p in payloads)
        assert pub.messages_sent == len(payloads)
        assert pub.bytes_sent == total
        # counters are updated on paho's thread before the handler runs
        assert sub.bytes_received == total
        assert got.empty()
    with capsys.disabled():
        print(
            f"\n[{type(broker).__name__}] 16 MB publish->PUBACK {big_ack_s:.3f} s "
            f"({16 / big_ack_s:.0f} MB/s); 50 msgs / {total / MB:.1f} MB end-to-end {elapsed:.2f} s"
        )


def test_request_response_with_correlation(broker: Broker) -> None:
    base = f"rpc/{random.getrandbits(32):08x}"
    replies: queue.Queue[tuple[bytes, dict[str, Any]]] = queue.Queue()
    with _link(broker, "server") as server, _link(broker, "client") as client:

        def serve(topic: str, payload: bytes, props: dict[str, Any]) -> None:
            # Replying from the handler is fine: publish() does not wait for the
            # PUBACK on paho's own thread.
            server.publish(
                props["response_topic"],
                payload[::-1],
                properties={"correlation_data": props["correlation_data"]},
            )

        server.subscribe(f"{base}/req", serve)
        client.subscribe(f"{base}/resp", lambda t, p, props: replies.put((p, props)))
        server.connect(timeout=5)
        client.connect(timeout=5)
        want_protocol = "3.1.1" if isinstance(broker, EmbeddedBroker) else "5"
        assert client.protocol_version == server.protocol_version == want_protocol
        deadline = time.monotonic() + 10
        for n in range(3):
            corr = bytes([0, 255, n]) + b"req"
            client.publish(
                f"{base}/req",
                b"ping%d" % n,
                properties={"response_topic": f"{base}/resp", "correlation_data": corr},
            )
            payload, props = _get(replies, deadline)
            assert payload == (b"ping%d" % n)[::-1]
            assert props["correlation_data"] == corr
            assert "response_topic" not in props
        # counters count payload bytes, not the 3.1.1 property envelope
        assert client.bytes_received == sum(len(b"ping%d" % n) for n in range(3))


_DYING_CLIENT = """
import sys, time
from toolkit.core.transport.mqtt import MqttLink
link = MqttLink(sys.argv[1], sys.argv[2])
link.set_will(sys.argv[3], b"offline", retain=True)
link.connect(timeout=5)
link.publish(sys.argv[3], b"online", retain=True)
time.sleep(30)  # killed long before this ends
"""


def test_last_will_on_crash_but_not_on_close(broker: Broker, procs: ProcessGroup) -> None:
    status = f"status/{random.getrandbits(32):08x}"
    seen: queue.Queue[bytes] = queue.Queue()
    with _link(broker, "watcher") as watcher:
        watcher.subscribe(f"{status}/#", lambda t, p, props: seen.put(p))
        watcher.connect(timeout=5)
        procs.start_command("dying", [sys.executable, "-c", _DYING_CLIENT, broker.url,
                                      "dying-edge", f"{status}/a"],
                            env={"PYTHONPATH": os.pathsep.join(
                                [str(REPO), os.environ.get("PYTHONPATH", "")])})
        try:
            deadline = time.monotonic() + 15
            try:
                first = seen.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                procs.kill("dying")
                pytest.fail(f"dying client never came online: {procs.tail('dying')!r}")
            assert first == b"online"
            procs.kill("dying", timeout=5)  # SIGKILL: no DISCONNECT, the kernel closes the socket
            assert _get(seen, time.monotonic() + 10) == b"offline"
        finally:
            procs.kill("dying", timeout=5)

        # A clean close() sends DISCONNECT, so the broker must discard the will.
        polite = _link(broker, "polite")
        polite.set_will(f"{status}/b", b"offline", retain=False)
        polite.connect(timeout=5)
        polite.publish(f"{status}/b", b"online")
        assert _get(seen, time.monotonic() + 5) == b"online"
        polite.close()
        with pytest.raises(queue.Empty):
            seen.get(timeout=0.5)


def test_connect_to_closed_port_fails_within_timeout(caplog: pytest.LogCaptureFixture) -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    link = MqttLink(url, "nobody-home")
    caplog.set_level(logging.WARNING, logger="toolkit.core.transport.mqtt")
    start = time.monotonic()
    with pytest.raises(HiertrainError, match="cannot reach MQTT broker at") as err:
        link.connect(timeout=1.6)
    elapsed = time.monotonic() - start
    assert url in str(err.value)
    assert "refused" in str(err.value)
    assert 1.4 <= elapsed < 3.0, elapsed
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    # backoff 0.5 s, then 1.0 s (clipped to what is left of the deadline)
    assert retries and "retrying in 0.5 s" in retries[0], retries
    assert "127.0.0.1" in retries[0]
    link.close()


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("mqtt://127.0.0.1", BrokerAddress("mqtt", "127.0.0.1", 1883)),
        ("mqtt://127.0.0.1:1884/", BrokerAddress("mqtt", "127.0.0.1", 1884)),
        ("mqtts://broker.local", BrokerAddress("mqtts", "broker.local", 8883)),
        ("MQTT://u%40x:p%3Aw@h:2000", BrokerAddress("mqtt", "h", 2000, "u@x", "p:w")),
        ("mqtt://[::1]:1885", BrokerAddress("mqtt", "::1", 1885)),
    ],
)
def test_parse_url_accepts(url: str, want: BrokerAddress) -> None:
    got = parse_url(url)
    assert got == want
    assert "p:w" not in repr(got)  # passwords stay out of logs


@pytest.mark.parametrize(
    "url",
    [
        "",
        "127.0.0.1:1883",
        "tcp://127.0.0.1:1883",
        "serial:///dev/ttyACM0",
        "mqtt://",
        "mqtt://:1883",
        "mqtt://host:notaport",
        "mqtt://host:70000",
        "mqtt://host:0",
        "mqtt://host/some/path",
        "mqtt://host?x=1",
    ],
)
def test_parse_url_rejects(url: str) -> None:
    with pytest.raises(HiertrainError) as err:
        parse_url(url)
    msg = str(err.value)
    assert repr(url) in msg
    assert "mqtt://host[:port]" in msg and "mqtts://host[:port]" in msg


_FILTERS = ("#", "+", "+/+", "a", "a/b", "a/+", "a/#", "a/+/c", "+/b/#", "a/b/c/#", "/+",
            "+/", "a//c", "$SYS/#", "$SYS/+", "+/x", "$share/g/a/+", "$share/g/#", "a/#/c")
_TOPICS = ("a", "a/b", "a/b/c", "a/b/c/d", "b", "/a", "a/", "a//c", "$SYS/x", "$SYS",
           "x/x", "", "/")


def test_topic_matches_answers_as_paho_does() -> None:
    """The transports' own matcher (no paho needed) agrees with paho on every pair."""
    import paho.mqtt.client as mqtt

    def paho(f: str, t: str) -> bool:
        if f.startswith("$share/"):  # paho has no notion of shared subscriptions
            f = f.split("/", 2)[2]
        return mqtt.topic_matches_sub(f, t)

    checked = 0
    for f in _FILTERS:
        for t in _TOPICS:
            assert topic_matches(f, t) == paho(f, t), (f, t)
            checked += 1
    assert checked == len(_FILTERS) * len(_TOPICS)
    assert topic_matches("a/#", "a") and topic_matches("$share/g/a/+", "a/b")
    assert not topic_matches("#", "$SYS/x") and not topic_matches("a/+", "a/b/c")


def test_property_envelope_round_trip_and_foreign_payloads() -> None:
    props = check_properties({"response_topic": "r/t", "correlation_data": "c\u00e9",
                              "user_properties": {"k": 1}})
    assert props == {"response_topic": "r/t", "correlation_data": "c\u00e9".encode(),
                     "user_properties": [("k", "1")]}
    data = wrap_properties(b"\x00payload", props)
    assert data.startswith(ENVELOPE_MAGIC)
    assert unwrap_properties(data) == (b"\x00payload", props)
    for foreign in (b"", b"HTAB\x02", ENVELOPE_MAGIC + b"\x00\x00\x00\x02{x",
                    ENVELOPE_MAGIC + b"\x00\x00\x00\x02[]"):
        assert unwrap_properties(foreign) == (foreign, {})
    with pytest.raises(ValueError, match="unsupported publish properties"):
        check_properties({"qos": 1})


def test_open_link_chooses_transport_by_scheme() -> None:
    link = open_link("mqtt://127.0.0.1:1", "x", keepalive=10)
    assert isinstance(link, MqttLink)
    assert link.address == BrokerAddress("mqtt", "127.0.0.1", 1)
    assert link.bytes_sent == link.bytes_received == link.messages_sent == 0
    serial_link = open_link("serial:///dev/ttyACM0?baud=57600", "x")  # port opens on connect
    assert type(serial_link).__name__ == "SerialLink"
    assert serial_link.address.url == "serial:///dev/ttyACM0?baud=57600"
    with pytest.raises(HiertrainError, match="bad serial URL"):
        open_link("serial://", "x")


def test_embedded_broker_port_and_url() -> None:
    with EmbeddedBroker() as b:
        assert b.port > 0
        assert b.url == f"mqtt://127.0.0.1:{b.port}"
        assert broker_mod.wait_for_port("127.0.0.1", b.port, 1.0)
    assert not broker_mod.wait_for_port("127.0.0.1", b.port, 0.2)


def test_embedded_restart_links_reconnect_and_resubscribe() -> None:
    """Stopping amqtt with clients attached is bounded (its shutdown can hang on
    an in-flight QoS 1 delivery), and links come back on their own."""
    port = free_port()
    got: queue.Queue[bytes] = queue.Queue()
    first = EmbeddedBroker(port=port).start()
    sub = MqttLink(first.url, "restart-sub")
    pub = MqttLink(first.url, "restart-pub")
    try:
        sub.subscribe("restart/#", lambda t, p, props: got.put(p))
        sub.connect(timeout=5)
        pub.connect(timeout=5)
        for i in range(20):  # keep deliveries in flight while stopping
            pub.publish(f"restart/{i}", b"x" * 10_000)
        start = time.monotonic()
        first.stop(timeout=2.0)
        assert time.monotonic() - start < 4.0
        assert not broker_mod.wait_for_port("127.0.0.1", port, 0.2), "port still open"
        deadline = time.monotonic() + 5
        while sub.is_connected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not sub.is_connected
        with EmbeddedBroker(port=port):
            deadline = time.monotonic() + 15
            while not (sub.is_connected and pub.is_connected) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert sub.is_connected and pub.is_connected
            while not got.empty():
                got.get_nowait()
            # The SUBACK may trail the CONNACK slightly: publish until one arrives.
            while time.monotonic() < deadline:
                pub.publish("restart/after", b"back", timeout=5)
                try:
                    assert got.get(timeout=0.5) == b"back"
                    break
                except queue.Empty:
                    continue
            else:
                pytest.fail("no message after the broker restart: not re-subscribed")
            sub.close()
            pub.close()
    finally:
        sub.close()
        pub.close()
        first.stop()


def test_mosquitto_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(broker_mod, "find_mosquitto", lambda: None)
    with pytest.raises(HiertrainError, match="apt-get install mosquitto"):
        MosquittoBroker().start()
