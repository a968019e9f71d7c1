"""MQTT topic layout: the only place topic strings are built or parsed.

Every topic is ``hiertrain/<run>/<device>/<kind>``. The run id comes first so
that several runs can share one broker and a cloud trainer subscribes to
exactly its own run with a single ``+`` wildcard over devices::

    kind         topic                                  direction      payload
    -----------  -------------------------------------  -------------  ------------------------
    act          hiertrain/<run>/<device>/act           edge -> cloud  toolkit.core.protocol.wire
    message
    weights      hiertrain/<run>/<device>/weights       edge -> cloud  edge weights (retained)
    status       hiertrain/<run>/<device>/status        both ways      JSON status (retained)
    infer        hiertrain/<run>/<device>/infer         edge -> cloud  toolkit.core.protocol.wire
    message,
                                                                       no labels
    infer_reply  hiertrain/<run>/<device>/infer/reply   cloud -> edge  inference result
    grad         hiertrain/<run>/<device>/grad          cloud -> edge  toolkit.core.protocol.wire
    message: the
                                                                       gradient of one cut
                                                                       activation (--mode split)
    ack          hiertrain/<run>/<device>/ack           cloud -> edge  JSON: its seqs trained and
                                                                       checkpointed
    average      hiertrain/<run>/<device>/average       cloud -> edge  the fleet's averaged edge
                                                                       (retained; --fleet-average,
                                                                       toolkit.core.protocol.
                                                                       fleet_average)

    subscription wildcards over devices: hiertrain/<run>/+/<suffix>, e.g.
    act_wildcard(run) == "hiertrain/<run>/+/act"; wildcard(run, kind) for any kind

Run and device ids are 1-64 characters of ``[A-Za-z0-9_.-]``: no ``/`` (it
would shift the levels), no ``+`` or ``#`` (MQTT wildcards), nothing a shell or
file name would need quoting for.
"""

from __future__ import annotations

import re

from toolkit.core.errors import HiertrainError, WireError

PREFIX = "hiertrain"

CLOUD_DEVICE = "cloud"
"""The cloud trainer's own device id: its broadcasts (status, acks) live under it."""

ACT = "act"
WEIGHTS = "weights"
STATUS = "status"
INFER = "infer"
INFER_REPLY = "infer_reply"
GRAD = "grad"
ACK = "ack"
AVERAGE = "average"

_SUFFIX: dict[str, str] = {
    ACT: "act",
    WEIGHTS: "weights",
    STATUS: "status",
    INFER: "infer",
    INFER_REPLY: "infer/reply",
    GRAD: "grad",
    ACK: "ack",
    AVERAGE: "average",
}
_KIND_BY_SUFFIX = {suffix: kind for kind, suffix in _SUFFIX.items()}
KINDS: tuple[str, ...] = tuple(_SUFFIX)

_ID_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


def validate_id(value: str, what: str = "id") -> str:
    """Return ``value`` if it is a valid run/device id, else raise HiertrainError."""
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None:
        raise HiertrainError(
            f"invalid {what} {value!r}: use 1-64 characters of letters, digits, '_', '.' "
            "or '-' (no '/', '+', '#' or spaces)."
        )
    return value


def topic(run: str, device: str, kind: str) -> str:
    """Topic for one device and kind (one of :data:`KINDS`)."""
    if kind not in _SUFFIX:
        raise HiertrainError(f"unknown topic kind {kind!r}; expected one of {list(KINDS)}.")
    run = validate_id(run, "run id")
    device = validate_id(device, "device id")
    return f"{PREFIX}/{run}/{device}/{_SUFFIX[kind]}"


def wildcard(run: str, kind: str) -> str:
    """Subscription matching ``kind`` messages of every device in ``run``."""
    if kind not in _SUFFIX:
        raise HiertrainError(f"unknown topic kind {kind!r}; expected one of {list(KINDS)}.")
    return f"{PREFIX}/{validate_id(run, 'run id')}/+/{_SUFFIX[kind]}"


def act_topic(run: str, device: str) -> str:
    """``hiertrain/<run>/<device>/act``: activation batches, edge to cloud."""
    return topic(run, device, ACT)


def weights_topic(run: str, device: str) -> str:
    """``hiertrain/<run>/<device>/weights``: weight updates, cloud to edge."""
    return topic(run, device, WEIGHTS)


def status_topic(run: str, device: str) -> str:
    """``hiertrain/<run>/<device>/status``: device status, edge to cloud."""
    return topic(run, device, STATUS)


def infer_request_topic(run: str, device: str) -> str:
    """``hiertrain/<run>/<device>/infer``: inference requests, edge to cloud."""
    return topic(run, device, INFER)


def infer_reply_topic(run: str, device: str) -> str:
    """``hiertrain/<run>/<device>/infer/reply``: inference replies, cloud to edge."""
    return topic(run, device, INFER_REPLY)


def grad_topic(run: str, device: str) -> str:
    """``hiertrain/<run>/<device>/grad``: cut-activation gradients, cloud to edge (split mode)."""
    return topic(run, device, GRAD)


def ack_topic(run: str, device: str) -> str:
    """``hiertrain/<run>/<device>/ack``: what the cloud trainer has trained *and
    checkpointed* of this device (``toolkit.core.protocol.messages.Ack``), cloud to that edge;
    the edge frees its spool with it."""
    return topic(run, device, ACK)


def average_topic(run: str, device: str) -> str:
    """``hiertrain/<run>/<device>/average``: the fleet's averaged edge weights for this device
    (``--fleet-average``; retained), cloud to that edge. One topic per device rather than one
    broadcast: each copy is signed with that device's key and names its training attempt, so
    no device can forge the model of another, and an ACL gives each device its own only."""
    return topic(run, device, AVERAGE)


def act_wildcard(run: str) -> str:
    """``hiertrain/<run>/+/act``."""
    return wildcard(run, ACT)


def status_wildcard(run: str) -> str:
    """``hiertrain/<run>/+/status``."""
    return wildcard(run, STATUS)


def infer_request_wildcard(run: str) -> str:
    """``hiertrain/<run>/+/infer``."""
    return wildcard(run, INFER)


def parse_topic(value: str) -> tuple[str, str, str]:
    """Split a concrete topic into ``(run, device, kind)``; WireError on anything foreign.

    A receiver calls this on every incoming topic, so a foreign or malformed
    topic is a dropped message (reason ``"topic"``), not a crash.
    """
    if not isinstance(value, str):
        raise WireError(f"topic must be a string, got {type(value).__name__}.", reason="topic")
    parts = value.split("/")
    if len(parts) < 4 or parts[0] != PREFIX:
        raise WireError(f"not a hiertrain topic: {value!r}.", reason="topic")
    run, device, suffix = parts[1], parts[2], "/".join(parts[3:])
    kind = _KIND_BY_SUFFIX.get(suffix)
    if kind is None:
        raise WireError(f"unknown topic kind {suffix!r} in {value!r}.", reason="topic")
    for what, ident in (("run id", run), ("device id", device)):
        if _ID_RE.fullmatch(ident) is None:
            raise WireError(f"invalid {what} {ident!r} in topic {value!r}.", reason="topic")
    return run, device, kind


def topic_owner(value: str) -> tuple[str, str]:
    """``(run, device)`` of any ``hiertrain/<run>/<device>/...`` topic; WireError otherwise.

    Unlike :func:`parse_topic` it does not insist on a known kind: message signing picks
    its key by run and device alone (:mod:`toolkit.core.keys`), so a new kind of topic is
    signed like the others without touching the keys.
    """
    if not isinstance(value, str):
        raise WireError(f"topic must be a string, got {type(value).__name__}.", reason="topic")
    parts = value.split("/")
    if len(parts) < 4 or parts[0] != PREFIX or not all(parts[3:]):
        raise WireError(f"not a hiertrain topic: {value!r}.", reason="topic")
    for what, ident in (("run id", parts[1]), ("device id", parts[2])):
        if _ID_RE.fullmatch(ident) is None:
            raise WireError(f"invalid {what} {ident!r} in topic {value!r}.", reason="topic")
    return parts[1], parts[2]
