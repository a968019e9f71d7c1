"""A subscriber that falls behind must not lose QoS 1 messages on the brokers we start.

mosquitto's default (1000 queued messages per client) silently dropped batches for a cloud
trainer that trained slower than edges published; toolkit.lab.broker configures it not to.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from toolkit.core.transport import open_link
from toolkit.lab.broker import EmbeddedBroker, MosquittoBroker, find_mosquitto

N = 2500


def _burst(url: str) -> int:
    got: list[int] = []
    release = threading.Event()

    def slow(_topic, payload, _props):
        release.wait(20)  # the subscriber stalls while the whole burst is published
        got.append(int.from_bytes(payload[:4], "little"))

    with open_link(url, "slow-sub") as sub, open_link(url, "fast-pub") as pub:
        sub.subscribe("q/burst", slow)
        sub.connect(timeout=10)
        pub.connect(timeout=10)
        for i in range(N):
            pub.publish("q/burst", i.to_bytes(4, "little") + bytes(256))
        release.set()
        deadline = time.monotonic() + 60
        while len(got) < N and time.monotonic() < deadline:
            time.sleep(0.05)
    assert sorted(got) == list(range(N))
    return len(got)


@pytest.mark.mqtt
@pytest.mark.mosquitto
def test_mosquitto_keeps_every_message_for_a_slow_subscriber():
    if find_mosquitto() is None and not os.environ.get("CI"):
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); CI installs it")
    with MosquittoBroker() as broker:
        assert _burst(broker.url) == N


@pytest.mark.mqtt
def test_embedded_broker_keeps_every_message_for_a_slow_subscriber():
    with EmbeddedBroker() as broker:
        assert _burst(broker.url) == N
