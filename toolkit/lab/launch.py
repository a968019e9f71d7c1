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
from typing import Any

from toolkit.core.errors import HiertrainError, WireError
from toolkit.core.protocol import topics
from toolkit.core.protocol.messages import CLOUD_DEVICE, decode_status


def tail(log: Path, n: int = 15) -> str:
    """The last ``n`` lines of a log, for error messages; empty when unreadable."""
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


class LaunchError(HiertrainError):
    """A launched process failed, or a bounded wait for one ran out (with its log tail)."""


class ProcessGroup:
    """Named child processes (``python -m <module> ...``), each logging to ``<log_dir>/<name>.log``.

    The one launcher of the demo, ``toolkit bench``, the fault-injection kit, the tests and
    the benchmarks, so every caller gets the same guarantees: output goes to files (no pipe
    to fill), every wait is bounded and a process that fails or hangs is reported with the
    tail of its log, and a name can be killed and started again (``restart``) to inject a
    crash. Used as a context manager: leaving it terminates whatever still runs, in reverse
    start order, and closes the log files.
    """

    def __init__(self, log_dir: Path, cwd: Path | None = None) -> None:
        """``cwd``: the children's working directory (the tests pass the source tree, so
        ``python -m`` runs the code under test rather than an installed copy)."""
        self.log_dir = Path(log_dir)
        self.cwd = cwd
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}
        self.errs: dict[str, Path] = {}
        self._argv: dict[str, tuple[list[str], dict[str, str] | None, bool]] = {}
        self._starts: dict[str, int] = {}
        self._files: list = []

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None, *,
              separate_stderr: bool = False) -> subprocess.Popen:
        """``python -m <args>`` as ``name``; see :meth:`start_command`."""
        return self.start_command(name, [sys.executable, "-m", *args], env,
                                  separate_stderr=separate_stderr)

    def start_command(self, name: str, argv: list[str], env: dict[str, str] | None = None, *,
                      separate_stderr: bool = False) -> subprocess.Popen:
        """Start ``argv`` as ``name`` (again, once its last run ended: a restart).

        Output goes to ``<name>.log`` (the ``n``-th start of a name to ``<name>-<n>.log``);
        ``separate_stderr`` keeps stdout there and stderr in ``<name>.err`` for callers that
        parse stdout. ``env`` is added to this process's environment.
        """
        old = self.procs.get(name)
        if old is not None and old.poll() is None:
            raise ValueError(f"process {name!r} already started and still running")
        n = self._starts.get(name, 0) + 1
        stem = name if n == 1 else f"{name}-{n}"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{stem}.log"
        f = open(log, "w")  # noqa: SIM115 - closed in close()
        self._files.append(f)
        err = subprocess.STDOUT
        if separate_stderr:
            self.errs[name] = self.log_dir / f"{stem}.err"
            err = open(self.errs[name], "w")  # noqa: SIM115 - closed in close()
            self._files.append(err)
        else:
            self.errs.pop(name, None)
        p = subprocess.Popen(argv, stdout=f, stderr=err, stdin=subprocess.DEVNULL, cwd=self.cwd,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        self.procs[name] = p
        self.logs[name] = log
        self._argv[name] = (argv, env, separate_stderr)
        self._starts[name] = n
        return p

    def restart(self, name: str, *, kill: bool = True) -> subprocess.Popen:
        """Stop ``name`` (SIGKILL, a crash, unless ``kill=False``) and start it again with
        the same command line."""
        self.stop(name, kill=kill)
        argv, env, separate = self._argv[name]
        return self.start_command(name, argv, env, separate_stderr=separate)

    def send_signal(self, name: str, sig: int) -> None:
        p = self.procs[name]
        if p.poll() is None:
            p.send_signal(sig)

    def stop(self, name: str, timeout: float = 10, *, kill: bool = False) -> int:
        """SIGTERM (``kill``: SIGKILL) and wait, SIGKILL after ``timeout`` s; the exit code."""
        p = self.procs[name]
        if p.poll() is None:
            if kill:
                p.kill()
            else:
                p.terminate()
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout)
        return p.returncode

    def kill(self, name: str, timeout: float = 10) -> int:
        """SIGKILL ``name`` (a crash: no clean-up, no last message) and reap it."""
        return self.stop(name, timeout, kill=True)

    def wait(self, name: str, timeout: float) -> int:
        """The exit code of ``name``; kills it and raises :class:`LaunchError` (with its log
        tail) when it has not ended within ``timeout`` s."""
        p = self.procs[name]
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(name)
            raise LaunchError(f"{name} did not finish within {timeout:.0f} s "
                              f"(log {self.logs[name]}):\n{self.tail(name)}") from None

    def wait_all(self, names: list[str] | None = None, timeout: float = 60) -> dict[str, int]:
        """Wait for ``names`` (default: all) under one deadline; their exit codes. On the
        deadline every one of them still running is killed and :class:`LaunchError` names
        them with their log tails. Exit codes are the caller's to check (:meth:`check`)."""
        names = list(self.procs) if names is None else names
        deadline = time.monotonic() + timeout
        while any(self.procs[n].poll() is None for n in names):
            if time.monotonic() > deadline:
                late = [n for n in names if self.procs[n].poll() is None]
                for n in late:
                    self.kill(n)
                raise LaunchError(f"{', '.join(late)} did not finish within {timeout:.0f} s:\n"
                                  + self.tails(late))
            time.sleep(0.05)
        return {n: self.procs[n].returncode for n in names}

    def returncode(self, name: str) -> int | None:
        return self.procs[name].poll()

    def output(self, name: str) -> str:
        """Everything ``name`` wrote to its log (its stdout, with ``separate_stderr``)."""
        return self.logs[name].read_text(errors="replace")

    def errors(self, name: str) -> str:
        """What ``name`` wrote to stderr (its log, unless started with ``separate_stderr``)."""
        return self.errs.get(name, self.logs[name]).read_text(errors="replace")

    def tail(self, name: str, n: int = 40) -> str:
        """The last ``n`` lines of ``name``'s output (stdout and stderr)."""
        parts = [tail(self.logs[name], n)]
        if name in self.errs:
            parts.append(tail(self.errs[name], n))
        return "\n".join(p for p in parts if p)

    def tails(self, names: list[str] | None = None, n: int = 40) -> str:
        """Every named process's log tail under a header, for a failure message."""
        return "\n".join(f"--- {name} (exit {self.procs[name].poll()}) ---\n{self.tail(name, n)}"
                         for name in (list(self.procs) if names is None else names))

    def failure(self, name: str) -> HiertrainError:
        p = self.procs[name]
        return LaunchError(f"{name} exited with {p.returncode} (log {self.logs[name]}):\n"
                           f"{self.tail(name, 15)}")

    def check(self, must_live: tuple[str, ...] = ()) -> None:
        """Raise for a process that failed, or that ended although it must keep running."""
        for name, p in self.procs.items():
            rc = p.poll()
            if rc is not None and (rc != 0 or name in must_live):
                raise self.failure(name)

    def wait_until(self, cond: Callable[[], Any], timeout: float, what: str,
                   must_live: tuple[str, ...] = ()) -> Any:
        """Poll ``cond`` until it is true (returned); raise on a failed process (or one of
        ``must_live`` ending) or at the deadline."""
        deadline = time.monotonic() + timeout
        while not (value := cond()):
            self.check(must_live)
            if time.monotonic() > deadline:
                raise LaunchError(f"{what} within {timeout:.0f} s")
            time.sleep(0.1)
        return value

    def wait_exit(self, names: list[str], timeout: float,
                  must_live: tuple[str, ...] = ()) -> None:
        """Wait for ``names`` to exit successfully; raise on the first failure or the deadline."""
        self.wait_until(lambda: all(self.procs[n].poll() is not None for n in names), timeout,
                        f"{', '.join(names)} did not finish", must_live)
        self.check(must_live)

    def running(self, names: list[str] | None = None) -> bool:
        return any(self.procs[n].poll() is None for n in (names or list(self.procs)))

    def close(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)
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


def start_cloud(group: ProcessGroup, args: list[str], url: str, run_id: str, *,
                name: str = "cloud", watcher: StatusWatcher | None = None,
                timeout: float = 120, must_live: tuple[str, ...] = ()) -> subprocess.Popen:
    """Start a cloud trainer (``args``: its command line) and return once its retained
    status says it is online, i.e. subscribed. Start the edges after this: a batch published
    before the trainer's session exists reaches nobody until the edge sends its spool again
    (docs/delivery.md), and an edge that finds no trainer status at the end of its run does
    not wait for one: it exits 5, its batches kept for ``--resume``."""
    own = watcher is None
    watch = StatusWatcher(url, run_id) if own else watcher
    try:
        proc = group.start(name, args)
        group.wait_until(lambda: watch.cloud_state() in ("online", "training"), timeout,
                         "the cloud trainer did not come online", (*must_live, name))
    finally:
        if own:
            watch.close()
    return proc
