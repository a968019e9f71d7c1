"""``toolkit flash``: push exported artifacts and a board profile to a board over serial.

The board runs ``edge-runtime provision`` (:mod:`edge_runtime.provision`). The
artifacts are hash-checked here first (a corrupt export is never sent), offered
with their sizes and sha256, and sent in checksummed chunks from wherever the
board says it already got to, so re-running an interrupted flash resumes it.
See :mod:`toolkit.core.protocol.provisioning` for the protocol.
"""

from __future__ import annotations

import hashlib
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.core.artifacts.manifest import MANIFEST_NAME, load_manifest, sha256_file
from toolkit.core.errors import HiertrainError
from toolkit.core.protocol import provisioning as pv
from toolkit.core.transport.serial_link import channel_for, parse_serial_url, serial_url


@dataclass
class FlashConfig:
    port: str  # /dev/ttyACM0 or a serial:// URL
    artifacts: Path
    baud: int = 115200
    board: str | None = None  # profile name or .yaml path sent as board.yaml
    timeout: float = 600.0


def _files(cfg: FlashConfig) -> list[tuple[str, bytes]]:
    manifest = load_manifest(cfg.artifacts)  # raises on any hash mismatch
    names = [MANIFEST_NAME, *manifest.data["artifacts"]]
    files = [(n, (Path(cfg.artifacts) / n).read_bytes()) for n in names]
    if cfg.board:
        from toolkit.core.artifacts.boards import configs_dir, load_board

        profile = load_board(cfg.board)  # validates it
        path = Path(cfg.board)
        if path.suffix not in (".yaml", ".yml"):
            path = configs_dir() / f"{profile.name}.yaml"
        files.append((pv.BOARD_FILE, path.read_bytes()))
    return files


def _expect(ch: Any, kind: str, deadline: float) -> dict[str, Any]:
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise HiertrainError(f"the board did not answer ({kind}) in time: is "
                                 "'edge-runtime provision' running on the other end?")
        data = ch.recv(timeout=min(left, 0.5))
        if data is None:
            continue
        header, _ = pv.decode(data)
        if header["type"] == kind:
            return header


def flash(cfg: FlashConfig) -> dict[str, Any]:
    """Send everything; returns the board's RESULT plus what was sent."""
    files = _files(cfg)
    url = cfg.port if cfg.port.startswith("serial:") else serial_url(cfg.port, cfg.baud)
    port, ch = channel_for(parse_serial_url(url), "flash")
    t0 = time.monotonic()
    deadline = t0 + cfg.timeout
    try:
        offer = [{"name": n, "size": len(b), "sha256": hashlib.sha256(b).hexdigest()}
                 for n, b in files]
        key = sha256_file(Path(cfg.artifacts) / MANIFEST_NAME)
        ch.send(pv.encode({"type": pv.OFFER, "files": offer, "key": key}))
        have = _expect(ch, pv.STATE, deadline).get("have", {})
        sent = skipped = 0
        for name, blob in files:
            start = int(have.get(name, 0))
            if not 0 <= start <= len(blob):
                start = 0
            skipped += start
            for off in range(start, len(blob), pv.CHUNK_BYTES):
                chunk = blob[off : off + pv.CHUNK_BYTES]
                ch.send(pv.encode({"type": pv.CHUNK, "name": name, "offset": off,
                                   "crc32": zlib.crc32(chunk)}, chunk),
                        timeout=max(1.0, deadline - time.monotonic()))
                sent += len(chunk)
        ch.send(pv.encode({"type": pv.DONE}))
        result = _expect(ch, pv.RESULT, deadline)
        if not result.get("ok"):
            raise HiertrainError(f"the board refused the artifacts: {result.get('error')}")
        return {**result, "bytes_sent": sent, "bytes_skipped": skipped,
                "files": len(files), "wall_s": round(time.monotonic() - t0, 3),
                "channel": ch.stats_dict()}
    finally:
        ch.flush(timeout=2.0)
        ch.close()
        port.close()
