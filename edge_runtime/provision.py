"""``edge-runtime provision``: receive artifacts from ``toolkit flash`` over serial.

Chunks go to ``<dest>.partial-<key>`` (kept across interruptions: that is what
makes a flash resumable). When the sender says DONE every file is checked
against the sha256 it was offered with, and the artifacts also against
manifest.json; only then is the partial directory renamed into place (an
existing ``dest`` is first moved to ``<dest>.previous``), so a board never runs
a half-written or tampered artifact set. See :mod:`toolkit.core.protocol.provisioning`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.core.artifacts.manifest import load_manifest
from toolkit.core.errors import HiertrainError, WireError
from toolkit.core.protocol import provisioning as pv
from toolkit.core.transport.serial_link import channel_for, parse_serial_url, serial_url

log = logging.getLogger("edge_runtime")


@dataclass
class ProvisionConfig:
    port: str
    dest: str | Path
    baud: int = 115200
    timeout: float | None = None


def _safe_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise HiertrainError(f"refusing file name {name!r} from the flasher")
    return name


def partial_dir(dest: Path, key: str) -> Path:
    return dest.parent / f".{dest.name}.partial-{key[:16]}"


def install(partial: Path, dest: Path, offer: list[dict[str, Any]]) -> None:
    """Verify every offered file, then rename ``partial`` to ``dest``; HiertrainError if not.

    A file that fails its hash is deleted, so the next flash sends it again.
    """
    for f in offer:
        p = partial / _safe_name(f["name"])
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
        if digest != f["sha256"]:
            p.unlink(missing_ok=True)
            raise HiertrainError(f"{f['name']} does not match its sha256 after transfer; "
                                 "flash again (it will be resent)")
    load_manifest(partial, verify=True)  # artifacts against manifest.json
    if dest.exists():
        previous = dest.parent / f"{dest.name}.previous"
        shutil.rmtree(previous, ignore_errors=True)
        os.rename(dest, previous)
    os.rename(partial, dest)
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _session(ch: Any, dest: Path, header: dict[str, Any]) -> dict[str, Any]:
    offer = header["files"]
    key = str(header["key"])
    partial = partial_dir(dest, key)
    for stale in dest.parent.glob(f".{dest.name}.partial-*"):
        if stale != partial:
            shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir(parents=True, exist_ok=True)
    have = {}
    for f in offer:
        p = partial / _safe_name(f["name"])
        have[f["name"]] = min(p.stat().st_size, int(f["size"])) if p.is_file() else 0
    resumed = sum(have.values())
    log.info("flash offered %d file(s); resuming with %d bytes already here", len(offer), resumed)
    ch.send(pv.encode({"type": pv.STATE, "have": have}))
    handles: dict[str, Any] = {}
    try:
        while True:
            data = ch.recv(timeout=30.0)
            if data is None:
                raise HiertrainError("the flasher went silent for 30 s; waiting for a new flash")
            h, payload = pv.decode(data)
            if h["type"] == pv.OFFER:  # the flasher restarted
                return _session(ch, dest, h)
            if h["type"] == pv.CHUNK:
                name = _safe_name(h["name"])
                if zlib.crc32(payload) != h["crc32"]:
                    raise HiertrainError(f"chunk of {name} at {h['offset']} failed its checksum")
                f = handles.get(name)
                if f is None:
                    f = handles[name] = open(partial / name, "ab")
                f.flush()
                size, offset = (partial / name).stat().st_size, int(h["offset"])
                if offset > size:
                    raise HiertrainError(f"chunk of {name} at {offset} leaves a gap after {size}")
                if offset < size:  # resent from an earlier point: drop what follows it
                    os.truncate(partial / name, offset)
                f.write(payload)
                f.flush()
            elif h["type"] == pv.DONE:
                for f in handles.values():
                    os.fsync(f.fileno())
                    f.close()
                handles.clear()
                try:
                    install(partial, dest, offer)
                except HiertrainError as exc:
                    ch.send(pv.encode({"type": pv.RESULT, "ok": False, "error": str(exc)}))
                    raise
                result = {"type": pv.RESULT, "ok": True, "dest": str(dest),
                          "resumed_bytes": resumed, "files": len(offer)}
                ch.send(pv.encode(result))
                return result
    finally:
        for f in handles.values():
            f.close()


def run_provisioning(cfg: ProvisionConfig) -> dict[str, Any]:
    """Serve flashes until one installs completely (or ``timeout`` passes)."""
    dest = Path(cfg.dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    url = cfg.port if cfg.port.startswith("serial:") else serial_url(cfg.port, cfg.baud)
    port, ch = channel_for(parse_serial_url(url), "provision")
    deadline = None if cfg.timeout is None else time.monotonic() + cfg.timeout
    log.info("provisioning mode on %s: waiting for 'toolkit flash'", url)
    try:
        while deadline is None or time.monotonic() < deadline:
            data = ch.recv(timeout=0.5)
            if data is None:
                continue
            try:
                header, _ = pv.decode(data)
            except WireError:
                continue
            if header["type"] != pv.OFFER:
                continue  # the tail of an interrupted flash
            try:
                result = _session(ch, dest, header)
            except HiertrainError as exc:
                log.warning("flash not installed: %s", exc)
                continue
            ch.flush(timeout=5.0)
            result.pop("type", None)
            return {**result, "channel": ch.stats_dict()}
        raise HiertrainError(f"no complete flash arrived on {url} within {cfg.timeout:.0f} s")
    finally:
        ch.close()
        port.close()
