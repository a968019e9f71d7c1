"""MQTT brokers for the demo and the tests, both bound to 127.0.0.1 by default.

* :class:`EmbeddedBroker` runs amqtt in a background thread of this process:
  nothing to install, so ``toolkit broker`` and the demo work out of the box.
  amqtt speaks MQTT 3.1.1 only; :class:`toolkit.core.transport.mqtt.MqttLink`
  falls back to 3.1.1 for it automatically.
* :class:`MosquittoBroker` runs Debian's mosquitto (MQTT 5) as a subprocess
  with a throw-away config, for tests that must match a production broker.

Both have the same face -- ``start(timeout)``, ``stop()``, ``url``, context
manager -- so a test can be parametrized over them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from toolkit.core.errors import HiertrainError
from toolkit.core.optional import require
from toolkit.core.transport.ports import free_port

log = logging.getLogger(__name__)

#: Largest MQTT packet (the protocol's 256 MiB remaining-length ceiling).
#: Activation batches are 10+ MB; we never want a broker-side size cap to be
#: the reason a training step disappears.
MAX_PACKET_SIZE = 268_435_455

_MOSQUITTO_CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def _probe_host(host: str) -> str:
    """Address to test a listener bound to ``host`` (wildcards are probed on loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """Poll until ``host:port`` accepts a TCP connection; False after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    target = _probe_host(host)
    while True:
        try:
            with socket.create_connection((target, port), timeout=0.5):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"mqtt://{shown}:{port}"


class _BrokerBase:
    """Shared face: url, context manager, idempotent stop."""

    host: str
    port: int

    @property
    def url(self) -> str:
        """``mqtt://<host>:<port>`` once started (the port is known before that too)."""
        return _url(self.host, self.port)

    def start(self, timeout: float = 10.0) -> _BrokerBase:  # pragma: no cover - abstract
        raise NotImplementedError

    def stop(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.url}>"


def _amqtt_config(host: str, port: int) -> dict[str, Any]:
    """amqtt config: one TCP listener, anonymous access, no $SYS, no websockets.

    amqtt has no message-size setting: it reads a PUBLISH with
    ``StreamReader.readexactly(remaining_length)``, so any legal MQTT packet
    (up to :data:`MAX_PACKET_SIZE`) goes through; 16 MB is tested.
    Listing ``plugins`` explicitly drops amqtt's default packet/event logger and
    the $SYS plugin, which would publish broker stats every 20 s.
    """
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


def _quiet_amqtt() -> None:
    """Let only CRITICAL amqtt records through (process-wide).

    amqtt logs every connection at INFO, every rejected MQTT 5 CONNECT (our
    links try 5 first) at WARNING, and a bare TCP probe such as our readiness
    check, or a client killed mid-session, at ERROR -- all routine here.
    """
    for name in ("amqtt", "transitions"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


class EmbeddedBroker(_BrokerBase):
    """amqtt broker whose asyncio loop runs in a daemon thread of this process."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, quiet: bool = True) -> None:
        """``port=0`` picks a free port at start; ``quiet`` silences amqtt's logging."""
        self.host = host
        self._requested_port = port
        self.port = port
        self.quiet = quiet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker: Any = None  # amqtt.broker.Broker, imported lazily

    def start(self, timeout: float = 10.0) -> EmbeddedBroker:
        """Start and return once the port accepts connections (HiertrainError otherwise)."""
        if self._thread is not None:
            return self
        if self.quiet:
            _quiet_amqtt()
        broker_cls = _tracking_broker_class()
        deadline = time.monotonic() + timeout
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run_loop, args=(loop,), daemon=True)
        thread.name = "amqtt-broker"
        thread.start()
        self._loop, self._thread = loop, thread
        attempts = 3 if self._requested_port == 0 else 1
        last_error: BaseException | None = None
        for _ in range(attempts):
            self.port = self._requested_port or free_port()

            async def _start(port: int = self.port) -> Any:
                broker = broker_cls(_amqtt_config(self.host, port))
                await broker.start()
                return broker

            future = asyncio.run_coroutine_threadsafe(_start(), loop)
            try:
                self._broker = future.result(max(0.1, deadline - time.monotonic()))
                break
            except concurrent.futures.TimeoutError:
                future.cancel()
                last_error = TimeoutError(f"not started within {timeout:.1f} s")
                break
            except Exception as exc:  # noqa: BLE001 -- amqtt wraps bind errors in BrokerError
                last_error = exc
        if self._broker is None:
            self._stop_loop()
            raise HiertrainError(
                f"cannot start embedded MQTT broker on {self.url}: {last_error} "
                "(is the port already in use?)"
            )
        if not wait_for_port(self.host, self.port, max(0.1, deadline - time.monotonic())):
            self.stop()
            raise HiertrainError(f"embedded MQTT broker on {self.url} does not accept connections")
        log.info("embedded MQTT broker (amqtt) listening on %s", self.url)
        return self

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        loop.run_forever()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None or thread is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        if not thread.is_alive():
            loop.close()

    def stop(self, timeout: float = 2.0) -> None:
        """Shut the broker down, closing client connections, and end the thread.

        amqtt's own shutdown is given ``timeout`` seconds. It can hang when a
        QoS 1 delivery is in flight (amqtt 0.12: the cancelled reader task
        never signals that it stopped), so after the timeout we abort the
        client sockets, close the listener and cancel amqtt's tasks: clients
        see the connection drop either way and the port is free on return.
        """
        broker, self._broker = self._broker, None
        loop = self._loop
        if broker is not None and loop is not None:
            future = asyncio.run_coroutine_threadsafe(_shutdown(broker, timeout), loop)
            try:
                future.result(timeout + 3.0)
            except Exception:  # noqa: BLE001 -- stopping must not fail the caller's cleanup
                log.warning("embedded MQTT broker did not shut down cleanly", exc_info=True)
        self._stop_loop()


async def _shutdown(broker: Any, timeout: float) -> None:
    """Graceful amqtt shutdown, forced after ``timeout`` s (see EmbeddedBroker.stop)."""
    try:
        await asyncio.wait_for(broker.shutdown(), timeout)
        return
    except Exception as exc:  # noqa: BLE001 -- TimeoutError or an amqtt error: force it
        log.debug("amqtt shutdown did not finish (%r); forcing it", exc)
    for writer in list(broker.hiertrain_writers):
        writer.transport.abort()
    for server in getattr(broker, "_servers", {}).values():
        instance = getattr(server, "instance", None)
        if instance is not None:
            instance.close()
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=1.0)


def _tracking_broker_class() -> Any:
    """amqtt Broker subclass that remembers client streams, so stop() can abort them.

    Imported lazily: amqtt pulls in websockets, transitions, dacite... which
    only the embedded broker needs.
    """
    Broker = require("amqtt.broker", "toolkit", "the embedded MQTT broker").Broker

    class TrackingBroker(Broker):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.hiertrain_writers: set[asyncio.StreamWriter] = set()

        async def stream_connected(
            self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, listener_name: str
        ) -> None:
            self.hiertrain_writers.add(writer)
            try:
                await super().stream_connected(reader, writer, listener_name)
            finally:
                self.hiertrain_writers.discard(writer)

    return TrackingBroker


def run_broker(host: str = "127.0.0.1", port: int = 1883, *, quiet: bool = True) -> None:
    """Run an embedded broker in the foreground until Ctrl-C or SIGTERM (``toolkit broker``)."""
    stop = threading.Event()

    def _on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_signal) if in_main else None
    try:
        with EmbeddedBroker(host, port, quiet=quiet) as broker:
            print(f"MQTT broker (amqtt, MQTT 3.1.1) listening on {broker.url}; Ctrl-C to stop")
            try:
                while not stop.wait(0.5):  # short waits keep Ctrl-C responsive
                    pass
            except KeyboardInterrupt:
                pass
            print("stopping MQTT broker")
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def find_mosquitto() -> str | None:
    """Path of the mosquitto binary, or None. /usr/sbin is often not on a user's PATH."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in _MOSQUITTO_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def local_broker(kind: str = "auto") -> EmbeddedBroker | MosquittoBroker:
    """A broker on 127.0.0.1 for a measurement (a context manager): mosquitto when
    installed (``auto``: the faster broker, the one a deployment would run), else the
    embedded one; ``mosquitto`` and ``embedded`` insist."""
    if kind not in ("auto", "mosquitto", "embedded"):
        raise HiertrainError(f"unknown broker {kind!r}; choose auto, mosquitto or embedded")
    if kind in ("auto", "mosquitto") and find_mosquitto():
        return MosquittoBroker()
    if kind == "mosquitto":
        raise HiertrainError("mosquitto is not installed (apt-get install mosquitto)")
    return EmbeddedBroker()


HIERTRAIN_ACL = """\
# the cloud trainer: every run
user cloud
topic readwrite hiertrain/#

# every other user is a device whose user name is its device id, in any run:
# it writes its own activations, inference requests, status and weights,
pattern write hiertrain/+/%u/act
pattern write hiertrain/+/%u/infer
pattern readwrite hiertrain/+/%u/status
pattern readwrite hiertrain/+/%u/weights
# reads what the cloud sends to it alone,
pattern read hiertrain/+/%u/grad
pattern read hiertrain/+/%u/infer/reply
pattern read hiertrain/+/%u/ack
pattern read hiertrain/+/%u/average
# and reads the cloud's broadcasts; nothing of any other device
pattern read hiertrain/+/cloud/status
"""
"""The Mosquitto ACL of docs/security.md, for any run id: device ids are broker user names
(``%u``), the cloud's account is ``cloud``. Tests write this very text (and check that the
docs show it), so the recipe is the one that is tested."""


@dataclass(frozen=True)
class MosquittoSecurity:
    """Access control for a :class:`MosquittoBroker` (docs/security.md has a recipe).

    ``password_file`` (``mosquitto_passwd`` format) turns anonymous access
    off; ``acl_file`` limits each user to its topics; ``certfile`` and
    ``keyfile`` (PEM) make the listener TLS-only (``mqtts://``), and with
    ``require_certificate`` a client must also present a certificate signed by
    ``cafile``.
    """

    password_file: str | None = None
    acl_file: str | None = None  # e.g. a file with HIERTRAIN_ACL
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    require_certificate: bool = False

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    def listener_lines(self) -> str:
        """Config lines that follow the ``listener`` line."""
        if bool(self.certfile) != bool(self.keyfile):
            raise HiertrainError("a TLS listener needs both certfile and keyfile")
        if self.require_certificate and not self.cafile:
            raise HiertrainError("require_certificate needs a cafile to check client "
                                 "certificates against")
        # mosquitto started as root drops to the "mosquitto" user before it reads the
        # password and ACL files, which then must be readable by that user; a broker this
        # class starts runs as its caller instead (ignored when not root), so the caller's
        # private files (0600 in a 0700 temp dir) work as they are.
        lines = [f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                 f"allow_anonymous {'false' if self.password_file else 'true'}"]
        for key in ("password_file", "acl_file", "cafile", "certfile", "keyfile"):
            value = getattr(self, key)
            if value is not None:
                lines.append(f"{key} {Path(value).resolve()}")
        if self.require_certificate:
            lines.append("require_certificate true")
        return "\n".join(lines) + "\n"


def _persistence(directory: Path | None, has_user: bool = False) -> str:
    """Persistence lines: off, or on in ``directory`` so retained messages, persistent
    sessions and their queued QoS 1 messages survive a restart (saved at shutdown and
    every ``autosave_interval`` s; a SIGKILL loses what came after the last save)."""
    if directory is None:
        return "persistence false\n"
    # Started as root, mosquitto switches to user "mosquitto", which cannot write a
    # directory of ours (pytest's tmp dirs are 0700): stay the user that started it.
    # (With a MosquittoSecurity, its own ``user`` line already does this.)
    user = ("user root\n" if hasattr(os, "geteuid") and os.geteuid() == 0 and not has_user
            else "")
    return (f"{user}persistence true\n"
            f"persistence_location {directory}/\n"
            "autosave_interval 5\n")


def _mosquitto_config(
    host: str, port: int, quiet: bool, security: MosquittoSecurity | None = None,
    persistence: Path | None = None,
) -> str:
    log_types = "log_type error\nlog_type warning\n" if quiet else "log_type all\n"
    access = security.listener_lines() if security is not None else "allow_anonymous true\n"
    return (
        f"listener {port} {host}\n"
        f"{access}"
        f"{_persistence(persistence, has_user=security is not None)}"
        # Activation batches are 10+ MB: no size cap below the protocol limit.
        f"max_packet_size {MAX_PACKET_SIZE}\n"
        "max_inflight_messages 64\n"
        # mosquitto's default (1000 queued per client) silently DROPS QoS 1
        # messages for a subscriber that trains slower than the edges publish:
        # a burst of 2000 batches delivered 1167. Bound the queue in bytes instead.
        "max_queued_messages 0\n"
        "max_queued_bytes 2147483648\n"
        "set_tcp_nodelay true\n"
        "log_dest stderr\n"
        f"{log_types}"
    )


class MosquittoBroker(_BrokerBase):
    """mosquitto as a subprocess with a generated config in a temp dir."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        executable: str | None = None,
        quiet: bool = True,
        security: MosquittoSecurity | None = None,
        persistence: str | os.PathLike[str] | None = None,
    ) -> None:
        """``port=0`` picks a free port at start; ``executable`` defaults to find_mosquitto().

        ``security`` adds passwords, an ACL and TLS; without it the listener is
        open to anonymous clients (the tests' and the demo's default).
        ``persistence``: a directory for mosquitto's database (kept after ``stop``), so a
        broker started again on the same port and directory restores retained messages
        and persistent sessions with their queued messages: a broker restart.
        """
        self.host = host
        self.security = security
        self._requested_port = port
        self.port = port
        self.quiet = quiet
        self.executable = executable
        self.persistence = Path(persistence).resolve() if persistence is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log_file: Any = None

    @property
    def url(self) -> str:
        """``mqtts://`` for a TLS listener, else ``mqtt://``."""
        plain = _url(self.host, self.port)
        return plain.replace("mqtt://", "mqtts://", 1) if self.security and self.security.tls \
            else plain

    @property
    def log_path(self) -> Path | None:
        """mosquitto's stderr while it runs (for debugging a failing test)."""
        return Path(self._tmp.name) / "mosquitto.log" if self._tmp else None

    def start(self, timeout: float = 10.0) -> MosquittoBroker:
        """Start mosquitto and return once the port accepts connections."""
        if self._proc is not None:
            return self
        exe = self.executable or find_mosquitto()
        if exe is None or not os.access(exe, os.X_OK):
            raise HiertrainError("mosquitto not found; install it with apt-get install mosquitto")
        deadline = time.monotonic() + timeout
        attempts = 3 if self._requested_port == 0 else 1
        reason = ""
        for _ in range(attempts):
            self.port = self._requested_port or free_port()
            # Something already answering there would pass the readiness probe
            # below while mosquitto itself fails to bind.
            if wait_for_port(self.host, self.port, 0):
                reason = "the port is already in use"
                if self._requested_port:
                    break
                continue
            self._tmp = tempfile.TemporaryDirectory(prefix="hiertrain-mosquitto-")
            conf = Path(self._tmp.name) / "mosquitto.conf"
            if self.persistence is not None:
                self.persistence.mkdir(parents=True, exist_ok=True)
            conf.write_text(_mosquitto_config(self.host, self.port, self.quiet, self.security,
                                              self.persistence))
            self._log_file = open(Path(self._tmp.name) / "mosquitto.log", "wb")
            self._proc = subprocess.Popen(
                [exe, "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
            )
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    break
                if wait_for_port(self.host, self.port, 0.1) and self._proc.poll() is None:
                    log.info("mosquitto listening on %s (pid %d)", self.url, self._proc.pid)
                    return self
            reason = self._failure_reason()
            self.stop()
            if time.monotonic() >= deadline:
                break
        raise HiertrainError(f"mosquitto did not start on {self.url}: {reason}")

    def _failure_reason(self) -> str:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            return "port not accepting connections in time"
        tail = ""
        if self.log_path is not None and self.log_path.exists():
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            tail = " | ".join(lines[-3:])
        code = proc.returncode if proc is not None else "?"
        return f"exited with code {code}: {tail or 'no output'}"

    @property
    def pid(self) -> int | None:
        """The mosquitto process id while it runs (for fault-injection tests)."""
        return self._proc.pid if self._proc is not None else None

    def stop(self, timeout: float = 5.0, *, kill: bool = False) -> None:
        """SIGTERM (``kill``: SIGKILL, a crash), then SIGKILL after ``timeout`` s; removes
        the temp dir (not the ``persistence`` directory)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            if kill:
                proc.kill()
            else:
                proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
