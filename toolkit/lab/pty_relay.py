"""Two pseudo-terminals joined by a relay that can damage the bytes it carries.

For tests, benchmarks and trying the serial link without hardware: each side
opens its own pty (``relay.ports == ("/dev/pts/N", "/dev/pts/M")``) with pyserial
exactly as it would open ``/dev/ttyUSB0``; a thread copies bytes between the two
pty masters and flips one bit of a byte with probability ``corrupt`` and drops
a byte with probability ``drop``, the way a noisy radio link would. A pty has no
baud rate: it moves bytes as fast as the CPU allows, so the channel paces its
writes at the configured baud (see :mod:`toolkit.core.transport.arq`).
"""

from __future__ import annotations

import os
import random
import select
import threading
import tty
from dataclasses import dataclass, field


@dataclass
class RelayStats:
    bytes: list[int] = field(default_factory=lambda: [0, 0])  # a->b, b->a
    flipped: int = 0
    dropped: int = 0


class PtyRelay:
    """``with PtyRelay(corrupt=1e-3) as r: open r.ports[0] and r.ports[1]``."""

    def __init__(self, *, corrupt: float = 0.0, drop: float = 0.0, seed: int = 0,
                 corrupt_at: tuple[int, ...] = ()) -> None:
        """``corrupt_at``: offsets in the first->second stream whose byte is flipped for sure."""
        self.corrupt = corrupt
        self.drop = drop
        self.corrupt_at = set(corrupt_at)
        self.stats = RelayStats()
        self._rng = random.Random(seed)
        self._fds: list[int] = []
        self._masters: list[int] = []
        names = []
        for _ in range(2):
            master, slave = os.openpty()
            tty.setraw(slave)  # no echo, no line editing, 8-bit clean until pyserial opens it
            self._masters.append(master)
            self._fds += [master, slave]  # keep the slave open: a master reads EIO without one
            names.append(os.ttyname(slave))
        self.ports: tuple[str, str] = (names[0], names[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pty-relay", daemon=True)
        self._thread.start()

    def _damage(self, data: bytes, offset: int | None) -> bytes:
        hit = offset is not None and any(offset <= o < offset + len(data) for o in self.corrupt_at)
        if not (self.corrupt or self.drop or hit):
            return data
        out = bytearray()
        for i, b in enumerate(data):
            if offset is not None and offset + i in self.corrupt_at:
                out.append(b ^ 0x10)
                self.stats.flipped += 1
                continue
            r = self._rng.random()
            if r < self.drop:
                self.stats.dropped += 1
                continue
            if r < self.drop + self.corrupt:
                b ^= 1 << self._rng.randrange(8)
                self.stats.flipped += 1
            out.append(b)
        return bytes(out)

    def _run(self) -> None:
        a, b = self._masters
        peer = {a: b, b: a}
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([a, b], [], [], 0.05)
            except (OSError, ValueError):
                return
            for fd in ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:
                    continue
                side = 0 if fd == a else 1
                offset = self.stats.bytes[0] if side == 0 else None
                self.stats.bytes[side] += len(data)
                data = self._damage(data, offset)
                view = memoryview(data)
                while view and not self._stop.is_set():
                    try:
                        n = os.write(peer[fd], view)
                    except BlockingIOError:
                        continue
                    except OSError:
                        break
                    view = view[n:]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> PtyRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
