"""Shared fixtures: real files in tmp dirs, real processes, real brokers on 127.0.0.1.

* ``exported(...)``: ExecuTorch artifacts built once per test session for each distinct set
  of export options (and shared by the pytest-xdist workers), because an export is the
  slowest thing the suite does. The artifacts are shared: a test that changes them copies
  them first (``shutil.copytree``).
* ``artifacts`` / ``manifest``: the export a test module asks for with a module-level
  ``ARTIFACTS = {...}`` dict of :func:`exported` options (none: the defaults).
* ``embedded_broker`` / ``mosquitto_broker`` / ``broker``: one broker per test module.
* ``procs``: a :class:`toolkit.lab.launch.ProcessGroup` whose processes run from the source
  tree and are stopped when the test ends, logging to ``<tmp_path>/<name>.log``; a cloud
  trainer that edges will feed starts through :func:`toolkit.lab.launch.start_cloud`.
* ``cli`` runs a CLI as a real process; ``cli_in_process`` runs its ``main(argv)`` here, for
  bad-input paths that end before any work (no second torch start-up).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from filelock import FileLock

from toolkit.core.transport.base import BrokerAddress, Link
from toolkit.lab.launch import ProcessGroup

REPO = Path(__file__).resolve().parents[1]

CHEAP_LOWERING = "portable"
"""The lowering the fixtures export with unless a test asks for another: the quickest to
export (XNNPACK's partitioning is most of an export's time). Tests about the default lowering
(its parity, speed, manifest entry, end to end) ask for ``lowering="xnnpack"``."""

EXPORT_DEFAULTS: dict[str, Any] = {
    "model": "smallcnn", "input_shape": (1, 8, 8), "mean": (0.3,), "std": (0.37,), "batch": 16,
    "board": "rpi4", "verify": False, "lowering": CHEAP_LOWERING,
}


CLI_PACKAGES = {"toolkit": "toolkit", "edge-runtime": "edge_runtime",
                "cloud-trainer": "cloud_trainer"}
"""Console entry point -> its package (``python -m <package>``; ``main`` in ``<package>.cli``)."""


class InProcessLink(Link):
    """A link with no broker behind it, for tests that hand messages to handlers
    themselves: connecting, wills and closing do nothing; subclasses say what publish and
    subscribe do."""

    def __init__(self, name: str) -> None:
        super().__init__(BrokerAddress("mqtt", "127.0.0.1", 1883), name)

    def connect(self, timeout: float = 30.0) -> None:
        pass

    def set_will(self, topic: str, payload: bytes, retain: bool = True, qos: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    @property
    def is_connected(self) -> bool:
        return True


def run_cli(
    *args: str, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run one of the console entry points as a real OS process."""
    module = CLI_PACKAGES[args[0]]
    return subprocess.run(
        [sys.executable, "-m", module, *args[1:]], capture_output=True, text=True,
        timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})},
    )


def run_cli_in_process(*args: str) -> subprocess.CompletedProcess:
    """One of the CLIs through its ``main(argv)`` in this process: the same parsing, checks,
    messages and exit codes as :func:`run_cli` without a second interpreter importing torch
    (2-3 s each). For commands that fail on bad input before doing any work; the exit codes of
    real processes are held by tests/test_cli_contract.py."""
    import contextlib
    import importlib
    import io

    main = importlib.import_module(f"{CLI_PACKAGES[args[0]]}.cli").main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args[1:]))
        except SystemExit as exc:  # argparse's usage errors and --help
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def unit_argv(root: Path, env: dict[str, str], prefix: Path, state: Path,
              python: str = sys.executable) -> list[str]:
    """The bundle's unit's ExecStart (``root``: the unpacked ``hiertrain-edge/``) as systemd
    would run it, with ``${VAR}`` from ``env``, the install paths moved to ``prefix`` and
    ``state``, and the venv's edge-runtime run as ``python -m edge_runtime``."""
    unit = (root / "hiertrain-edge.service").read_text()
    exec_line = next(line for line in unit.replace("\\\n", "").splitlines()
                     if line.startswith("ExecStart="))
    text = (exec_line.removeprefix("ExecStart=").replace("/opt/hiertrain", str(prefix))
            .replace("/var/lib/hiertrain", str(state)))
    argv = [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], a) for a in shlex.split(text)]
    assert argv[0] == f"{prefix}/venv/bin/edge-runtime"
    return [python, "-m", "edge_runtime", *argv[1:]]


def wait_until(pred: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.02) -> None:
    """Poll ``pred`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


TIMING_MODULES = ("test_shaping", "test_faults", "test_provisioning", "test_serial_link")
"""Modules whose tests assert wall-clock rates, latencies or pacing: under pytest-xdist they
all run on one worker, one at a time, so two of them never compete for the CPU."""

ONE_WORKER_MODULES = ("test_codec", "test_export_cli", "test_export_parity", "test_personalise",
                      "test_plan")
"""Modules with a slow module-scoped fixture or cache of their own (a CLI export, lowered
parity programs, a pre-trained backbone, a profile): each runs on one worker, so that it is
built once, not per worker."""


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns the marks into groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        module = getattr(item, "module", None)
        name = module.__name__.rsplit(".", 1)[-1] if module is not None else ""
        if name in TIMING_MODULES:
            item.add_marker(pytest.mark.xdist_group("timing"))
        elif name in ONE_WORKER_MODULES:
            item.add_marker(pytest.mark.xdist_group(name))


class InProcessCloud:
    """``run_cloud`` on a thread of this process (a real broker, no second torch start-up).

    ``join`` returns the summary; with ``reraise`` it raises what ``run_cloud`` raised,
    else that stays in ``error`` for the test to inspect.
    """

    def __init__(self, artifacts: Path, broker: Any, run_dir: Path, run: str, *,
                 reraise: bool = True, **kw: Any) -> None:
        from cloud_trainer.trainer import CloudConfig, run_cloud

        kw.setdefault("idle_timeout", 20)
        cfg = CloudConfig(artifacts=artifacts, broker=getattr(broker, "url", broker),
                          run_dir=run_dir, run_id=run, quiet=True, **kw)
        self.reraise = reraise
        self.stop = threading.Event()
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None

        def target() -> None:
            try:
                self.summary = run_cloud(cfg, self.stop)
            except BaseException as exc:  # noqa: BLE001 -- kept for join() and the test
                self.error = exc

        self.thread = threading.Thread(target=target, name="test-cloud", daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> dict[str, Any] | None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join(30)
            pytest.fail(f"in-process cloud did not finish within {timeout} s")
        if self.reraise:
            if self.error is not None:
                raise self.error
            assert self.summary is not None
        return self.summary

    def close(self) -> None:
        if self.thread.is_alive():
            self.stop.set()
            self.thread.join(30)


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def require_mosquitto() -> None:
    """Skip a test that needs Debian's mosquitto when it is missing; under CI (which installs
    it) fail instead, so a broken CI image cannot hide the tests."""
    from toolkit.lab.broker import find_mosquitto

    if find_mosquitto() is None:
        msg = "mosquitto not installed (apt-get install mosquitto)"
        if _ci():
            pytest.fail(f"{msg}; CI is set, so this is a failure, not a skip")
        pytest.skip(msg)


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def cli_in_process():
    return run_cli_in_process


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One torch thread per test process: the suite runs on two shared cores with two xdist
    workers, and threaded tiny steps crawl on a busy CPU. Processes the tests start get
    ``--threads 1`` on their command lines."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _session_dir(factory: pytest.TempPathFactory) -> Path:
    """A directory every xdist worker of this session sees (each worker's basetemp is a
    ``popen-gwN`` directory in the session's); this process's basetemp without xdist."""
    base = factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``exported(**options) -> Path``: the artifacts of ``toolkit.build.export`` for
    ``EXPORT_DEFAULTS`` updated with ``options`` (any :class:`ExportConfig` field but
    ``out``, plus ``digits=True`` for the digits data set's mean and std and
    ``exit_channels=n`` for an exit head of ``n`` channels). Each distinct set is exported
    once per session, under a file lock, so parallel workers wait for one export instead
    of repeating it."""
    from toolkit.build.export import ExportConfig, export_artifacts
    from toolkit.core.data.datasets import digits_stats
    from toolkit.core.models.exits import ExitHeadConfig

    root = _session_dir(tmp_path_factory) / "exports"
    root.mkdir(exist_ok=True)

    def export(*, digits: bool = False, exit_channels: int | None = None,
               **options: Any) -> Path:
        cfg = {**EXPORT_DEFAULTS, **options}
        if digits:
            cfg["mean"], cfg["std"] = digits_stats()
        if exit_channels is not None:
            cfg["exit"] = ExitHeadConfig(channels=exit_channels)
        key = hashlib.sha256(repr(sorted(cfg.items())).encode()).hexdigest()[:10]
        out = root / (f"{cfg['model']}-{cfg.get('split') or 'default'}-b{cfg['batch']}-"
                      f"{cfg['lowering']}-{key}")
        with FileLock(str(out) + ".lock"):
            if not (out / "manifest.json").exists():  # the export renames a full dir into place
                export_artifacts(ExportConfig(out=out, force=True, **cfg))
        return out

    return export


@pytest.fixture(scope="module")
def artifacts(request: pytest.FixtureRequest, exported: Callable[..., Path]) -> Path:
    """The export the test module's ``ARTIFACTS`` options describe (shared: copy to change)."""
    return exported(**getattr(request.module, "ARTIFACTS", {}))


@pytest.fixture(scope="module")
def manifest(artifacts: Path):
    from toolkit.core.artifacts.manifest import load_manifest

    return load_manifest(artifacts)


@pytest.fixture(scope="module")
def embedded_broker():
    """amqtt in this process on a free port (MQTT 3.1.1)."""
    from toolkit.lab.broker import EmbeddedBroker

    with EmbeddedBroker().start(timeout=10) as b:
        yield b


@pytest.fixture(scope="module")
def mosquitto_broker():
    """Debian's mosquitto (MQTT 5) on a free port; skipped when not installed (not in CI)."""
    from toolkit.lab.broker import MosquittoBroker

    require_mosquitto()
    with MosquittoBroker().start(timeout=10) as b:
        yield b


@pytest.fixture(scope="module")
def broker(embedded_broker):
    """The module's broker: the embedded one unless a module overrides this fixture."""
    return embedded_broker


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[ProcessGroup]:
    """Processes for one test (``procs.start(name, ["cloud_trainer", ...])``), run from the
    source tree, logging to ``tmp_path/<name>.log``, stopped when the test ends."""
    with ProcessGroup(tmp_path, cwd=REPO) as group:
        yield group
