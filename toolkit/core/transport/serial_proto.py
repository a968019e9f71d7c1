"""The messages a serial link and its gateway exchange over a reliable channel.

Each is one ARQ message: ``u8 kind | u16 header length | JSON header | payload``.
The header carries what MQTT would (topic, QoS, retain, the publish properties,
a request id); the payload travels as raw bytes, so a 30 KB activation batch is
not inflated by base64.

    kind      direction         header                               payload
    HELLO     device->gateway   id, client_id, will (topic, retain,  will payload
                                qos) or none
    SUB       device->gateway   id, topic, qos                       -
    PUB       device->gateway   id, topic, qos, retain, props        message
    OK/ERR    gateway->device   id, error text (ERR)                 -
    MSG       gateway->device   topic, props                         message
    BYE       device->gateway   id (clean close: the will is dropped) -
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

from toolkit.core.errors import WireError
from toolkit.core.transport.base import properties_from_json, properties_to_json

HELLO, SUB, PUB, OK, ERR, MSG, BYE = range(1, 8)
KIND_NAMES = {HELLO: "HELLO", SUB: "SUB", PUB: "PUB", OK: "OK", ERR: "ERR", MSG: "MSG",
              BYE: "BYE"}
_HEAD = struct.Struct(">BH")


@dataclass
class Packet:
    kind: int
    header: dict[str, Any] = field(default_factory=dict)
    payload: bytes = b""


props_to_json = properties_to_json
"""Publish properties as JSON-safe values (the transports' shared helper)."""
props_from_json = properties_from_json
"""Inverse of :func:`props_to_json`: the dict a link handler receives."""


def encode(packet: Packet) -> bytes:
    head = json.dumps(packet.header, separators=(",", ":")).encode()
    return _HEAD.pack(packet.kind, len(head)) + head + packet.payload


def decode(data: bytes) -> Packet:
    """WireError when ``data`` is not a packet (the CRC makes that a bug or a foreign peer)."""
    if len(data) < _HEAD.size:
        raise WireError("serial packet shorter than its header", reason="truncated")
    kind, n = _HEAD.unpack_from(data)
    if kind not in KIND_NAMES:
        raise WireError(f"unknown serial packet kind {kind}", reason="kind")
    try:
        header = json.loads(data[_HEAD.size : _HEAD.size + n])
    except ValueError as exc:
        raise WireError(f"serial packet header is not JSON: {exc}", reason="header") from None
    if not isinstance(header, dict):
        raise WireError("serial packet header is not an object", reason="header")
    return Packet(kind, header, bytes(data[_HEAD.size + n :]))
