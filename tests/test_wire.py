"""Tests for toolkit.core.protocol.wire: round trip, every rejection reason, fuzzing, size
accounting."""

from __future__ import annotations

import random
import struct
import zlib
from collections.abc import Callable

import pytest
import torch

from toolkit.core.errors import HiertrainError, WireError
from toolkit.core.protocol.codec import BatchMeta, DecodedBatch
from toolkit.core.protocol.codec import decode as codec_decode
from toolkit.core.protocol.quant import DEFAULT_SCHEME, QuantScheme, quantize
from toolkit.core.protocol.wire import (
    FLAG_DEFLATE,
    FLAG_PACKED,
    FORMAT_VERSION,
    MAGIC,
    MAX_INFLATED_BYTES,
    MIN_MESSAGE_SIZE,
    SUPPORTED_VERSIONS,
    ActivationBatch,
    _split,
    decode,
    encode,
    header_overhead,
    header_size,
    message_size,
    pack_codes,
    plain_payload_size,
    unpack_codes,
)

RUN, DEVICE = "run-7", "pi4.b"


def _batch(
    shape: tuple[int, ...] = (4, 3, 5, 2),
    scheme: QuantScheme | None = DEFAULT_SCHEME,
    *,
    labels: bool = True,
    seed: int = 0,
    run_id: str = RUN,
    device_id: str = DEVICE,
) -> ActivationBatch:
    g = torch.Generator().manual_seed(seed)
    x = torch.relu(torch.randn(shape, generator=g))
    y = torch.randint(0, 10, (shape[0],), generator=g) if labels else None
    return ActivationBatch(
        run_id=run_id,
        device_id=device_id,
        seq=2**40 + 3,
        epoch=12,
        batch_index=345,
        quantized=quantize(x, scheme) if scheme is not None else None,
        raw=x if scheme is None else None,
        labels=y,
    )


def _reasons(data: bytes, **kw: str) -> str:
    with pytest.raises(WireError) as exc:
        decode(data, **kw)
    return exc.value.reason


def _fix_crc(body: bytes) -> bytes:
    """Re-seal a tampered message so the structural checks, not the CRC, see it."""
    return body + struct.pack("<I", zlib.crc32(body))


def _tamper(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data[:-4])
    struct.pack_into(fmt, buf, offset, value)
    return _fix_crc(bytes(buf))


# Offsets in a message for RUN / DEVICE (fixed-length ids, so fixed offsets).
_O_FLAGS = 5
_O_HEADER_LEN = 6
_O_RUN = 8
_O_DEVICE = _O_RUN + 1 + len(RUN)
_O_SEQ = _O_DEVICE + 1 + len(DEVICE)
_O_DTYPE = _O_SEQ + 16
_O_BITS, _O_GRAN, _O_SYM, _O_AXIS, _O_NDIM = range(_O_DTYPE + 1, _O_DTYPE + 6)
_O_SHAPE = _O_NDIM + 1


def _o_nscale(ndim: int) -> int:
    return _O_SHAPE + 4 * ndim


def _floats(b: ActivationBatch) -> torch.Tensor:
    """The float32 tensor a receiver gets for ``b`` (the codec's decoding of the wire form)."""
    meta = BatchMeta(b.run_id, b.device_id, b.seq, b.epoch, b.batch_index)
    return DecodedBatch(meta, b.labels, b).tensor


def _assert_same(a: ActivationBatch, b: ActivationBatch) -> None:
    assert (a.run_id, a.device_id, a.seq, a.epoch, a.batch_index) == (
        b.run_id,
        b.device_id,
        b.seq,
        b.epoch,
        b.batch_index,
    )
    if a.labels is None:
        assert b.labels is None
    else:
        assert b.labels is not None and b.labels.dtype == torch.int64
        assert torch.equal(a.labels, b.labels)
    if a.quantized is None:
        assert b.quantized is None and a.raw is not None and b.raw is not None
        assert b.raw.dtype == torch.float32 and torch.equal(a.raw, b.raw)
    else:
        assert b.raw is None and b.quantized is not None
        qa, qb = a.quantized, b.quantized
        assert qa.scheme == qb.scheme
        for name in ("codes", "scale", "zero_point"):
            ta, tb = getattr(qa, name), getattr(qb, name)
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), name
    assert torch.equal(_floats(a), _floats(b))


SCHEMES = [
    DEFAULT_SCHEME,
    QuantScheme(granularity="per_tensor"),
    QuantScheme(bits=4, symmetric=True),
    QuantScheme(bits=2, channel_axis=3),
    None,
]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.scheme_id if s else "float32")
@pytest.mark.parametrize("labels", [True, False])
def test_round_trip_preserves_every_field(scheme: QuantScheme | None, labels: bool) -> None:
    batch = _batch(scheme=scheme, labels=labels)
    data = encode(batch)
    assert data[:4] == MAGIC and data[4] == FORMAT_VERSION
    assert len(data) == message_size(
        (4, 3, 5, 2), scheme, run_id=RUN, device_id=DEVICE, has_labels=labels
    )
    _assert_same(batch, decode(data, expected_run_id=RUN))
    _assert_same(batch, decode(bytearray(data)))
    _assert_same(batch, decode(memoryview(data)))


def test_round_trip_unicode_ids_extreme_counters_and_shapes() -> None:
    batch = _batch(
        shape=(1,),
        scheme=QuantScheme(granularity="per_tensor"),
        run_id="é" * 127,
        device_id="",
        seed=3,
    )
    batch.seq, batch.epoch, batch.batch_index = 2**64 - 1, 2**32 - 1, 0
    _assert_same(batch, decode(encode(batch)))
    batch = _batch(shape=(2, 1, 1, 1, 1, 1, 1, 3), scheme=QuantScheme(channel_axis=7))
    _assert_same(batch, decode(encode(batch)))


def test_header_len_field_matches_helper() -> None:
    data = encode(_batch())
    (header_len,) = struct.unpack_from("<H", data, _O_HEADER_LEN)
    assert header_len == header_size(4, run_id=RUN, device_id=DEVICE)
    assert data[_O_NDIM] == 4


def test_int8_bytes_per_sample_is_about_a_quarter_of_float32() -> None:
    shape = (32, 64, 32, 32)
    n = shape[0]
    x = torch.relu(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    labels = torch.arange(n) % 10
    common = {"run_id": RUN, "device_id": DEVICE, "seq": 0, "epoch": 0, "batch_index": 0}
    q_bytes = len(encode(ActivationBatch(**common, quantized=quantize(x), labels=labels)))
    f_bytes = len(encode(ActivationBatch(**common, raw=x, labels=labels)))
    q_over = header_overhead(shape, DEFAULT_SCHEME, run_id=RUN, device_id=DEVICE)
    f_over = header_overhead(shape, None, run_id=RUN, device_id=DEVICE)
    # Payload is exactly a quarter; everything else is a small, known overhead.
    assert q_bytes - q_over == (f_bytes - f_over) // 4 == x.numel()
    assert q_over - f_over == 8 * shape[1]  # one f32 scale + one i32 zero point per channel
    ratio = (q_bytes / n) / (f_bytes / n)
    assert abs(ratio - 0.25) < 0.25 * 0.01


# ----------------------------------------------------------------- rejections


def test_rejects_short_inputs_as_truncated() -> None:
    for data in (b"", b"H", b"HTA", MAGIC, MAGIC + b"\x01", MAGIC + b"\x01" * 20):
        assert _reasons(data) == "truncated"
    assert _reasons(b"\x00" * (MIN_MESSAGE_SIZE - 1)) == "magic"


def test_rejects_wrong_magic() -> None:
    data = encode(_batch())
    assert _reasons(b"HTAC" + data[4:]) == "magic"
    assert _reasons(b'{"json": true}' * 10) == "magic"


def test_rejects_unsupported_version_naming_supported_ones() -> None:
    assert FORMAT_VERSION == 2 and SUPPORTED_VERSIONS == (1, 2)
    data = bytearray(encode(_batch()))
    data[4] = 3
    with pytest.raises(WireError, match=r"version 3.*\[1, 2\]") as exc:
        decode(bytes(data))
    assert exc.value.reason == "version"


def test_rejects_flipped_bytes_as_crc() -> None:
    data = encode(_batch())
    # A byte in the counters, the ids, the scales, the labels, the payload and the CRC itself.
    for offset in (_O_SEQ, _O_RUN + 2, _o_nscale(4) + 5, len(data) - 30, len(data) - 6, -1):
        buf = bytearray(data)
        buf[offset] ^= 0x10
        assert _reasons(bytes(buf)) == "crc", offset


def test_rejects_run_id_mismatch() -> None:
    data = encode(_batch())
    assert _reasons(data, expected_run_id="run-8") == "run_id"
    assert decode(data, expected_run_id=RUN).run_id == RUN


def test_rejects_trailing_bytes() -> None:
    data = encode(_batch())
    assert _reasons(data + b"\x00") == "trailing"
    assert _reasons(_fix_crc(data[:-4] + b"junk")) == "trailing"


def test_truncation_at_every_length_raises_only_wire_error() -> None:
    data = encode(_batch(shape=(3, 2, 2)))
    reasons = {_reasons(data[:cut]) for cut in range(len(data))}
    assert reasons <= {"truncated", "crc"}
    assert "truncated" in reasons


def test_truncated_but_resealed_message_is_truncated() -> None:
    data = encode(_batch())
    assert _reasons(_fix_crc(data[:-40])) == "truncated"


def test_rejects_reserved_flags() -> None:
    for bit in range(2, 8):
        assert _reasons(_tamper(encode(_batch()), _O_FLAGS, "<B", 1 << bit)) == "flags", bit
    v1 = encode(_batch(), version=1)
    for flags in (FLAG_PACKED, FLAG_DEFLATE):
        assert _reasons(_tamper(v1, _O_FLAGS, "<B", flags)) == "flags"


def test_rejects_wrong_header_len() -> None:
    data = encode(_batch())
    (real,) = struct.unpack_from("<H", data, _O_HEADER_LEN)
    assert _reasons(_tamper(data, _O_HEADER_LEN, "<H", real + 1)) == "header"


def test_rejects_invalid_utf8_ids() -> None:
    data = _tamper(encode(_batch()), _O_RUN + 1, "<B", 0xFF)
    assert _reasons(data) == "utf8"
    data = _tamper(encode(_batch()), _O_DEVICE + 1, "<B", 0xC3)
    assert _reasons(data) == "utf8"


@pytest.mark.parametrize(
    ("offset", "value", "reason"),
    [
        (_O_DTYPE, 0, "dtype"),
        (_O_DTYPE, 3, "dtype"),
        (_O_BITS, 3, "scheme"),
        (_O_BITS, 32, "scheme"),
        (_O_GRAN, 2, "scheme"),
        (_O_SYM, 2, "scheme"),
        (_O_AXIS, 9, "scheme"),
    ],
)
def test_rejects_bad_scheme_fields(offset: int, value: int, reason: str) -> None:
    assert _reasons(_tamper(encode(_batch()), offset, "<B", value)) == reason


def test_rejects_channel_axis_beyond_ndim() -> None:
    # Axis 4 of a 4-d shape: valid for the scheme type, not for this tensor.
    assert _reasons(_tamper(encode(_batch()), _O_AXIS, "<B", 4)) == "scheme"


def test_rejects_float32_message_with_scheme_fields() -> None:
    data = encode(_batch(scheme=None))
    assert _reasons(_tamper(data, _O_BITS, "<B", 8)) == "scheme"
    assert _reasons(_tamper(data, _O_GRAN, "<B", 1)) == "scheme"


def _raw_message(
    shape: tuple[int, ...], payload_len: int, *, n_scale: int = 0, version: int = FORMAT_VERSION
) -> bytes:
    """A float32-coded message with an arbitrary (possibly absurd) shape, built by hand."""
    ndim = len(shape)
    head = (
        struct.pack("<B", len(RUN))
        + RUN.encode()
        + struct.pack("<B", len(DEVICE))
        + DEVICE.encode()
        + struct.pack("<QII", 1, 2, 3)
        + struct.pack("<BBBBBB", 2, 32, 0, 0, 0, ndim)
        + struct.pack(f"<{ndim}I", *shape)
    )
    header_len = 8 + len(head)
    body = (
        MAGIC
        + struct.pack("<BBH", version, 0, header_len)
        + head
        + struct.pack("<I", n_scale)
        + b"\x00" * (8 * n_scale)
        + b"\x00"  # no labels
        + struct.pack("<I", payload_len)
        + b"\x00" * payload_len
    )
    return _fix_crc(body)


def test_hand_built_message_matches_encoder() -> None:
    """Guards the test helper itself, so the absurd-size cases below mean something."""
    batch = ActivationBatch(RUN, DEVICE, 1, 2, 3, raw=torch.zeros(2, 3))
    assert _raw_message((2, 3), 24) == encode(batch)
    assert _raw_message((2, 3), 24, version=1) == encode(batch, version=1)


@pytest.mark.parametrize(
    "shape",
    [(), (1,) * 9, (0, 3), (2, 0), (2**24 + 1, 1), (2**32 - 1, 2**32 - 1)],
    ids=["ndim0", "ndim9", "zero-batch", "zero-dim", "dim-too-big", "dims-huge"],
)
def test_rejects_absurd_shapes(shape: tuple[int, ...]) -> None:
    assert _reasons(_raw_message(shape, 4)) == "shape"


def test_rejects_payload_length_not_matching_shape() -> None:
    assert _reasons(_raw_message((2, 3), 20)) == "payload"
    assert _reasons(_raw_message((2, 3), 28)) == "payload"
    assert decode(_raw_message((2, 3), 24)).raw is not None


def test_rejects_int8_payload_length_not_matching_shape() -> None:
    data = encode(_batch(shape=(2, 3)))
    # Drop one code byte and fix the payload length: consistent framing, wrong size.
    body = bytearray(data[:-4])
    payload_len_at = len(body) - 6 - 4
    assert struct.unpack_from("<I", body, payload_len_at)[0] == 6
    struct.pack_into("<I", body, payload_len_at, 5)
    assert _reasons(_fix_crc(bytes(body[:-1]))) == "payload"


def test_rejects_scale_count_not_one_or_c() -> None:
    data = encode(_batch(shape=(2, 3)))  # per channel, C = 3
    at = _o_nscale(2)
    assert struct.unpack_from("<I", data, at)[0] == 3
    body = bytearray(data[:-4])
    # Claim 2 entries and remove one scale and one zero point so the framing stays intact.
    struct.pack_into("<I", body, at, 2)
    del body[at + 4 + 20 : at + 4 + 24]  # third zero point
    del body[at + 4 + 8 : at + 4 + 12]  # third scale
    assert _reasons(_fix_crc(bytes(body))) == "scale"
    assert _reasons(_raw_message((2, 3), 24, n_scale=1)) == "scheme"


@pytest.mark.parametrize(
    ("value", "fmt", "which"),
    [
        (0.0, "<f", 0),
        (-1.0, "<f", 0),
        (float("nan"), "<f", 0),
        (float("inf"), "<f", 0),
        (200, "<i", 1),
    ],
)
def test_rejects_bad_scale_or_zero_point(value: float, fmt: str, which: int) -> None:
    data = encode(_batch(shape=(2, 3)))
    at = _o_nscale(2) + 4 + which * 12
    assert _reasons(_tamper(data, at, fmt, value)) == "scale"


def test_rejects_nonzero_zero_point_for_symmetric() -> None:
    data = encode(_batch(shape=(2, 3), scheme=QuantScheme(symmetric=True)))
    assert _reasons(_tamper(data, _o_nscale(2) + 4 + 12, "<i", 1)) == "scale"


def test_rejects_codes_outside_narrow_bit_range() -> None:
    """Version 1 stores 4-bit codes one per byte, so a code can be out of range."""
    data = encode(_batch(shape=(2, 3), scheme=QuantScheme(bits=4)), version=1)
    assert _reasons(_tamper(data, len(data) - 5, "<b", 8)) == "payload"
    assert _reasons(_tamper(data, len(data) - 5, "<b", -9)) == "payload"


def test_rejects_non_finite_float32_payload() -> None:
    data = encode(_batch(shape=(2, 3), scheme=None))
    assert _reasons(_tamper(data, len(data) - 8, "<f", float("nan"))) == "nonfinite"


def test_rejects_bad_has_labels_flag() -> None:
    data = encode(_batch(shape=(2, 3), labels=False))
    at = _o_nscale(2) + 4 + 24
    assert data[at] == 0
    # Read as "labels present": the 8 label bytes it then expects are not there.
    assert _reasons(_tamper(data, at, "<B", 2)) == "truncated"
    # With the labels' bytes present, an invalid flag value is the only problem left.
    body = bytearray(encode(_batch(shape=(2, 3)))[:-4])
    body[at] = 2
    assert _reasons(_fix_crc(bytes(body))) == "labels"


def test_label_count_is_tied_to_batch_size() -> None:
    """The wire has no label count: N int32 follow the flag, so a mismatch is caught as framing."""
    data = encode(_batch(shape=(2, 3)))
    body = bytearray(data[:-4])
    at = _o_nscale(2) + 4 + 24 + 1
    del body[at : at + 4]  # one label fewer than N
    assert _reasons(_fix_crc(bytes(body))) == "truncated"
    body = bytearray(data[:-4])
    body[at:at] = b"\x00" * 4  # one label more than N
    assert _reasons(_fix_crc(bytes(body))) == "trailing"


# ----------------------------------------------------------------- fuzzing


def test_fuzz_random_bytes_only_wire_error() -> None:
    rng = random.Random(1234)
    valid_prefix = encode(_batch(shape=(2, 3)))[:12]
    for i in range(500):
        n = rng.randrange(0, 200)
        data = bytes(rng.getrandbits(8) for _ in range(n))
        if i % 2:  # get past the magic/version checks half of the time
            data = valid_prefix[: rng.randrange(0, 13)] + data
        with pytest.raises(WireError):
            decode(data)


def _mutations(data: bytes, rng: random.Random) -> dict[str, Callable[[], bytes]]:
    def flip() -> bytes:
        buf = bytearray(data)
        buf[rng.randrange(len(buf))] ^= rng.randrange(1, 256)
        return bytes(buf)

    def flip_resealed() -> bytes:
        return _fix_crc(flip()[:-4])

    def insert() -> bytes:
        at = rng.randrange(len(data))
        return data[:at] + bytes([rng.getrandbits(8)]) + data[at:]

    def delete() -> bytes:
        at = rng.randrange(len(data))
        return data[:at] + data[at + 1 :]

    return {"flip": flip, "flip_resealed": flip_resealed, "insert": insert, "delete": delete}


@pytest.mark.parametrize(
    "scheme", [DEFAULT_SCHEME, QuantScheme(bits=2), None], ids=["int8", "int2", "float32"]
)
def test_fuzz_single_byte_mutations_only_wire_error(scheme: QuantScheme | None) -> None:
    rng = random.Random(99)
    data = encode(_batch(shape=(3, 2, 2), scheme=scheme))
    rejected = 0
    for _ in range(200):
        for name, mutate in _mutations(data, rng).items():
            try:
                decode(mutate())  # anything but WireError propagates and fails the test
            except WireError as exc:
                assert isinstance(exc.reason, str) and exc.reason
                rejected += 1
            else:
                # Only a resealed change to an unconstrained field (seq, a label...) decodes.
                assert name == "flip_resealed"
    assert rejected > 600


def test_unresealed_single_byte_change_never_decodes() -> None:
    rng = random.Random(7)
    data = encode(_batch(shape=(3, 2, 2)))
    for _ in range(300):
        buf = bytearray(data)
        at = rng.randrange(len(buf))
        buf[at] ^= rng.randrange(1, 256)
        with pytest.raises(WireError):
            decode(bytes(buf))


def test_decode_rejects_non_bytes() -> None:
    with pytest.raises(WireError):
        decode("HTAB" * 20)  # type: ignore[arg-type]


# ----------------------------------------------------------------- encode errors


def test_encode_rejects_unrepresentable_batches() -> None:
    good = _batch(shape=(2, 3))
    cases: list[ActivationBatch] = [
        ActivationBatch(RUN, DEVICE, 0, 0, 0),  # no tensor
        ActivationBatch(RUN, DEVICE, 0, 0, 0, quantized=good.quantized, raw=torch.zeros(2, 3)),
        ActivationBatch(RUN, DEVICE, -1, 0, 0, raw=torch.zeros(2, 3)),
        ActivationBatch(RUN, DEVICE, 0, 2**32, 0, raw=torch.zeros(2, 3)),
        ActivationBatch("x" * 256, DEVICE, 0, 0, 0, raw=torch.zeros(2, 3)),
        ActivationBatch(RUN, DEVICE, 0, 0, 0, raw=torch.zeros(2, 3), labels=torch.zeros(3)),
        ActivationBatch(
            RUN, DEVICE, 0, 0, 0, raw=torch.zeros(2, 3), labels=torch.tensor([0, 2**31])
        ),
        ActivationBatch(RUN, DEVICE, 0, 0, 0, raw=torch.tensor([[float("nan")]])),
        ActivationBatch(RUN, DEVICE, 0, 0, 0, raw=torch.zeros(1, 1, 1, 1, 1, 1, 1, 1, 1)),
    ]
    for batch in cases:
        with pytest.raises(WireError):
            encode(batch)


def test_wire_error_is_a_hiertrain_error_with_reason() -> None:
    err = WireError("x.", reason="crc")
    assert isinstance(err, HiertrainError) and err.reason == "crc"
    assert WireError("x.").reason == "malformed"


# ----------------------------------------------------------------- version 2: packing, deflate

# Written by the version 1 encoder (commit f18a50d): int4 per channel, shape [2, 3], labels 3, 9.
_V1_INT4 = bytes.fromhex(
    "48544142010032000572756e2d37057069342e62050000000000000001000000020000000104010001020200"
    "00000300000003000000cdcccc3d8988883c8988083ef8fffffff8fffffff8ffffff01030000000900000006"
    "000000fdf8070707f877fef695"
)


def _frame_payload_at(data: bytes) -> tuple[int, int]:
    """(offset of payload_len, payload length) of an encoded message."""
    n = len(_split(memoryview(data)).payload)  # payload: the last field before the CRC
    return len(data) - 4 - n - 4, n


def _with_payload(data: bytes, payload: bytes, flags: int | None = None) -> bytes:
    """The same message with another payload (and flags), length and CRC fixed."""
    at, _ = _frame_payload_at(data)
    body = bytearray(data[:at]) + struct.pack("<I", len(payload)) + payload
    if flags is not None:
        body[_O_FLAGS] = flags
    return _fix_crc(bytes(body))


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(6, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def test_version1_message_from_the_old_encoder_still_decodes() -> None:
    batch = decode(_V1_INT4, expected_run_id=RUN)
    q = batch.quantized
    assert q is not None and q.scheme == QuantScheme(bits=4)
    assert q.codes.tolist() == [[-3, -8, 7], [7, 7, -8]]
    assert q.zero_point.tolist() == [-8, -8, -8]
    assert batch.labels is not None and batch.labels.tolist() == [3, 9]
    expected = torch.tensor([[0.5, 0.0, 2.0], [1.5, 0.25, 0.0]])
    assert torch.allclose(codec_decode(_V1_INT4).tensor, expected, atol=float(q.scale.max()) / 2)
    # The new encoder still writes this layout on request, byte for byte.
    again = ActivationBatch(RUN, DEVICE, 5, 1, 2, quantized=q, labels=batch.labels)
    assert encode(again, version=1) == _V1_INT4
    assert len(_V1_INT4) == message_size((2, 3), q.scheme, run_id=RUN, device_id=DEVICE,
                                         version=1)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.scheme_id if s else "float32")
def test_version1_round_trip(scheme: QuantScheme | None) -> None:
    batch = _batch(scheme=scheme)
    data = encode(batch, version=1)
    assert data[4] == 1 and data[_O_FLAGS] == 0
    _assert_same(batch, decode(data))


@pytest.mark.parametrize("bits", [2, 4])
def test_pack_unpack_every_code_value_and_layout(bits: int) -> None:
    s = QuantScheme(bits=bits)
    per_byte = 8 // bits
    for n in range(1, 3 * per_byte + 2):
        codes = (torch.arange(n) % (1 << bits) + s.qmin).to(torch.int8).numpy()
        packed = pack_codes(codes, bits)
        assert len(packed) == -(-n // per_byte)
        assert unpack_codes(packed, bits, n).tolist() == codes.tolist()
    # First element in the low bits, stored as code - qmin; zeros of an affine ReLU code pack to 0.
    assert pack_codes(torch.tensor([s.qmin, s.qmax], dtype=torch.int8).numpy(), bits) == bytes(
        [((1 << bits) - 1) << bits]
    )


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("numel", [1, 7, 30, 31, 1001])
def test_packed_message_sizes_are_exact(bits: int, numel: int) -> None:
    scheme = QuantScheme(bits=bits, granularity="per_tensor")
    batch = _batch(shape=(1, numel), scheme=scheme)
    data = encode(batch)
    packed = -(-numel * bits // 8)  # int4: ceil(n / 2), int2: ceil(n / 4)
    assert plain_payload_size((1, numel), scheme) == packed
    assert _frame_payload_at(data)[1] == packed
    assert data[_O_FLAGS] == FLAG_PACKED
    assert len(data) == message_size((1, numel), scheme, run_id=RUN, device_id=DEVICE)
    assert header_overhead((1, numel), scheme, run_id=RUN, device_id=DEVICE) == len(data) - packed
    _assert_same(batch, decode(data))


def test_int8_and_float32_are_not_packed() -> None:
    assert encode(_batch())[_O_FLAGS] == 0
    assert encode(_batch(scheme=None))[_O_FLAGS] == 0


def _post_relu(shape: tuple[int, ...] = (8, 16, 8, 8), seed: int = 0) -> torch.Tensor:
    """Mostly zeros, like a cut layer after a ReLU with a negative bias."""
    g = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(shape, generator=g) - 1.0)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.scheme_id if s else "float32")
def test_deflate_round_trip_and_bound(scheme: QuantScheme | None) -> None:
    x = _post_relu()
    batch = ActivationBatch(RUN, DEVICE, 1, 2, 3, quantized=quantize(x, scheme) if scheme else None,
                            raw=None if scheme else x, labels=torch.arange(8))
    data = encode(batch, deflate=True)
    assert data[_O_FLAGS] & FLAG_DEFLATE
    assert len(data) < len(encode(batch)) <= message_size(x.shape, scheme, run_id=RUN,
                                                          device_id=DEVICE)
    _assert_same(batch, decode(data))


def test_incompressible_payload_goes_plain() -> None:
    x = torch.rand(4, 64, generator=torch.Generator().manual_seed(5))
    q = quantize(x, QuantScheme(granularity="per_tensor"))  # uniform codes: nothing to squeeze
    batch = ActivationBatch(RUN, DEVICE, 0, 0, 0, quantized=q)
    data = encode(batch, deflate=True)
    assert data[_O_FLAGS] == 0 and data == encode(batch)
    _assert_same(batch, decode(data))


def test_encode_refuses_deflate_in_version1_and_unknown_versions() -> None:
    with pytest.raises(WireError):
        encode(_batch(), deflate=True, version=1)
    with pytest.raises(WireError):
        encode(_batch(), version=3)


def test_rejects_packed_flag_not_matching_bits() -> None:
    assert _reasons(_tamper(encode(_batch()), _O_FLAGS, "<B", FLAG_PACKED)) == "codec"
    assert _reasons(_tamper(encode(_batch(scheme=None)), _O_FLAGS, "<B", FLAG_PACKED)) == "codec"
    int4 = encode(_batch(shape=(2, 3), scheme=QuantScheme(bits=4)))
    assert _reasons(_tamper(int4, _O_FLAGS, "<B", 0)) == "codec"


def test_rejects_wrong_packed_length() -> None:
    data = encode(_batch(shape=(2, 3), scheme=QuantScheme(bits=4)))  # 6 codes -> 3 bytes
    at, n = _frame_payload_at(data)
    payload = data[at + 4 : at + 4 + n]
    assert n == 3
    assert _reasons(_with_payload(data, payload[:-1])) == "payload"
    assert _reasons(_with_payload(data, payload + b"\x00")) == "payload"
    assert _reasons(_with_payload(data, payload * 2)) == "payload"


def test_rejects_nonzero_padding_bits() -> None:
    data = encode(_batch(shape=(1, 5), scheme=QuantScheme(bits=2, granularity="per_tensor")))
    at, n = _frame_payload_at(data)
    payload = bytearray(data[at + 4 : at + 4 + n])
    assert n == 2 and payload[1] >> 2 == 0
    payload[1] |= 0x40  # bits of the (absent) 8th code
    assert _reasons(_with_payload(data, bytes(payload))) == "payload"


_INT4 = QuantScheme(bits=4)


def _deflated(scheme: QuantScheme | None = _INT4) -> tuple[bytes, bytes]:
    """A deflated message and its plain payload."""
    data = encode(ActivationBatch(RUN, DEVICE, 0, 0, 0,
                                  quantized=quantize(_post_relu(), scheme) if scheme else None,
                                  raw=None if scheme else _post_relu(), labels=None),
                  deflate=True)
    at, n = _frame_payload_at(data)
    assert data[_O_FLAGS] & FLAG_DEFLATE
    plain = zlib.decompress(data[at + 4 : at + 4 + n], -15)
    return data, plain


def test_rejects_deflate_garbage() -> None:
    data, plain = _deflated()
    assert _reasons(_with_payload(data, b"\xff" * 20)) == "decompress"
    assert _reasons(_with_payload(data, bytes(range(7, 200, 3)))) == "decompress"
    # A zlib-wrapped stream is not a raw deflate stream.
    assert _reasons(_with_payload(data, zlib.compress(plain))) == "decompress"


def test_rejects_truncated_short_long_and_trailing_deflate_streams() -> None:
    data, plain = _deflated()
    stream = _raw_deflate(plain)
    assert decode(_with_payload(data, stream)).quantized is not None  # the helper is sound
    assert _reasons(_with_payload(data, stream[: len(stream) // 2])) == "decompress"
    assert _reasons(_with_payload(data, _raw_deflate(plain[:-1]))) == "decompress"
    assert _reasons(_with_payload(data, _raw_deflate(plain + b"\x00"))) == "decompress"
    assert _reasons(_with_payload(data, stream + b"\x00")) == "decompress"


def test_rejects_zip_bomb_without_inflating_it() -> None:
    data, plain = _deflated()
    bomb = _raw_deflate(b"\x00" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    assert len(bomb) < len(plain) * 100
    bomb_msg = _with_payload(data, bomb[: len(plain) - 1])
    assert _reasons(bomb_msg) == "decompress"  # inflates past plain size (+1) and stops
    # A stream that claims far more than the message holds, cut to fit the size rule.
    small = _raw_deflate(b"\x00" * (len(plain) * 1000))
    assert len(small) < len(plain)
    assert _reasons(_with_payload(data, small)) == "decompress"


def test_rejects_deflated_payload_not_shorter_than_plain() -> None:
    data, plain = _deflated()
    stored = zlib.compressobj(0, zlib.DEFLATED, -15)  # level 0: "stored" blocks, longer
    longer = stored.compress(plain) + stored.flush()
    assert len(longer) > len(plain)
    assert _reasons(_with_payload(data, longer)) == "payload"


def test_rejects_shape_announcing_more_than_the_inflate_limit() -> None:
    shape = (1 << 13, MAX_INFLATED_BYTES // 4 // (1 << 13) + 1)  # float32: 4 bytes each
    msg = _raw_message(shape, 0)
    body = bytearray(msg[:-4])
    body[_O_FLAGS] = FLAG_DEFLATE
    stream = _raw_deflate(b"\x00" * 16)
    at = len(body) - 4
    body[at:] = struct.pack("<I", len(stream)) + stream
    assert _reasons(_fix_crc(bytes(body))) == "decompress"


def test_rejects_nonfinite_values_inside_a_deflated_float32_payload() -> None:
    data, plain = _deflated(scheme=None)
    bad = bytearray(plain)
    struct.pack_into("<f", bad, 0, float("inf"))
    assert _reasons(_with_payload(data, _raw_deflate(bytes(bad)))) == "nonfinite"


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fuzz_mutations_of_packed_deflated_messages_only_wire_error(bits: int) -> None:
    rng = random.Random(bits)
    data = encode(ActivationBatch(RUN, DEVICE, 0, 0, 0,
                                  quantized=quantize(_post_relu((2, 4, 4, 4)),
                                                     QuantScheme(bits=bits)),
                                  labels=torch.arange(2)), deflate=True)
    assert data[_O_FLAGS] & FLAG_DEFLATE
    for _ in range(150):
        for name, mutate in _mutations(data, rng).items():
            try:
                decode(mutate())
            except WireError as exc:
                assert exc.reason != "malformed", (name, str(exc))
