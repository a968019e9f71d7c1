"""Frames on a byte stream: COBS-stuffed, CRC-32 checked, 0x00-delimited.

A UART gives a stream of bytes that a radio modem or a noisy cable may flip or
drop. COBS (Consistent Overhead Byte Stuffing, the ``cobs`` package) removes
every 0x00 from a frame so that 0x00 can mark frame ends: after any damage the
receiver resynchronises at the next 0x00, losing at most the frames the damage
touched. The CRC-32 over the unstuffed frame catches flipped bits and dropped or
merged bytes; a bad frame is simply discarded and the ARQ layer
(:mod:`toolkit.core.transport.arq`) resends it.

Two frame kinds (big-endian)::

    DATA  u8 kind=1 | u32 session | u16 seq | u8 flags | payload        | u32 crc32
    ACK   u8 kind=2 | u32 session | u32 peer_session | u16 next_expected
                    | u32 sack_bitmap | u16 window                      | u32 crc32

``session`` is a random id the sender picked at start-up: a peer that restarted
shows up as a new session, and both sides start their sequence numbers afresh.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from cobs import cobs

DATA = 1
ACK = 2
FLAG_LAST = 0x01  # last fragment of a message
DELIMITER = b"\x00"

_DATA_HEAD = struct.Struct(">BIHB")
_ACK_BODY = struct.Struct(">BIIHIH")
_CRC = struct.Struct(">I")

#: Bytes a DATA frame adds to its payload before stuffing (head + CRC).
DATA_OVERHEAD = _DATA_HEAD.size + _CRC.size


@dataclass(frozen=True)
class DataFrame:
    session: int
    seq: int
    flags: int
    payload: bytes


@dataclass(frozen=True)
class AckFrame:
    session: int
    peer_session: int
    next_expected: int
    sack: int
    window: int


def _seal(body: bytes) -> bytes:
    return cobs.encode(body + _CRC.pack(zlib.crc32(body))) + DELIMITER


def encode_data(frame: DataFrame) -> bytes:
    """Wire bytes of a DATA frame, delimiter included."""
    head = _DATA_HEAD.pack(DATA, frame.session, frame.seq, frame.flags)
    return _seal(head + frame.payload)


def encode_ack(frame: AckFrame) -> bytes:
    """Wire bytes of an ACK frame, delimiter included."""
    return _seal(_ACK_BODY.pack(ACK, frame.session, frame.peer_session, frame.next_expected,
                                frame.sack, frame.window))


def decode(stuffed: bytes) -> DataFrame | AckFrame | None:
    """Decode one frame (without its delimiter); None when damaged or unknown."""
    try:
        raw = cobs.decode(stuffed)
    except cobs.DecodeError:
        return None
    if len(raw) < 1 + _CRC.size:
        return None
    body, (crc,) = raw[:-_CRC.size], _CRC.unpack(raw[-_CRC.size:])
    if zlib.crc32(body) != crc:
        return None
    if body[0] == DATA and len(body) >= _DATA_HEAD.size:
        _, session, seq, flags = _DATA_HEAD.unpack_from(body)
        return DataFrame(session, seq, flags, body[_DATA_HEAD.size:])
    if body[0] == ACK and len(body) == _ACK_BODY.size:
        _, session, peer, nxt, sack, window = _ACK_BODY.unpack(body)
        return AckFrame(session, peer, nxt, sack, window)
    return None


class FrameSplitter:
    """Cuts an incoming byte stream at delimiters; counts what it had to throw away."""

    def __init__(self, max_frame: int) -> None:
        self._buf = bytearray()
        self._max = max_frame
        self.bad_frames = 0

    def feed(self, data: bytes) -> list[DataFrame | AckFrame]:
        """Frames completed by ``data``, damaged ones dropped (and counted)."""
        self._buf += data
        out: list[DataFrame | AckFrame] = []
        while True:
            end = self._buf.find(0)
            if end < 0:
                if len(self._buf) > self._max:  # a lost delimiter: drop the runaway bytes
                    self._buf.clear()
                    self.bad_frames += 1
                return out
            chunk = bytes(self._buf[:end])
            del self._buf[: end + 1]
            if not chunk:
                continue  # empty: back-to-back delimiters
            frame = decode(chunk)
            if frame is None:
                self.bad_frames += 1
            else:
                out.append(frame)
