"""Fuzzing the cloud trainer's ingest path: more than 10 000 malformed and mutated messages,
no exception escapes, every one is counted as dropped.

Messages go through exactly what a broker delivery goes through in the cloud trainer --
:class:`cloud_trainer.ingest.Ingest`'s ``on_act`` (topic, decode, manifest checks, device,
ledger), behind a :class:`~toolkit.core.transport.signing.SignedLink` when signing is on -- fed
from a loopback link in this process, so no broker is needed for the bulk.

Honest accounting: each example must raise a drop counter by exactly one and put nothing on
the training queue. Mutations are built so that none can stay valid: targeted field
corruptions break a field the receiver checks (the CRC is recomputed so the check is reached);
random bit flips, truncations and extensions keep the old CRC, which catches all of them
except with probability 2**-32 each. Examples are derandomized, so the run is deterministic.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from cloud_trainer.ingest import DeviceRegistry, DropCounter, Ingest, Ledger  # noqa: E402
from tests.conftest import InProcessLink  # noqa: E402
from toolkit.core.keys import RunKeys, device_key  # noqa: E402
from toolkit.core.protocol import topics  # noqa: E402
from toolkit.core.protocol.quant import QuantScheme, quantize  # noqa: E402
from toolkit.core.protocol.wire import MAGIC, ActivationBatch, encode  # noqa: E402
from toolkit.core.transport.base import Link, MessageHandler  # noqa: E402
from toolkit.core.transport.signing import SignedLink, sign  # noqa: E402

pytestmark = pytest.mark.security

RUN, DEVICE = "fz", "e0"
TOPIC = topics.act_topic(RUN, DEVICE)
CUT = (6, 3, 3)
NUM_CLASSES = 10
KEY = b"fuzzing-run-key-0123456789abcdef"  # the run key: the cloud derives each device's
DEVICE_KEY = device_key(KEY, RUN, DEVICE)  # what the edge signs with

FUZZ = settings(derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


def _base_messages() -> list[bytes]:
    """Real, valid messages in every codec the edge can send (the cloud accepts each)."""
    g = torch.Generator().manual_seed(0)
    out = []
    cases: list[tuple[QuantScheme | None, bool, int]] = [
        (QuantScheme(8, "per_channel", False, 1), False, 2),
        (QuantScheme(8, "per_tensor", True, 0), False, 2),
        (QuantScheme(4, "per_channel", False, 1), True, 2),
        (QuantScheme(2, "per_tensor", False, 0), True, 2),
        (None, False, 2),  # raw float32
        (QuantScheme(8, "per_tensor", False, 0), False, 1),  # wire version 1
    ]
    for i, (scheme, deflate, version) in enumerate(cases):
        x = torch.relu(torch.randn((3, *CUT), generator=g))
        y = torch.randint(0, NUM_CLASSES, (3,), generator=g)
        b = ActivationBatch(RUN, DEVICE, seq=i, epoch=0, batch_index=i,
                            quantized=quantize(x, scheme) if scheme else None,
                            raw=x if scheme is None else None, labels=y)
        out.append(encode(b, deflate=deflate, version=version))
    return out


BASE = _base_messages()


@dataclass
class Fields:
    """Byte offsets of the fields a targeted corruption rewrites."""

    run: tuple[int, int]
    device: tuple[int, int]
    dtype: int
    bits: int
    shape: int
    ndim: int
    n_scale: int
    scale: int
    has_labels: int
    labels: int


def _fields(msg: bytes) -> Fields:
    p = 8
    run = (p + 1, p + 1 + msg[p])
    p = run[1]
    device = (p + 1, p + 1 + msg[p])
    p = device[1] + 16  # seq, epoch, batch_index
    dtype, bits, ndim = p, p + 1, msg[p + 5]
    shape = p + 6
    p = shape + 4 * ndim
    (n_scale,) = struct.unpack_from("<I", msg, p)
    scale = p + 4
    has_labels = scale + 8 * n_scale
    return Fields(run, device, dtype, bits, shape, ndim, n_scale, scale, has_labels,
                  has_labels + 1)


def _with_crc(body: bytearray) -> bytes:
    """Recompute the CRC, so the corruption reaches the checks behind it."""
    return bytes(body[:-4]) + struct.pack("<I", zlib.crc32(bytes(body[:-4])))


class LoopbackLink(InProcessLink):
    """Delivers ``deliver(topic, payload)`` to the matching handler, as paho's thread would."""

    def __init__(self) -> None:
        super().__init__("fuzz")
        self.handlers: dict[str, MessageHandler] = {}

    def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        raise AssertionError("the ingest path never publishes")

    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1) -> None:
        self.handlers[topic] = handler

    def deliver(self, topic: str, payload: bytes) -> None:
        self.handlers[topics.act_wildcard(RUN)](topic, payload, {})


class Harness:
    """One cloud-side ingest (optionally behind signature checks) and its counters."""

    def __init__(self, signed: bool = False) -> None:
        self.drops = DropCounter()
        self.ingest = Ingest(RUN, cut_shape=CUT, num_classes=NUM_CLASSES, max_batch=64,
                             ledger=Ledger(), registry=DeviceRegistry([DEVICE]),
                             drops=self.drops, queue_size=10_000)
        self.loop = LoopbackLink()
        link: Link = SignedLink(self.loop, RunKeys(KEY), self.drops.drop) if signed else self.loop
        self.ingest.subscribe(link)
        self.fed = 0

    def dropped(self) -> int:
        return sum(self.drops.snapshot().values())

    def feed_rejected(self, payload: bytes, topic: str = TOPIC) -> str:
        """Deliver one message that must be dropped; returns the reason it was counted under."""
        before = self.drops.snapshot()
        self.loop.deliver(topic, payload)  # an exception escaping fails the test right here
        self.fed += 1
        after = self.drops.snapshot()
        grown = [r for r in after if after[r] != before.get(r, 0)]
        assert self.ingest.queue.empty(), "a malformed message was queued for training"
        assert len(grown) == 1 and after[grown[0]] == before.get(grown[0], 0) + 1, (grown, payload)
        return grown[0]


# --------------------------------------------------------------------------- the harness


def test_the_harness_accepts_every_real_message() -> None:
    """Valid messages are queued, not dropped: the fuzz tests' counters can fail."""
    h = Harness()
    for msg in BASE:
        h.loop.deliver(TOPIC, msg)
    assert h.dropped() == 0 and h.ingest.queue.qsize() == len(BASE)
    hs = Harness(signed=True)
    for msg in BASE:
        hs.loop.deliver(TOPIC, sign(DEVICE_KEY, TOPIC, msg))
    assert hs.dropped() == 0 and hs.ingest.queue.qsize() == len(BASE)
    while not hs.ingest.queue.empty():
        hs.ingest.queue.get_nowait()
    assert hs.feed_rejected(BASE[0]) == "unsigned"


# --------------------------------------------------------------------------- strategies


def _flip(data: st.DataObject, msg: bytes) -> bytes:
    b = bytearray(msg)
    for _ in range(data.draw(st.integers(1, 8), "flips")):
        i = data.draw(st.integers(0, len(b) - 1), "pos")
        b[i] ^= 1 << data.draw(st.integers(0, 7), "bit")
    return bytes(b)


def _truncate(data: st.DataObject, msg: bytes) -> bytes:
    return msg[: data.draw(st.integers(0, len(msg) - 1), "keep")]


def _extend(data: st.DataObject, msg: bytes) -> bytes:
    return msg + data.draw(st.binary(min_size=1, max_size=64), "tail")


def _splice(data: st.DataObject, msg: bytes) -> bytes:
    """Overwrite a span with random bytes, or delete / insert one (old CRC kept)."""
    i = data.draw(st.integers(0, len(msg) - 1), "at")
    junk = data.draw(st.binary(min_size=1, max_size=32), "junk")
    how = data.draw(st.sampled_from(["overwrite", "delete", "insert"]), "how")
    if how == "overwrite":
        return msg[:i] + junk + msg[i + len(junk):]
    if how == "delete":
        return msg[:i] + msg[i + len(junk):]
    return msg[:i] + junk + msg[i:]


RANDOM_MUTATIONS: list[Callable[[st.DataObject, bytes], bytes]] = [
    _flip, _truncate, _extend, _splice]


def _mutate(data: st.DataObject, msg: bytes) -> bytes:
    """A random mutation that changed something (a no-op overwrite gets one more bit flipped)."""
    mutated = data.draw(st.sampled_from(RANDOM_MUTATIONS), "how")(data, msg)
    if mutated == msg:
        mutated = bytes([mutated[0] ^ 0x80]) + mutated[1:]
    return mutated


def _corrupt(data: st.DataObject, msg: bytes) -> bytes:
    """A field the receiver checks set to a value it must refuse, with a valid CRC."""
    f = _fields(msg)
    b = bytearray(msg)
    raw = b[f.dtype] == 2
    targets = ["magic", "version", "flags", "header_len", "dtype", "bits", "dim", "label",
               "has_labels", "run", "device"] + ([] if raw else ["scale"])
    what = data.draw(st.sampled_from(targets), "field")
    if what == "magic":
        b[0:4] = data.draw(st.binary(min_size=4, max_size=4).filter(lambda m: m != MAGIC))
    elif what == "version":
        b[4] = data.draw(st.integers(0, 255).filter(lambda v: v not in (1, 2)))
    elif what == "flags":
        b[5] |= data.draw(st.integers(1, 63)) << 2  # an undefined flag bit
    elif what == "header_len":
        (true,) = struct.unpack_from("<H", b, 6)
        struct.pack_into("<H", b, 6, data.draw(st.integers(0, 65535).filter(lambda v: v != true)))
    elif what == "dtype":
        b[f.dtype] = data.draw(st.integers(0, 255).filter(lambda v: v not in (1, 2)))
    elif what == "bits":
        b[f.bits] = data.draw(st.integers(0, 255).filter(lambda v: v != b[f.bits]))
    elif what == "dim":  # a non-batch dim: the cut shape no longer matches the manifest's
        k = data.draw(st.integers(1, f.ndim - 1))
        (old,) = struct.unpack_from("<I", b, f.shape + 4 * k)
        struct.pack_into("<I", b, f.shape + 4 * k,
                         data.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != old)))
    elif what == "label":
        n = struct.unpack_from("<I", b, f.shape)[0]
        i = data.draw(st.integers(0, n - 1))
        bad = data.draw(st.one_of(st.integers(-(2**31), -1), st.integers(NUM_CLASSES, 2**31 - 1)))
        struct.pack_into("<i", b, f.labels + 4 * i, bad)
    elif what == "has_labels":
        b[f.has_labels] = data.draw(st.integers(2, 255))
    elif what in ("run", "device"):
        lo, hi = f.run if what == "run" else f.device
        b[lo:hi] = data.draw(st.binary(min_size=hi - lo, max_size=hi - lo)
                             .filter(lambda v: v != bytes(b[lo:hi])))
    else:  # scale: zero, negative or not finite
        i = data.draw(st.integers(0, f.n_scale - 1))
        bad = data.draw(st.sampled_from([0.0, -1.0, -1e-30, float("inf"), float("nan")]))
        struct.pack_into("<f", b, f.scale + 4 * i, bad)
    return _with_crc(b)


# --------------------------------------------------------------------------- the fuzzing

N_RANDOM, N_CORRUPT, N_GARBAGE, N_SIGNED = 3500, 3500, 1500, 2000
assert N_RANDOM + N_CORRUPT + N_GARBAGE + N_SIGNED >= 10_000


PER_EXAMPLE = 5
"""Messages per hypothesis example: its fixed cost per example (~5 ms here) is then shared."""


def _run(n: int, signed: bool, make: Callable[[st.DataObject], bytes | tuple[bytes, str]]
         ) -> dict[str, int]:
    """Feed ``n`` messages from ``make``; each must be dropped, and counted, exactly once."""
    h = Harness(signed=signed)

    @settings(FUZZ, max_examples=-(-n // PER_EXAMPLE))
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        for _ in range(PER_EXAMPLE):
            made = make(data)
            payload, topic = made if isinstance(made, tuple) else (made, TOPIC)
            h.feed_rejected(payload, topic)

    fuzz()
    assert h.fed >= n and h.dropped() == h.fed and h.ingest.queue.empty()
    return h.drops.snapshot()


def test_randomly_mutated_messages_are_all_dropped() -> None:
    def make(data: st.DataObject) -> bytes:
        msg = data.draw(st.sampled_from(BASE), "base")
        return _mutate(data, msg)

    counts = _run(N_RANDOM, False, make)
    assert {"crc", "truncated"} <= set(counts), counts


def test_messages_with_a_corrupted_field_and_a_valid_crc_are_all_dropped() -> None:
    def make(data: st.DataObject) -> bytes:
        return _corrupt(data, data.draw(st.sampled_from(BASE), "base"))

    counts = _run(N_CORRUPT, False, make)
    # The checks behind the CRC are reached, each under its own reason.
    assert {"magic", "version", "flags", "header", "dtype", "shape", "labels", "scale",
            "run_id", "device"} <= set(counts), counts


def test_garbage_and_forged_headers_are_all_dropped() -> None:
    def make(data: st.DataObject) -> bytes | tuple[bytes, str]:
        kind = data.draw(st.sampled_from(["bytes", "magic", "header", "topic"]), "kind")
        if kind == "bytes":
            return data.draw(st.binary(max_size=512))
        if kind == "magic":  # our magic and a supported version, then anything
            return MAGIC + bytes([data.draw(st.sampled_from([1, 2]))]) + data.draw(
                st.binary(max_size=512))
        if kind == "header":  # random header fields and sizes, with a correct CRC
            run, dev = RUN.encode(), DEVICE.encode()
            ndim = data.draw(st.integers(0, 9))
            head = (struct.pack("<4sBBH", MAGIC, 2, data.draw(st.integers(0, 3)),
                                data.draw(st.integers(0, 600)))
                    + bytes([len(run)]) + run + bytes([len(dev)]) + dev
                    + data.draw(st.binary(min_size=16, max_size=16))
                    + bytes(data.draw(st.lists(st.integers(0, 255), min_size=5, max_size=5)))
                    + bytes([ndim])
                    + b"".join(struct.pack("<I", data.draw(st.integers(0, 40)))
                               for _ in range(ndim)))
            body = head + data.draw(st.binary(max_size=256))
            return body + struct.pack("<I", zlib.crc32(body))
        # a real message on a topic that is not an edge's act topic of this run
        bad = data.draw(st.sampled_from([
            "hiertrain/other-run/e0/act", "hiertrain/fz/e 0/act", "hiertrain/fz/e0",
            "foreign/fz/e0/act", "hiertrain/fz/+/act", "hiertrain/fz/cloud/act"]))
        return data.draw(st.sampled_from(BASE)), bad

    counts = _run(N_GARBAGE, False, make)
    assert sum(counts.values()) >= N_GARBAGE


def test_mutated_signed_messages_are_all_dropped() -> None:
    """With signing on, any change to a signed message -- or its topic -- is a bad signature."""
    signed = [sign(DEVICE_KEY, TOPIC, m) for m in BASE]

    def make(data: st.DataObject) -> bytes | tuple[bytes, str]:
        msg = data.draw(st.sampled_from(signed), "base")
        if data.draw(st.integers(0, 9)) == 0:  # replayed under another device's topic
            return msg, topics.act_topic(RUN, "e1")
        return _mutate(data, msg)

    counts = _run(N_SIGNED, True, make)
    # A cut so short that nothing is left is an empty payload, which carries nothing to
    # verify (it clears a retained message) and is then refused as "truncated".
    assert set(counts) <= {"bad_signature", "unsigned", "truncated"}, counts
    assert counts["bad_signature"] > N_SIGNED / 2, counts


def test_fuzzed_status_and_weights_messages_never_escape() -> None:
    """Status JSON and weights messages with random fields: each is dropped (counted) or queued
    well-typed; nothing raises out of the handlers."""
    from cloud_trainer.ingest import StatusItem
    from toolkit.core.protocol.messages import Status, encode_weights

    h = Harness()
    statuses = topics.status_wildcard(RUN)
    weights = topics.wildcard(RUN, topics.WEIGHTS)
    good_weights = encode_weights({"w": torch.ones(2)}, {"run": RUN, "device": DEVICE})
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                        st.floats(allow_nan=True), st.text(max_size=8))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
    fed = 0

    @settings(FUZZ, max_examples=300)
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        nonlocal fed
        for _ in range(PER_EXAMPLE):
            if data.draw(st.booleans()):
                d = json.loads(Status("edge", DEVICE, RUN, "online", time=1.0).encode())
                for key in data.draw(st.lists(st.sampled_from(sorted(d)), max_size=4)):
                    d[key] = data.draw(values)
                payload = json.dumps(d).encode()
                if data.draw(st.booleans()):
                    payload = _mutate(data, payload)
                before = h.dropped()
                h.loop.handlers[statuses](topics.status_topic(RUN, DEVICE), payload, {})
            else:
                payload = _mutate(data, good_weights)
                before = h.dropped()
                h.loop.handlers[weights](topics.weights_topic(RUN, DEVICE), payload, {})
            fed += 1
            queued = 0
            while not h.ingest.queue.empty():
                item = h.ingest.queue.get_nowait()
                queued += 1
                if isinstance(item, StatusItem):  # what the trainer does arithmetic on
                    s = item.status
                    assert all(isinstance(v, int) and not isinstance(v, bool) for v in (
                        s.epoch, s.batches_published, s.samples_published, s.last_seq))
            # An empty payload clears a retained message: neither a message nor a drop.
            assert (h.dropped() - before) + queued == (1 if payload else 0)

    fuzz()
    assert fed >= 1500
