"""The one versioned binary message format for activation batches (edge <-> cloud).

Every activation batch the edge publishes, and every inference request, is one
message in this format. The values it carries come from
``toolkit.core.protocol.quant``; this module only lays them out, checks them and refuses
anything malformed. Senders and receivers do not call it directly: a
``toolkit.core.protocol.codec`` object encodes (quantize, pack, maybe deflate) and
decodes (check, unpack, dequantize) every message, both ways.

Layout, version 2 (all integers little-endian)::

    field                 type              notes
    --------------------  ----------------  ----------------------------------------------
    magic                 4 bytes           b"HTAB"
    version               u8                FORMAT_VERSION = 2 (1 is still read, see below)
    flags                 u8                bit 0 PACKED, bit 1 DEFLATE; bits 2-7 must be 0
    header_len            u16               bytes from the magic through the shape dims
    run_id                u8 len + utf-8    <= 255 bytes
    device_id             u8 len + utf-8    <= 255 bytes
    seq                   u64               per-device sequence number
    epoch                 u32
    batch_index           u32               batch index within the epoch
    dtype                 u8                1 = int8 codes, 2 = raw float32 (debug/baseline)
    bits                  u8                2, 4 or 8 for int8 codes; 32 for raw
    granularity           u8                0 = per_tensor, 1 = per_channel (0 for raw)
    symmetric             u8                0 or 1 (0 for raw)
    channel_axis          u8                0..7 (0 for raw)
    ndim                  u8                1..8
    shape                 u32 x ndim        includes the batch dim N = shape[0]; each 1..2**24
    --------------------  ----------------  ---- end of header (header_len) ----------------
    n_scale               u32               1 (per tensor) or C (per channel); 0 for raw
    scale                 f32 x n_scale     finite, > 0
    zero_point            i32 x n_scale     in [qmin, qmax]; all 0 when symmetric
    has_labels            u8                0 or 1; inference requests carry no labels
    labels                i32 x N           only when has_labels == 1 (int64 in torch)
    payload_len           u32               bytes of payload as sent (see "payload")
    payload               bytes             the tensor, C order (see "payload")
    crc32                 u32               zlib.crc32 of every byte before it

Payload. Let ``n = prod(shape)``. The *plain* payload is:

    dtype, bits            PACKED  plain payload (``plain_payload_size``)
    ---------------------  ------  -----------------------------------------------------
    int8 codes, bits 8     0       n bytes, one signed code per byte
    int8 codes, bits 2, 4  1       ceil(n * bits / 8) bytes: 8/bits codes per byte, the
                                   unsigned value ``code - qmin`` (0..2**bits-1) of
                                   element i at bit offset ``(i % (8/bits)) * bits`` of
                                   byte ``i // (8/bits)`` (first element in the low bits);
                                   unused high bits of the last byte are 0
    float32                0       4n bytes, little-endian f32

PACKED is set exactly when the codes have fewer than 8 bits (so ``post-ReLU``
zeros, coded ``qmin`` by an affine scheme, pack to 0 bits). If DEFLATE is set,
``payload`` is the plain payload compressed as a raw deflate stream (RFC 1951,
``zlib`` with ``wbits=-15``; the CRC32 already guards the bytes, so no zlib
header or Adler-32), and it must be shorter than the plain payload: a sender
whose data does not compress sends it plain with DEFLATE clear, so
:func:`message_size` is exact without DEFLATE and an upper bound with it. The
receiver inflates at most ``plain_payload_size + 1`` bytes
(``zlib.decompressobj().decompress(data, max_length)``) and requires exactly
the plain size and a complete stream with nothing after it, so a small message
can never make it allocate more than the shape announces; a shape announcing
more than ``MAX_INFLATED_BYTES`` is refused before inflating.

Version 1 is version 2 with ``flags`` always 0 (no packing, no deflate; 2- and
4-bit codes one per byte). This build still decodes it; it always writes
version 2.

``header_len`` covers only the bounded part (at most 574 bytes), so it always
fits its u16 and a logger can read the routing fields without touching the
tensor sections; decoders require it to be exact.

:func:`decode` raises :class:`~toolkit.core.errors.WireError`, and nothing else, on
any malformed input; its ``reason`` attribute is a stable code a receiver can
count drops by. The checks run in this order, so each reason means one thing:

1. ``truncated`` (shorter than the structure it declares), ``magic``,
   ``version`` (a future version may lay out the rest differently, so nothing
   after the version byte is trusted), ``trailing`` (bytes after the CRC).
   Length fields are read before the CRC is checked, so damage to a length
   field also shows up as ``truncated`` or ``trailing``.
2. ``crc``: anything else damaged in transit.
3. Checks on a message that arrived intact, i.e. a sender bug or version
   skew: ``flags`` (an undefined flag bit, or any flag in version 1),
   ``header``, ``utf8``, ``run_id``, ``dtype``, ``shape``, ``scheme``,
   ``codec`` (PACKED not set exactly for 2- and 4-bit codes of a version 2
   message), ``payload`` (a plain payload of the wrong length, a deflated one
   not shorter than the plain size), ``decompress`` (a DEFLATE payload that is
   not a valid raw deflate stream, ends early, inflates to more or fewer bytes
   than the plain size, or has bytes after its end; or a shape whose plain
   payload exceeds ``MAX_INFLATED_BYTES``), ``nonfinite`` (float32 values),
   ``scale``, ``payload`` again (nonzero padding bits of a packed payload,
   2- or 4-bit codes outside their range in a version 1 message), ``labels``.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from toolkit.core.errors import WireError
from toolkit.core.protocol.quant import GRANULARITIES, QuantizedTensor, QuantScheme

MAGIC = b"HTAB"
FORMAT_VERSION = 2
SUPPORTED_VERSIONS: tuple[int, ...] = (1, 2)

FLAG_PACKED = 0x01
"""Codes of fewer than 8 bits are bit-packed (version 2)."""
FLAG_DEFLATE = 0x02
"""The payload is a raw deflate stream of the plain payload (version 2)."""
_KNOWN_FLAGS = {1: 0, 2: FLAG_PACKED | FLAG_DEFLATE}

MAX_INFLATED_BYTES = 1 << 27
"""Largest plain payload (128 MiB) a DEFLATE message may announce; bounds the receiver's memory."""
DEFLATE_LEVEL = 1
"""zlib level the encoder uses. Measured on cut activations (docs/codecs.md): level 6 saves only
2-11 % more bytes than level 1 at 2-5x the CPU time, and the encoding runs in the edge's training
loop while the link time overlaps with it (the outbox)."""
_WBITS = -15  # raw deflate: no zlib header or Adler-32, the message CRC covers the bytes

DTYPE_INT8 = 1
DTYPE_FLOAT32 = 2
_ITEMSIZE = {DTYPE_INT8: 1, DTYPE_FLOAT32: 4}
RAW_BITS = 32

MAX_ID_BYTES = 255
MAX_NDIM = 8
MAX_DIM = 1 << 24
_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1
_I32_MIN, _I32_MAX = -(1 << 31), (1 << 31) - 1

_PREAMBLE = struct.Struct("<4sBBH")  # magic, version, flags, header_len
_COUNTERS = struct.Struct("<QII")  # seq, epoch, batch_index
_SCHEME = struct.Struct("<BBBBBB")  # dtype, bits, granularity, symmetric, channel_axis, ndim
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")

MIN_MESSAGE_SIZE = (
    _PREAMBLE.size + 1 + 1 + _COUNTERS.size + _SCHEME.size + _U32.size + 1 + _U32.size + 4
)
"""Smallest byte string that could be a message (empty ids, ndim 0, nothing else)."""


@dataclass(eq=False)
class ActivationBatch:
    """One activation batch (or inference request) as it travels on the wire.

    The layer below the codec: senders and receivers use
    ``toolkit.core.protocol.codec`` (``Codec.encode`` / ``decode``), which builds
    and reads these. Exactly one of ``quantized`` (the normal path) and ``raw`` (float32, for
    debugging and float baselines) is set. ``labels`` is an int64 tensor of
    shape ``[N]`` for training batches and ``None`` for inference requests.
    """

    run_id: str
    device_id: str
    seq: int
    epoch: int
    batch_index: int
    quantized: QuantizedTensor | None = None
    raw: torch.Tensor | None = None
    labels: torch.Tensor | None = None


# --------------------------------------------------------------------------- sizes


def header_size(ndim: int, *, run_id: str = "", device_id: str = "") -> int:
    """Bytes from the magic through the shape dims: the value of ``header_len``."""
    return (
        _PREAMBLE.size
        + 1
        + len(run_id.encode("utf-8"))
        + 1
        + len(device_id.encode("utf-8"))
        + _COUNTERS.size
        + _SCHEME.size
        + 4 * ndim
    )


def plain_payload_size(
    shape: tuple[int, ...] | list[int] | torch.Size,
    scheme: QuantScheme | None,
    *,
    version: int = FORMAT_VERSION,
) -> int:
    """Bytes of the payload before any deflate: packed codes, int8 codes or float32 values."""
    n = math.prod(int(d) for d in shape)
    if scheme is None:
        return 4 * n
    if version >= 2 and scheme.bits < 8:
        return -(-n * scheme.bits // 8)
    return n


def message_size(
    shape: tuple[int, ...] | list[int] | torch.Size,
    scheme: QuantScheme | None,
    *,
    run_id: str = "",
    device_id: str = "",
    has_labels: bool = True,
    version: int = FORMAT_VERSION,
) -> int:
    """Encoded size of a message; ``scheme=None`` means raw float32.

    Exact for messages without DEFLATE (2- and 4-bit codes are packed in
    version 2), and an upper bound for deflated ones, whose payload is by
    construction shorter than the plain one. Used for bytes-per-sample
    reporting and planning without encoding anything.
    """
    shape = tuple(int(d) for d in shape)
    if scheme is None:
        n_scale = 0
    else:
        n_scale = shape[scheme.channel_axis] if scheme.granularity == "per_channel" else 1
    n = shape[0] if has_labels else 0
    return (
        header_size(len(shape), run_id=run_id, device_id=device_id)
        + _U32.size
        + 8 * n_scale
        + 1
        + 4 * n
        + _U32.size
        + plain_payload_size(shape, scheme, version=version)
        + 4
    )


def header_overhead(
    shape: tuple[int, ...] | list[int] | torch.Size,
    scheme: QuantScheme | None,
    *,
    run_id: str = "",
    device_id: str = "",
    has_labels: bool = True,
    version: int = FORMAT_VERSION,
) -> int:
    """Bytes of a message that are not activation payload (header, scales, labels, CRC).

    Exact whatever the payload's coding: deflate changes only the payload.
    """
    total = message_size(shape, scheme, run_id=run_id, device_id=device_id,
                         has_labels=has_labels, version=version)
    return total - plain_payload_size(shape, scheme, version=version)


# --------------------------------------------------------------------------- bit packing


def pack_codes(codes: np.ndarray, bits: int) -> bytes:
    """Pack signed ``bits``-bit codes (2 or 4) as ``code - qmin``, low bits first."""
    per_byte = 8 // bits
    qmin = -(1 << (bits - 1))
    flat = codes.reshape(-1)
    u = (flat.astype(np.int8, copy=False) - np.int8(qmin)).view(np.uint8)  # 0..2**bits-1
    pad = -len(u) % per_byte
    if pad:
        u = np.concatenate([u, np.zeros(pad, dtype=np.uint8)])
    out = u[0::per_byte].copy()
    for j in range(1, per_byte):
        out |= u[j::per_byte] << np.uint8(j * bits)
    return out.tobytes()


def unpack_codes(data: bytes | memoryview, bits: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``n`` int8 codes; ``WireError("payload")`` on bad padding."""
    per_byte = 8 // bits
    if len(data) != -(-n * bits // 8):
        raise WireError(
            f"packed payload is {len(data)} bytes but {n} {bits}-bit codes need "
            f"{-(-n * bits // 8)}.",
            reason="payload",
        )
    raw = np.frombuffer(data, dtype=np.uint8)
    mask = np.uint8((1 << bits) - 1)
    u = np.empty(len(raw) * per_byte, dtype=np.uint8)
    for j in range(per_byte):
        u[j::per_byte] = (raw >> np.uint8(j * bits)) & mask
    if u[n:].any():
        raise WireError("unused bits of the last packed byte must be 0.", reason="payload")
    codes = u[:n].view(np.int8)
    codes += np.int8(-(1 << (bits - 1)))  # in place: u is ours, 0..2**bits-1 -> qmin..qmax
    return codes


def _inflate(payload: memoryview, plain_size: int) -> bytes:
    """Inflate a raw deflate stream to exactly ``plain_size`` bytes, never more than one extra."""
    d = zlib.decompressobj(wbits=_WBITS)
    try:
        out = d.decompress(payload, plain_size + 1)
    except zlib.error as exc:
        raise WireError(f"payload is not a valid deflate stream: {exc}.",
                        reason="decompress") from None
    if len(out) != plain_size:
        raise WireError(
            f"deflated payload inflates to {'more than ' if len(out) > plain_size else ''}"
            f"{len(out)} bytes, the shape needs {plain_size}.",
            reason="decompress",
        )
    if not d.eof:
        raise WireError("deflated payload ends before its stream does.", reason="decompress")
    if d.unused_data or d.unconsumed_tail:
        raise WireError("bytes follow the end of the deflate stream.", reason="decompress")
    return out


# --------------------------------------------------------------------------- encode


def _check_uint(name: str, value: int, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise WireError(f"{name} must be an integer in 0..{limit}, got {value!r}.", reason="field")
    return value


def _id_bytes(name: str, value: str) -> bytes:
    if not isinstance(value, str):
        raise WireError(f"{name} must be a string, got {type(value).__name__}.", reason="field")
    raw = value.encode("utf-8")
    if len(raw) > MAX_ID_BYTES:
        raise WireError(
            f"{name} is {len(raw)} bytes in utf-8; at most {MAX_ID_BYTES} fit.", reason="field"
        )
    return raw


def _check_shape(shape: tuple[int, ...]) -> None:
    if not 1 <= len(shape) <= MAX_NDIM:
        raise WireError(
            f"an activation must have 1..{MAX_NDIM} dims, got shape {list(shape)}.", reason="shape"
        )
    if any(not 1 <= d <= MAX_DIM for d in shape):
        raise WireError(
            f"every dim must be in 1..{MAX_DIM}, got shape {list(shape)}.", reason="shape"
        )


def encode(batch: ActivationBatch, *, deflate: bool = False,
           version: int = FORMAT_VERSION) -> bytes:
    """Serialise a batch; raises :class:`WireError` if it cannot be represented.

    2- and 4-bit codes are bit-packed. ``deflate=True`` deflates the payload
    when that makes it shorter (otherwise it goes plain, flag clear).
    ``version=1`` writes the old layout for receivers not yet upgraded (no
    packing, no deflate).
    """
    if version not in SUPPORTED_VERSIONS:
        raise WireError(f"cannot write wire version {version}; this build writes "
                        f"{list(SUPPORTED_VERSIONS)}.", reason="version")
    if deflate and version < 2:
        raise WireError("deflate needs wire format version 2.", reason="codec")
    flags = 0
    run_id = _id_bytes("run_id", batch.run_id)
    device_id = _id_bytes("device_id", batch.device_id)
    _check_uint("seq", batch.seq, _U64_MAX)
    _check_uint("epoch", batch.epoch, _U32_MAX)
    _check_uint("batch_index", batch.batch_index, _U32_MAX)

    if (batch.quantized is None) == (batch.raw is None):
        raise WireError(
            "a batch must carry exactly one of 'quantized' and 'raw'.", reason="payload"
        )
    if batch.quantized is not None:
        q = batch.quantized
        scheme = q.scheme
        if q.codes.dtype != torch.int8:
            raise WireError(f"codes must be int8, got {q.codes.dtype}.", reason="dtype")
        shape = tuple(q.codes.shape)
        _check_shape(shape)
        if scheme.granularity == "per_channel" and scheme.channel_axis >= len(shape):
            raise WireError(
                f"channel_axis {scheme.channel_axis} is out of range for shape {list(shape)}.",
                reason="scheme",
            )
        n_scale = shape[scheme.channel_axis] if scheme.granularity == "per_channel" else 1
        if q.scale.numel() != n_scale or q.zero_point.numel() != n_scale:
            raise WireError(
                f"expected {n_scale} scale/zero-point entries, got "
                f"{q.scale.numel()}/{q.zero_point.numel()}.",
                reason="scale",
            )
        scheme_bytes = _SCHEME.pack(
            DTYPE_INT8,
            scheme.bits,
            GRANULARITIES.index(scheme.granularity),
            int(scheme.symmetric),
            scheme.channel_axis,
            len(shape),
        )
        params = (
            _U32.pack(n_scale)
            + q.scale.detach().cpu().to(torch.float32).numpy().astype("<f4").tobytes()
            + q.zero_point.detach().cpu().to(torch.int32).numpy().astype("<i4").tobytes()
        )
        codes = q.codes.detach().cpu().contiguous().numpy()
        if version >= 2 and scheme.bits < 8:
            if codes.size and (codes.min() < scheme.qmin or codes.max() > scheme.qmax):
                raise WireError(
                    f"codes fall outside [{scheme.qmin}, {scheme.qmax}] for "
                    f"{scheme.bits}-bit quantization.",
                    reason="payload",
                )
            payload = pack_codes(codes, scheme.bits)
            flags |= FLAG_PACKED
        else:
            payload = codes.tobytes()
    else:
        assert batch.raw is not None
        if not batch.raw.is_floating_point():
            raise WireError(
                f"raw activations must be floating point, got {batch.raw.dtype}.", reason="dtype"
            )
        values = batch.raw.detach().cpu().to(torch.float32).contiguous()
        shape = tuple(values.shape)
        _check_shape(shape)
        if not bool(torch.isfinite(values).all()):
            raise WireError(
                "activation contains NaN or Inf; refusing to encode a diverged training step.",
                reason="nonfinite",
            )
        scheme_bytes = _SCHEME.pack(DTYPE_FLOAT32, RAW_BITS, 0, 0, 0, len(shape))
        params = _U32.pack(0)
        payload = values.numpy().astype("<f4").tobytes()

    if batch.labels is None:
        labels = _U8.pack(0)
    else:
        lab = batch.labels.detach().cpu().reshape(-1)
        if batch.labels.ndim != 1 or lab.numel() != shape[0]:
            raise WireError(
                f"labels must have shape [{shape[0]}] (one per sample), got "
                f"{list(batch.labels.shape)}.",
                reason="labels",
            )
        if lab.is_floating_point() or lab.is_complex() or lab.dtype == torch.bool:
            raise WireError(f"labels must be integers, got {lab.dtype}.", reason="labels")
        lab64 = lab.to(torch.int64)
        if bool((lab64 < _I32_MIN).any() or (lab64 > _I32_MAX).any()):
            raise WireError("labels must fit in int32.", reason="labels")
        labels = _U8.pack(1) + lab64.numpy().astype("<i4").tobytes()

    if deflate:
        c = zlib.compressobj(DEFLATE_LEVEL, zlib.DEFLATED, _WBITS)
        packed = c.compress(payload) + c.flush()
        if len(packed) < len(payload):
            payload = packed
            flags |= FLAG_DEFLATE
    header_len = header_size(len(shape), run_id=batch.run_id, device_id=batch.device_id)
    body = b"".join(
        (
            _PREAMBLE.pack(MAGIC, version, flags, header_len),
            _U8.pack(len(run_id)),
            run_id,
            _U8.pack(len(device_id)),
            device_id,
            _COUNTERS.pack(batch.seq, batch.epoch, batch.batch_index),
            scheme_bytes,
            struct.pack(f"<{len(shape)}I", *shape),
            params,
            labels,
            _U32.pack(len(payload)),
            payload,
        )
    )
    return body + _U32.pack(zlib.crc32(body))


# --------------------------------------------------------------------------- decode


class _Reader:
    """Bounds-checked cursor; running off the end is ``truncated``, never IndexError."""

    def __init__(self, data: memoryview) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> memoryview:
        if n > len(self.data) - self.pos:
            raise WireError(
                f"message is truncated: {len(self.data)} bytes, but its fields "
                f"need at least {self.pos + n}.",
                reason="truncated",
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, s: struct.Struct) -> tuple[int, ...]:
        return s.unpack(self.take(s.size))

    def u8(self) -> int:
        return self.unpack(_U8)[0]

    def u32(self) -> int:
        return self.unpack(_U32)[0]


@dataclass
class _Frame:
    """The fields of a message, sliced but not yet validated."""

    version: int
    flags: int
    header_len: int
    header_end: int
    run_id: memoryview
    device_id: memoryview
    seq: int
    epoch: int
    batch_index: int
    dtype: int
    bits: int
    granularity: int
    symmetric: int
    channel_axis: int
    shape: tuple[int, ...]
    n_scale: int
    scale: memoryview
    zero_point: memoryview
    has_labels: int
    labels: memoryview
    payload: memoryview


def _split(data: memoryview) -> _Frame:
    """Slice a message into fields, checking only magic, version and lengths."""
    if len(data) >= 4 and bytes(data[:4]) != MAGIC:
        raise WireError(
            f"not an activation message: magic is {bytes(data[:4])!r}, expected {MAGIC!r}.",
            reason="magic",
        )
    if len(data) >= 5 and data[4] not in SUPPORTED_VERSIONS:
        raise WireError(
            f"unsupported wire format version {data[4]}; this build reads "
            f"version(s) {list(SUPPORTED_VERSIONS)}.",
            reason="version",
        )
    if len(data) < MIN_MESSAGE_SIZE:
        raise WireError(
            f"message is truncated: {len(data)} bytes, the smallest possible "
            f"message is {MIN_MESSAGE_SIZE}.",
            reason="truncated",
        )
    r = _Reader(data)
    _, version, flags, header_len = r.unpack(_PREAMBLE)
    run_id = r.take(r.u8())
    device_id = r.take(r.u8())
    seq, epoch, batch_index = r.unpack(_COUNTERS)
    dtype, bits, granularity, symmetric, channel_axis, ndim = r.unpack(_SCHEME)
    shape = struct.unpack(f"<{ndim}I", r.take(4 * ndim))
    header_end = r.pos
    n_scale = r.u32()
    scale = r.take(4 * n_scale)
    zero_point = r.take(4 * n_scale)
    has_labels = r.u8()
    labels = r.take(4 * shape[0] if has_labels and shape else 0)
    payload = r.take(r.u32())
    r.take(4)  # crc
    if r.pos != len(data):
        raise WireError(f"{len(data) - r.pos} trailing byte(s) after the CRC.", reason="trailing")
    return _Frame(
        version,
        flags,
        header_len,
        header_end,
        run_id,
        device_id,
        seq,
        epoch,
        batch_index,
        dtype,
        bits,
        granularity,
        symmetric,
        channel_axis,
        shape,
        n_scale,
        scale,
        zero_point,
        has_labels,
        labels,
        payload,
    )


def _text(name: str, raw: memoryview) -> str:
    try:
        return bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(f"{name} is not valid utf-8.", reason="utf8") from None


def _decode_tensor(f: _Frame) -> tuple[QuantizedTensor | None, torch.Tensor | None]:
    """Validate the scheme, parameters and payload of an intact frame."""
    if f.dtype not in _ITEMSIZE:
        raise WireError(
            f"unknown dtype code {f.dtype}; expected {DTYPE_INT8} (int8) or "
            f"{DTYPE_FLOAT32} (float32).",
            reason="dtype",
        )
    _check_shape(f.shape)
    numel = math.prod(f.shape)

    scheme: QuantScheme | None = None
    if f.dtype == DTYPE_FLOAT32:
        if (f.bits, f.granularity, f.symmetric, f.channel_axis, f.n_scale) != (
            RAW_BITS,
            0,
            0,
            0,
            0,
        ):
            raise WireError(
                "a float32 message must have bits 32, no scheme fields and no scales.",
                reason="scheme",
            )
    else:
        if f.granularity >= len(GRANULARITIES) or f.symmetric > 1:
            raise WireError(
                f"invalid scheme fields: granularity {f.granularity}, symmetric {f.symmetric}.",
                reason="scheme",
            )
        scheme = QuantScheme(
            bits=f.bits,
            granularity=GRANULARITIES[f.granularity],
            symmetric=bool(f.symmetric),
            channel_axis=f.channel_axis,
        )
        if scheme.granularity == "per_channel" and scheme.channel_axis >= len(f.shape):
            raise WireError(
                f"channel_axis {scheme.channel_axis} is out of range for shape {list(f.shape)}.",
                reason="scheme",
            )

    packed = f.version >= 2 and scheme is not None and scheme.bits < 8
    if bool(f.flags & FLAG_PACKED) != packed:
        raise WireError(
            f"the PACKED flag must be set exactly for 2- and 4-bit codes; flags "
            f"{f.flags:#04x} with {'float32' if scheme is None else f'{scheme.bits}-bit codes'}.",
            reason="codec",
        )
    plain_size = plain_payload_size(f.shape, scheme, version=f.version)
    payload: bytes | memoryview = f.payload
    if f.flags & FLAG_DEFLATE:
        if plain_size > MAX_INFLATED_BYTES:
            raise WireError(
                f"the shape announces a {plain_size}-byte payload, over the "
                f"{MAX_INFLATED_BYTES}-byte limit for deflated messages.",
                reason="decompress",
            )
        if len(payload) >= plain_size:
            raise WireError(
                f"deflated payload is {len(payload)} bytes, not shorter than the "
                f"{plain_size} bytes it stands for; a sender sends such data plain.",
                reason="payload",
            )
        payload = _inflate(payload, plain_size)
    elif len(payload) != plain_size:
        raise WireError(
            f"payload is {len(payload)} bytes but shape {list(f.shape)} needs {plain_size}.",
            reason="payload",
        )

    if scheme is None:
        values = np.frombuffer(payload, dtype="<f4").astype(np.float32).reshape(f.shape)
        if not np.isfinite(values).all():
            raise WireError("float32 activation contains NaN or Inf.", reason="nonfinite")
        return None, torch.from_numpy(values)

    n_expected = f.shape[scheme.channel_axis] if scheme.granularity == "per_channel" else 1
    if f.n_scale != n_expected:
        raise WireError(
            f"{f.n_scale} scale entries, expected {n_expected} for "
            f"{scheme.scheme_id} and shape {list(f.shape)}.",
            reason="scale",
        )
    scale = np.frombuffer(f.scale, dtype="<f4").astype(np.float32)
    zero_point = np.frombuffer(f.zero_point, dtype="<i4").astype(np.int32)
    if not (np.isfinite(scale).all() and (scale > 0).all()):
        raise WireError("every scale must be finite and positive.", reason="scale")
    if scheme.symmetric and zero_point.any():
        raise WireError("a symmetric scheme must have all-zero zero points.", reason="scale")
    if ((zero_point < scheme.qmin) | (zero_point > scheme.qmax)).any():
        raise WireError(f"zero points must lie in [{scheme.qmin}, {scheme.qmax}].", reason="scale")
    if packed:
        codes = unpack_codes(payload, scheme.bits, numel).reshape(f.shape)
    else:
        codes = np.frombuffer(payload, dtype=np.int8).reshape(f.shape).copy()
    # Packed codes are in range by construction; one-per-byte (version 1) ones may not be.
    if not packed and scheme.bits < 8 and (codes.min() < scheme.qmin or codes.max() > scheme.qmax):
        raise WireError(
            f"codes fall outside [{scheme.qmin}, {scheme.qmax}] for "
            f"{scheme.bits}-bit quantization.",
            reason="payload",
        )
    q = QuantizedTensor(
        codes=torch.from_numpy(codes),
        scale=torch.from_numpy(scale),
        zero_point=torch.from_numpy(zero_point),
        scheme=scheme,
    )
    return q, None


def decode(data: bytes, *, expected_run_id: str | None = None) -> ActivationBatch:
    """Parse and check one message; any problem raises :class:`WireError` with a ``reason``.

    ``expected_run_id`` drops messages from another run sharing the broker (a
    stale edge device still publishing an old run) with reason ``run_id``.
    """
    try:
        return _decode(data, expected_run_id)
    except WireError:
        raise
    except Exception as exc:  # the contract is "only WireError", even for our own bugs
        raise WireError(
            f"malformed message ({type(exc).__name__}: {exc}).", reason="malformed"
        ) from exc


def _decode(data: bytes, expected_run_id: str | None) -> ActivationBatch:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"a message must be bytes, got {type(data).__name__}.", reason="malformed")
    view = memoryview(data).cast("B")
    f = _split(view)
    body_len = len(view) - 4
    (crc,) = _U32.unpack(view[body_len:])
    if zlib.crc32(view[:body_len]) != crc:
        raise WireError("CRC mismatch: the message was damaged in transit.", reason="crc")

    if f.flags & ~_KNOWN_FLAGS[f.version]:
        raise WireError(
            f"undefined flag bits {f.flags & ~_KNOWN_FLAGS[f.version]:#04x} in a version "
            f"{f.version} message (flags {f.flags:#04x}).",
            reason="flags",
        )
    if f.header_len != f.header_end:
        raise WireError(
            f"header_len says {f.header_len} bytes but the header is {f.header_end}.",
            reason="header",
        )
    run_id = _text("run_id", f.run_id)
    device_id = _text("device_id", f.device_id)
    if expected_run_id is not None and run_id != expected_run_id:
        raise WireError(
            f"message belongs to run {run_id!r}, expected {expected_run_id!r}.", reason="run_id"
        )
    quantized, raw = _decode_tensor(f)
    if f.has_labels > 1:
        raise WireError(f"has_labels must be 0 or 1, got {f.has_labels}.", reason="labels")
    labels = None
    if f.has_labels:
        labels = torch.from_numpy(np.frombuffer(f.labels, dtype="<i4").astype(np.int64))
        if labels.numel() != f.shape[0]:  # unreachable by construction; kept as a guard
            raise WireError(
                f"{labels.numel()} labels for a batch of {f.shape[0]}.", reason="labels"
            )
    return ActivationBatch(
        run_id=run_id,
        device_id=device_id,
        seq=f.seq,
        epoch=f.epoch,
        batch_index=f.batch_index,
        quantized=quantized,
        raw=raw,
        labels=labels,
    )
