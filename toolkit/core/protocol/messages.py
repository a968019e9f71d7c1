"""The control messages next to the activation stream: status, edge weights, inference.

Activation batches have their own binary format (``toolkit.core.protocol.wire``). The rest is
small and infrequent, so it is JSON, except edge weights, which are a
``torch.save`` state dict behind a small checked header and are only ever
loaded with ``weights_only=True`` (no pickle code from the network).

Status (JSON, retained on ``hiertrain/<run>/<device>/status``; the cloud
trainer uses the device id ``cloud``)::

    {"schema": "hiertrain.status", "v": 1, "role": "edge"|"cloud",
     "device": "robot-7", "run": "r1", "state": "online"|"training"|"done"|"offline"|"error",
     "epoch": 2, "batches_published": 40, "samples_published": 1280, "last_seq": 39,
     "exit_accuracy": 0.83, "message": "", "time": 1764160000.0, ...extra fields}

An edge's ``done`` status carries ``batches_published``: the cloud knows it has
everything from that device when it has trained that many distinct sequence
numbers. The edge's MQTT last will is the same topic with ``state: offline``.

Ack (JSON, *not* retained, on the device's own ``hiertrain/<run>/<device>/ack``;
published by the cloud trainer when it comes online, after each checkpoint that
trained something of that device, and after each reconnect)::

    {"schema": "hiertrain.ack", "v": 2, "run": "r1", "instance": "9f2c01ab",
     "connects": 1, "trained": {"robot-7": {"low": 120, "above": [122]}}, "time": ...}

Version 2 (this one) carries the one device whose topic it is on: each edge receives
only its own acks, so ack traffic per edge stays the same however large the fleet, an
ACL can give each device read access to its own topics only, and no device learns the
others' ids. Version 1 went to every edge on ``hiertrain/<run>/cloud/ack`` with every
device's sets.

``trained`` holds, per device, the sequence numbers the cloud has trained *and
checkpointed*: seqs ``< low`` plus ``above``. Those survive any crash of the
cloud, so the edge deletes them from its spool. A new ``instance`` (the trainer
restarted) or ``connects`` (it reconnected, maybe to a restarted broker) tells
the edge to send everything still in its spool again (``docs/delivery.md``).
"""

from __future__ import annotations

import io
import json
import math
import struct
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from toolkit.core.artifacts.safeload import describe_load_error
from toolkit.core.errors import WireError
from toolkit.core.protocol.topics import CLOUD_DEVICE as CLOUD_DEVICE  # the cloud's device id

STATUS_SCHEMA = "hiertrain.status"
STATUS_VERSION = 1
STATES = ("online", "training", "done", "offline", "error")


@dataclass
class Status:
    role: str
    device: str
    run: str
    state: str
    epoch: int = 0
    batches_published: int = 0
    samples_published: int = 0
    last_seq: int = -1
    exit_accuracy: float | None = None
    message: str = ""
    time: float = field(default_factory=time.time)
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        d = asdict(self)
        extra = d.pop("extra")
        return json.dumps({"schema": STATUS_SCHEMA, "v": STATUS_VERSION, **d, **extra}).encode()


# Field, accepted types, lower bound for numbers. Checked on decode: the cloud's
# training loop does arithmetic on these, and a status is input from the network.
_STATUS_FIELDS: tuple[tuple[str, tuple[type, ...], float | None], ...] = (
    ("role", (str,), None), ("device", (str,), None), ("run", (str,), None),
    ("state", (str,), None), ("message", (str,), None),
    ("epoch", (int,), 0), ("batches_published", (int,), 0), ("samples_published", (int,), 0),
    ("last_seq", (int,), -1), ("exit_accuracy", (int, float, type(None)), float("-inf")),
    ("time", (int, float), float("-inf")),
)


def _json_message(data: bytes, kind: str, schema: str, version: int) -> dict[str, Any]:
    """The JSON object of a ``kind`` message, checked for its schema name and version;
    WireError with reason ``kind`` (or ``version``) otherwise."""
    try:
        d = json.loads(bytes(data).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"{kind} message is not JSON: {exc}", reason=kind) from None
    if not isinstance(d, dict) or d.get("schema") != schema:
        raise WireError(f"{kind} message lacks schema {schema!r}", reason=kind)
    if d.get("v") != version:
        raise WireError(f"{kind} message version {d.get('v')!r} is not {version}",
                        reason="version")
    return d


def decode_status(data: bytes) -> Status:
    d = _json_message(data, "status", STATUS_SCHEMA, STATUS_VERSION)
    if d.get("state") not in STATES or d.get("role") not in ("edge", "cloud"):
        raise WireError(f"status message has bad state/role {d.get('state')!r}/{d.get('role')!r}",
                        reason="status")
    for key, kinds, low in _STATUS_FIELDS:
        value = d.get(key)
        if key not in d or (value is None and type(None) in kinds):
            continue
        if isinstance(value, bool) or not isinstance(value, kinds) or (
                low is not None and not (value >= low and math.isfinite(value))):
            raise WireError(f"status field {key!r} has a bad value {str(value)[:40]!r}",
                            reason="status")
    known = {f for f in Status.__dataclass_fields__ if f != "extra"}
    try:
        return Status(**{k: d[k] for k in known if k in d},
                      extra={k: v for k, v in d.items() if k not in known | {"schema", "v"}})
    except TypeError as exc:
        raise WireError(f"status message is incomplete: {exc}", reason="status") from None


# --- delivery acknowledgements ---------------------------------------------------

ACK_SCHEMA = "hiertrain.ack"
ACK_VERSION = 2


@dataclass
class Ack:
    run: str
    instance: str
    connects: int = 0
    trained: dict[str, dict[str, Any]] = field(default_factory=dict)
    time: float = field(default_factory=time.time)

    def encode(self) -> bytes:
        return json.dumps({"schema": ACK_SCHEMA, "v": ACK_VERSION, **asdict(self)}).encode()

    def confirmed(self, device: str) -> tuple[int, frozenset[int]]:
        """``(low, above)`` of ``device``: seqs ``< low`` and those in ``above`` are safe."""
        d = self.trained.get(device) or {}
        return int(d.get("low", 0)), frozenset(int(v) for v in d.get("above", ()))


def decode_ack(data: bytes) -> Ack:
    d = _json_message(data, "ack", ACK_SCHEMA, ACK_VERSION)
    try:
        trained = {str(k): {"low": int(v["low"]), "above": [int(x) for x in v["above"]]}
                   for k, v in dict(d["trained"]).items()}
        return Ack(run=str(d["run"]), instance=str(d["instance"]),
                   connects=int(d.get("connects", 0)), trained=trained,
                   time=float(d.get("time", 0.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"ack message is malformed: {exc}", reason="ack") from None


# --- edge weights ---------------------------------------------------------------

WEIGHTS_MAGIC = b"HTWT"
WEIGHTS_VERSION = 1
_WHEAD = struct.Struct("<4sBI")  # magic, version, json length


def encode_weights(state: dict[str, torch.Tensor], meta: dict[str, Any]) -> bytes:
    """``meta`` (JSON) says whose weights these are: run, device, epoch, last_seq."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state.items()}, buf)
    header = json.dumps(meta).encode()
    body = _WHEAD.pack(WEIGHTS_MAGIC, WEIGHTS_VERSION, len(header)) + header + buf.getvalue()
    return body + struct.pack("<I", zlib.crc32(body))


def decode_weights(data: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    data = bytes(data)
    if len(data) < _WHEAD.size + 4:
        raise WireError("weights message is truncated", reason="truncated")
    magic, version, hlen = _WHEAD.unpack_from(data)
    if magic != WEIGHTS_MAGIC:
        raise WireError("weights message has the wrong magic", reason="magic")
    if version != WEIGHTS_VERSION:
        raise WireError(f"weights message version {version} is not {WEIGHTS_VERSION}",
                        reason="version")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) != crc:
        raise WireError("weights message failed its CRC check", reason="crc")
    start = _WHEAD.size
    if start + hlen > len(data) - 4:
        raise WireError("weights message header overruns the message", reason="truncated")
    try:
        meta = json.loads(data[start:start + hlen].decode())
        state = torch.load(io.BytesIO(data[start + hlen:-4]), map_location="cpu",
                           weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is bad input
        raise WireError(f"weights message does not decode: {describe_load_error(exc)}",
                        reason="weights") from None
    if not isinstance(meta, dict) or not isinstance(state, dict) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise WireError("weights message is not a state dict", reason="weights")
    return meta, state


# --- hierarchical inference -----------------------------------------------------


def encode_infer_reply(predictions: list[int], probabilities: list[list[float]],
                       error: str = "") -> bytes:
    return json.dumps({"pred": predictions, "prob": probabilities, "error": error}).encode()


def decode_infer_reply(data: bytes) -> dict[str, Any]:
    try:
        d = json.loads(bytes(data).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"inference reply is not JSON: {exc}", reason="reply") from None
    if not isinstance(d, dict) or "pred" not in d:
        raise WireError("inference reply lacks 'pred'", reason="reply")
    return d
