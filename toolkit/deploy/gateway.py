"""``toolkit gateway``: bridge one serial line to an MQTT broker, unchanged.

The device end runs a :class:`toolkit.core.transport.serial_link.SerialLink`; this
end opens one MQTT session per device on its behalf, with the device's own
client id and last will, and

* publishes every PUB it receives (same topic, payload, QoS, retain and
  properties) and answers OK only after the broker's PUBACK, so the device's
  ``publish`` means what it means on MQTT;
* subscribes what the device subscribes (status, inference replies, retained
  weights...) and forwards each matching broker message down the line;
* disconnects cleanly on the device's BYE, and publishes the device's will
  itself when the device goes silent for ``liveness_s`` seconds or restarts
  without a BYE -- what the broker would have done had the device's own TCP
  connection died.

A cloud trainer sees the same messages as from a directly connected device.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from toolkit.core.errors import HiertrainError, WireError
from toolkit.core.security import LinkSecurity
from toolkit.core.transport import Link, open_link
from toolkit.core.transport import serial_proto as sp
from toolkit.core.transport.serial_link import channel_for, parse_serial_url, serial_url

log = logging.getLogger("toolkit.deploy.gateway")


@dataclass
class GatewayConfig:
    serial: str  # /dev/ttyUSB0 or a full serial:// URL
    broker: str
    baud: int = 115200
    once: bool = False  # stop after the device's BYE (tests, one-shot jobs)
    security: LinkSecurity | None = None  # broker credentials and TLS (no signing: the device
    # signs, the gateway relays its bytes unchanged)
    liveness_s: float = 10.0
    connect_timeout: float = 30.0
    idle_timeout: float | None = None  # stop if no device greets within this many seconds


class Gateway:
    def __init__(self, cfg: GatewayConfig) -> None:
        self.cfg = cfg
        url = cfg.serial if cfg.serial.startswith("serial:") else serial_url(cfg.serial, cfg.baud)
        self.address = parse_serial_url(url)
        self.port, self.channel = channel_for(self.address, "gateway",
                                              on_peer_reset=self._on_reset)
        self._link: Link | None = None
        self._will: tuple[str, bytes, int, bool] | None = None
        self._client_id: str | None = None
        self._reset = threading.Event()
        self._stop = threading.Event()
        self._down: queue.Queue[sp.Packet] = queue.Queue(maxsize=256)
        self.stats: dict[str, int] = {"published": 0, "forwarded": 0, "sessions": 0,
                                      "wills_published": 0}
        self._down_thread = threading.Thread(target=self._downlink, daemon=True,
                                             name="gateway-down")
        self._down_thread.start()

    def _on_reset(self) -> None:
        self._reset.set()

    # ---------------------------------------------------------------- session
    def _end_session(self, *, publish_will: bool) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        if publish_will and self._will is not None:
            topic, payload, qos, retain = self._will
            try:
                link.publish(topic, payload, qos=qos, retain=retain, timeout=10.0)
                self.stats["wills_published"] += 1
                log.warning("device %s went away without a goodbye; published its will on %s",
                            self._client_id, topic)
            except HiertrainError as exc:
                log.warning("could not publish the will of %s: %s", self._client_id, exc)
        link.close()
        self._will = None

    def _reply(self, rid: Any, error: str | None = None) -> None:
        if not rid:
            return
        packet = sp.Packet(sp.ERR, {"id": rid, "error": error}) if error else \
            sp.Packet(sp.OK, {"id": rid})
        self.channel.send(sp.encode(packet), timeout=30.0)

    def _forward(self, topic: str, payload: bytes, props: dict[str, Any]) -> None:
        """Broker -> device; runs on paho's thread, so it only enqueues."""
        try:
            self._down.put(sp.Packet(sp.MSG, {"topic": topic, "props": sp.props_to_json(props)},
                                     payload), timeout=5.0)
        except queue.Full:
            log.warning("downlink queue full; dropped a message on %s", topic)

    def _downlink(self) -> None:
        while not self._stop.is_set():
            try:
                packet = self._down.get(timeout=0.2)
            except queue.Empty:
                continue
            try:
                self.channel.send(sp.encode(packet), timeout=30.0)
                self.stats["forwarded"] += 1
            except HiertrainError as exc:
                log.warning("could not forward to the device: %s", exc)

    def _handle(self, packet: sp.Packet) -> bool:
        """Act on one packet; False when the gateway should stop (``once`` and BYE)."""
        h, rid = packet.header, packet.header.get("id")
        if packet.kind == sp.HELLO:
            self._end_session(publish_will=True)  # a device that greets again had restarted
            self._reset.clear()  # the reset that came with this HELLO is handled
            self._client_id = str(h.get("client_id") or "ht-serial-device")
            link = open_link(self.cfg.broker, self._client_id, security=self.cfg.security)
            will = h.get("will")
            if will:
                self._will = (str(will["topic"]), packet.payload, int(will.get("qos", 1)),
                              bool(will.get("retain", True)))
                link.set_will(*self._will[:2], retain=self._will[3], qos=self._will[2])
            try:
                link.connect(timeout=self.cfg.connect_timeout)
            except HiertrainError as exc:
                self._reply(rid, str(exc))
                return True
            self._link = link
            self.stats["sessions"] += 1
            log.info("device %s connected over %s, bridged to %s", self._client_id,
                     self.address.url, link.address.url)
            self._reply(rid)
        elif self._link is None:
            self._reply(rid, "no session: send HELLO first")
        elif packet.kind == sp.SUB:
            try:
                self._link.subscribe(str(h["topic"]), self._forward, qos=int(h.get("qos", 1)))
                self._reply(rid)
            except HiertrainError as exc:
                self._reply(rid, str(exc))
        elif packet.kind == sp.PUB:
            try:
                self._link.publish(str(h["topic"]), packet.payload, qos=int(h.get("qos", 1)),
                                   retain=bool(h.get("retain", False)),
                                   properties=sp.props_from_json(h.get("props") or {}))
                self.stats["published"] += 1
                self._reply(rid)
            except HiertrainError as exc:
                self._reply(rid, str(exc))
        elif packet.kind == sp.BYE:
            log.info("device %s said goodbye", self._client_id)
            self._end_session(publish_will=False)
            return not self.cfg.once
        return True

    # -------------------------------------------------------------------- run
    def run(self) -> dict[str, Any]:
        """Serve until BYE (with ``once``), ``idle_timeout`` without a device, or stop()."""
        started = time.monotonic()
        try:
            while not self._stop.is_set():
                if self._reset.is_set():
                    self._reset.clear()
                    self._end_session(publish_will=True)
                if (self._link is not None and
                        time.monotonic() - self.channel.last_heard > self.cfg.liveness_s):
                    self._end_session(publish_will=True)
                if (self._link is None and self.cfg.idle_timeout is not None and
                        self.stats["sessions"] == 0 and
                        time.monotonic() - started > self.cfg.idle_timeout):
                    raise HiertrainError(f"no device greeted the gateway on {self.address.url} "
                                         f"within {self.cfg.idle_timeout:.0f} s")
                data = self.channel.recv(timeout=0.2)
                if data is None:
                    continue
                try:
                    packet = sp.decode(data)
                except WireError as exc:
                    log.warning("dropped a bad packet from the device: %s", exc)
                    continue
                if not self._handle(packet):
                    break
            self.channel.flush(timeout=5.0)
        finally:
            self.close()
        return {**self.stats, "channel": self.channel.stats_dict()}

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        self._end_session(publish_will=False)
        self._down_thread.join(timeout=2.0)
        self.channel.close()
        self.port.close()


def run_gateway(cfg: GatewayConfig) -> dict[str, Any]:
    return Gateway(cfg).run()
