"""Run hiertrain's roles as separate OS processes and watch them, for the demo and the benchmark.

The demo and ``toolkit bench`` only launch and watch: the work happens in the
``cloud_trainer`` and ``edge_runtime`` processes, reached through their command
lines and the broker, never by import. Every wait here is bounded, a process
that dies is reported with the tail of its log, and everything started is
stopped on the way out (the broker last, because it was started first).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from toolkit.core.errors import HiertrainError, WireError
from toolkit.core.protocol import topics
from toolkit.core.protocol.messages import CLOUD_DEVICE, decode_status


def tail(log: Path, n: int = 15) -> str:
    """The last ``n`` lines of a log, for error messages; empty when unreadable."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class ProcessGroup:
    """Named child processes (``python -m <module> ...``), each logging to ``<log_dir>/<name>.log``.

    Used as a context manager: leaving it terminates whatever still runs, in
    reverse start order, and closes the log files.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self._files: list = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen:
        if name in self.procs:
            raise ValueError(f"process {name!r} already started")
        log = self.log_dir / f"{name}.log"
        f = open(log, "w")  # noqa: SIM115 - closed in close()
        self._files.append(f)
        p = subprocess.Popen([sys.executable, "-m", *args], stdout=f, stderr=subprocess.STDOUT,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.procs[name] = p
        self.logs[name] = log
        return p

    def failure(self, name: str) -> HiertrainError:
        p = self.procs[name]
        return HiertrainError(f"{name} exited with {p.returncode} (log {self.logs[name]}):\n"
                              f"{tail(self.logs[name])}")

    def check(self, must_live: tuple[str, ...] = ()) -> None:
        """Raise for a process that failed, or that ended although it must keep running."""
        for name, p in self.procs.items():
            rc = p.poll()
            if rc is not None and (rc != 0 or name in must_live):
                raise self.failure(name)

    def wait_until(self, cond: Callable[[], bool], timeout: float, what: str,
                   must_live: tuple[str, ...] = ()) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            self.check(must_live)
            if time.monotonic() > deadline:
                raise HiertrainError(f"{what} within {timeout:.0f} s")
            time.sleep(0.1)

    def wait_exit(self, names: list[str], timeout: float,
                  must_live: tuple[str, ...] = ()) -> None:
        """Wait for ``names`` to exit successfully; raise on the first failure or the deadline."""
        self.wait_until(lambda: all(self.procs[n].poll() is not None for n in names), timeout,
                        f"{', '.join(names)} did not finish", must_live)
        self.check(must_live)

    def running(self, names: list[str] | None = None) -> bool:
        return any(self.procs[n].poll() is None for n in (names or list(self.procs)))

    def close(self) -> None:
        for p in reversed(list(self.procs.values())):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        for f in self._files:
            f.close()
        self._files.clear()

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_embedded_broker(group: ProcessGroup, name: str = "broker") -> str:
    """Start ``toolkit broker`` (amqtt) as a process on a free loopback port; returns its URL."""
    from toolkit.lab.broker import free_port, wait_for_port

    port = free_port()
    group.start(name, ["toolkit", "broker", "--port", str(port)])
    if not wait_for_port("127.0.0.1", port, 30):
        raise HiertrainError(f"the embedded broker did not start:\n{tail(group.logs[name])}")
    return f"mqtt://127.0.0.1:{port}"


class StatusWatcher:
    """Follows a run's retained status messages (cloud and edges) to drive progress output."""

    def __init__(self, url: str, run_id: str) -> None:
        from toolkit.core.transport import open_link

        self.cloud: dict = {}
        self.edges: dict[str, dict] = {}
        self.lock = threading.Lock()
        self.link = open_link(url, f"watch-{os.getpid()}-{run_id}"[:64])
        self.link.subscribe(topics.status_wildcard(run_id), self._on_status)
        self.link.connect(timeout=30)

    def _on_status(self, topic: str, payload: bytes, _props: dict) -> None:
        try:
            _, device, _ = topics.parse_topic(topic)
            s = decode_status(payload)
        except WireError:
            return
        entry = {"state": s.state, "epoch": s.epoch, "batches": s.batches_published, **s.extra}
        with self.lock:
            if device == CLOUD_DEVICE:
                self.cloud = entry
            else:
                self.edges[device] = entry

    def cloud_state(self) -> str | None:
        with self.lock:
            return self.cloud.get("state")

    def close(self) -> None:
        self.link.close()

    def __enter__(self) -> StatusWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
