"""The provisioning protocol shared by ``toolkit flash`` and ``edge-runtime provision``.

Runs on a :class:`toolkit.core.transport.arq.ReliableChannel` (so every chunk already
arrived CRC-checked, in order, exactly once); each message is ``u32 header
length | JSON header | payload``::

    OFFER   flash -> board   files: [{name, size, sha256}], key (manifest sha256)
    STATE   board -> flash   have: {name: bytes already held}   (resume points)
    CHUNK   flash -> board   name, offset, crc32                + file bytes
    DONE    flash -> board   -
    RESULT  board -> flash   ok, error, dest, resumed_bytes

The board keeps what it received in ``<dest>.partial-<key>`` until every file
matches its sha256 (the artifacts' against manifest.json, as ``toolkit export``
wrote it), then renames that directory into place. A flash that is interrupted
and started again with the same artifacts gets a STATE naming how far each file
got and sends only the rest.
"""

from __future__ import annotations

import json
import struct
from typing import Any

from toolkit.core.errors import WireError

OFFER, STATE, CHUNK, DONE, RESULT = "offer", "state", "chunk", "done", "result"
CHUNK_BYTES = 4096
BOARD_FILE = "board.yaml"
_LEN = struct.Struct(">I")


def encode(header: dict[str, Any], payload: bytes = b"") -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    return _LEN.pack(len(head)) + head + payload


def decode(data: bytes) -> tuple[dict[str, Any], bytes]:
    if len(data) < _LEN.size:
        raise WireError("provisioning message shorter than its header", reason="truncated")
    (n,) = _LEN.unpack_from(data)
    try:
        header = json.loads(data[_LEN.size : _LEN.size + n])
    except ValueError as exc:
        raise WireError(f"provisioning header is not JSON: {exc}", reason="header") from None
    if not isinstance(header, dict) or "type" not in header:
        raise WireError("provisioning header has no type", reason="header")
    return header, bytes(data[_LEN.size + n :])
