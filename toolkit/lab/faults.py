"""Fault injection for the delivery tests and the soak benchmark: real processes, a real
mosquitto on 127.0.0.1, a TCP proxy that can cut the edge's link, and readers of the
two sides' checkpoints (the sequence-number ledger).

Shared by ``tests/test_faults.py`` (quick, one cycle of each fault) and
``benchmarks/faults_soak.py`` (many random cycles); the processes are started, killed and
restarted by :class:`toolkit.lab.launch.ProcessGroup`.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from toolkit.lab.broker import MosquittoBroker, free_port
from toolkit.lab.launch import LaunchError, ProcessGroup, start_cloud


class FaultError(LaunchError):
    """A bounded wait ran out, or a process failed: the run did not get where the scenario
    expected."""


class Proxy:
    """A TCP relay to the broker that can throttle and cut the link (a radio dropping out).

    ``rate`` bytes/s caps client-to-broker traffic (paces the edge like a slow uplink);
    ``drop(seconds)`` closes every connection and refuses new ones for that long.
    """

    def __init__(self, upstream_port: int, rate: float | None = None) -> None:
        self.upstream_port = upstream_port
        self.rate = rate
        self.port = free_port()
        self._srv = socket.create_server(("127.0.0.1", self.port))
        self._srv.settimeout(0.2)
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._closed = False
        self.drops = 0
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def drop(self, seconds: float) -> None:
        self._down_until = time.monotonic() + seconds
        self.drops += 1
        self._close_all()

    def close(self) -> None:
        self._closed = True
        self._close_all()
        self._srv.close()

    def _close_all(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._srv.accept()
            except (TimeoutError, OSError):
                continue
            if time.monotonic() < self._down_until:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), 2)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, self.rate),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, None),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, rate: float | None) -> None:
        try:
            while True:
                ready, _, _ = select.select([src], [], [], 0.5)
                if not ready:
                    if src.fileno() < 0:
                        return
                    continue
                data = src.recv(4096 if rate else 65536)
                if not data:
                    break
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except (OSError, ValueError):
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


class Broker:
    """mosquitto with persistence on a fixed port: ``crash()`` (SIGKILL) and ``restart()``."""

    def __init__(self, datadir: Path) -> None:
        self.datadir = datadir
        self.port = free_port()
        self.b: MosquittoBroker | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.b = MosquittoBroker(port=self.port, persistence=self.datadir).start(timeout=15)

    def crash(self) -> None:
        if self.b is not None:
            self.b.stop(kill=True)
            self.b = None

    def stop(self) -> None:
        if self.b is not None:
            self.b.stop()
            self.b = None


def cloud_trained(run_dir: Path, device: str) -> int:
    """Batches of ``device`` in the cloud's last checkpoint (its durable ledger)."""
    path = run_dir / "checkpoint.pt"
    if not path.exists():
        return 0
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 -- being replaced right now: try again later
        return 0
    t = ckpt["ledger"]["trained"].get(device)
    return 0 if t is None else int(t["low"]) + len(t["above"])


def edge_seq(state_dir: Path, run: str, device: str) -> int:
    """The next seq in the edge's last checkpoint."""
    path = state_dir / f"edge_checkpoint-{run}-{device}.pt"
    if not path.exists():
        return 0
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001
        return 0
    return int(ckpt["progress"]["seq"])


def ledger(run_dir: Path, device: str) -> dict[str, Any]:
    """The final cloud checkpoint's trained set of ``device`` and its duplicate count."""
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    return {"trained": ckpt["ledger"]["trained"].get(device),
            "duplicates": ckpt["ledger"]["duplicates"].get(device, 0),
            "batches_trained": int(ckpt["batches_trained"])}


class Run:
    """One cloud trainer + one edge (``e0``) through a proxy, with every piece restartable.

    ``cwd``: the processes' working directory (the tests pass the source tree).
    """

    def __init__(self, work: Path, artifacts: Path, broker: Broker, *, epochs: int,
                 rate: float | None, run: str = "faults", spool_mb: float = 0.1,
                 checkpoint_every: int = 10, limit: int | None = None,
                 cwd: Path | None = None) -> None:
        self.work, self.artifacts, self.broker = work, artifacts, broker
        self.run, self.device = run, "e0"
        self.epochs, self.spool_mb, self.limit = epochs, spool_mb, limit
        self.checkpoint_every = checkpoint_every
        self.run_dir = work / "cloud"
        self.state_dir = work / "edge"
        self.proxy = Proxy(broker.port, rate)
        self.group = ProcessGroup(work / "logs", cwd=cwd)
        self.edge_starts = 0
        self.kills = {"broker": 0, "cloud": 0, "edge": 0, "link": 0}

    def start_cloud(self) -> None:
        """Start (or restart) the trainer and return once it is subscribed, so that an edge
        started next publishes into its session (toolkit.lab.launch.start_cloud)."""
        try:
            start_cloud(self.group, [
                "cloud_trainer", "--artifacts", str(self.artifacts), "--broker",
                self.broker.url, "--run-dir", str(self.run_dir), "--run-id", self.run,
                "--device-ids", self.device, "--checkpoint-every", str(self.checkpoint_every),
                "--idle-timeout", "90", "--threads", "1", "--quiet"],
                self.broker.url, self.run)
        except LaunchError as exc:
            raise FaultError(f"{exc}\n{self.group.tails()}") from None

    def start_edge(self) -> None:
        args = ["edge_runtime", "train", "--artifacts", str(self.artifacts),
                "--broker", self.proxy.url, "--device-id", self.device, "--run-id", self.run,
                "--epochs", str(self.epochs), "--backend", "torch", "--threads", "1", "--quiet",
                "--state-dir", str(self.state_dir), "--spool-mb", str(self.spool_mb),
                "--checkpoint-every", str(self.checkpoint_every), "--connect-timeout", "60",
                "--report", str(self.work / f"edge-report-{self.edge_starts}.json")]
        if self.limit:
            args += ["--limit", str(self.limit)]
        if self.edge_starts:
            args.append("--resume")
        self.edge_starts += 1
        self.group.start("edge", args)

    def running(self, name: str) -> bool:
        """Whether ``name`` ("cloud" or "edge") was started and has not ended."""
        return name in self.group.procs and self.group.returncode(name) is None

    def wait_until(self, pred: Callable[[], Any], timeout: float, what: str) -> Any:
        """Poll ``pred`` until true; :class:`FaultError` with both logs' tails when a
        process ends (none may, mid-scenario) or at the deadline."""
        try:
            return self.group.wait_until(pred, timeout, f"timed out waiting for {what}",
                                         must_live=tuple(self.group.procs))
        except LaunchError as exc:
            raise FaultError(f"{exc}\n{self.group.tails()}") from None

    # ------------------------------------------------------------- faults
    def crash_broker(self, down_s: float) -> None:
        self.broker.crash()
        time.sleep(down_s)
        self.broker.start()
        self.kills["broker"] += 1

    def crash_cloud(self, down_s: float) -> None:
        self.group.kill("cloud")
        time.sleep(down_s)
        self.start_cloud()
        self.kills["cloud"] += 1

    def crash_edge(self, down_s: float) -> None:
        self.group.kill("edge")
        time.sleep(down_s)
        self.start_edge()
        self.kills["edge"] += 1

    def drop_link(self, down_s: float) -> None:
        self.proxy.drop(down_s)
        time.sleep(down_s)
        self.kills["link"] += 1

    def edge_seq(self) -> int:
        return edge_seq(self.state_dir, self.run, self.device)

    def cloud_trained(self) -> int:
        return cloud_trained(self.run_dir, self.device)

    def finish(self, timeout: float) -> dict[str, Any]:
        """Wait for both; the cloud summary, the last edge report and the ledger."""
        try:
            rc_edge = self.group.wait("edge", timeout)
            rc_cloud = self.group.wait("cloud", timeout)
        except LaunchError as exc:
            raise FaultError(f"{exc}\n{self.group.tails()}") from None
        if rc_edge or rc_cloud:
            raise FaultError(f"edge exited {rc_edge}, cloud {rc_cloud}:\n{self.group.tails()}")
        summary = json.loads((self.run_dir / "cloud_summary.json").read_text())
        report = json.loads((self.work / f"edge-report-{self.edge_starts - 1}.json")
                            .read_text())
        return {"cloud": summary, "edge": report, "ledger": ledger(self.run_dir, self.device)}

    def close(self) -> None:
        for name in list(self.group.procs):
            self.group.kill(name)
        self.group.close()
        self.proxy.close()
