"""The contract the three CLIs share (docs/cli.md), checked on real processes.

``--version``, help text on every flag with the defaults shown, and distinct exit
codes: 2 for usage, 3 for bad input, 4 for an unreachable broker. Scripts and fleet
supervisors branch on these codes, so each one is provoked for real here. Progress
bars appear only when stdout is a terminal: checked both ways, under a pipe and
under a pseudo-terminal.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import toolkit
from tests.conftest import REPO, run_cli

CLIS = {"toolkit": "toolkit.cli", "edge-runtime": "edge_runtime.cli",
        "cloud-trainer": "cloud_trainer.cli"}
SMALL = ["--model", "smallcnn", "--batch", "4", "--input-shape", "3,16,16"]
PLAN = ["plan", "--model", "smallcnn", "--batch", "8", "--input-shape", "3,16,16",
        "--samples", "4000", "--threads", "1", "--repeats", "1", "--max-profile-s", "5"]


def _commands(parser: argparse.ArgumentParser,
              path: str) -> list[tuple[str, argparse.ArgumentParser]]:
    """``(command path, parser)`` for the top level and every sub-command, depth first."""
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, f"{path} {name}")
    return found


def _flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The optional flags a user can type, minus argparse's own -h and --version."""
    return [a for a in parser._actions if a.option_strings
            and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))]


def _closed_port() -> int:
    """A port nothing listens on: bound once by the OS, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("error:")]


# ------------------------------------------------------------------------ --version


@pytest.mark.parametrize("prog", list(CLIS))
def test_version_prints_the_package_version(prog: str) -> None:
    r = run_cli(prog, "--version", timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{prog} {toolkit.__version__}"
    assert toolkit.__version__ == importlib.metadata.version("hiertrain")


# ----------------------------------------------------------------------------- help


@pytest.mark.parametrize("prog", list(CLIS))
def test_every_flag_of_every_command_has_help(prog: str) -> None:
    parser = importlib.import_module(CLIS[prog]).build_parser()
    missing = [f"{path} {a.option_strings[0]}" for path, sp in _commands(parser, prog)
               for a in _flags(sp) if not (isinstance(a.help, str) and a.help.strip())]
    assert not missing, f"flags without help text: {', '.join(missing)}"


@pytest.mark.parametrize("prog", list(CLIS))
def test_help_shows_every_default(prog: str) -> None:
    """The shared formatter prints each default; every sub-command inherits it."""
    parser = importlib.import_module(CLIS[prog]).build_parser()
    unshown = []
    for path, sp in _commands(parser, prog):
        text = " ".join(sp.format_help().split())  # undo line wrapping
        for a in _flags(sp):
            if a.help == argparse.SUPPRESS or a.default in (None, argparse.SUPPRESS):
                continue
            if f"(default: {a.default})" not in text:
                unshown.append(f"{path} {a.option_strings[0]}")
    assert not unshown, f"defaults missing from --help: {', '.join(unshown)}"


@pytest.mark.parametrize("args, shown", [
    (["toolkit", "export", "--help"], "(default: rpi4)"),
    (["edge-runtime", "train", "--help"], "(default: 30.0)"),
    (["cloud-trainer", "train", "--help"], "(default: 120.0)"),
])
def test_help_of_a_sub_command_shows_defaults_as_a_process(args: list[str], shown: str) -> None:
    r = run_cli(*args, timeout=120)
    assert r.returncode == 0, r.stderr
    assert shown in " ".join(r.stdout.split())


# ----------------------------------------------------------------------- exit codes


@pytest.mark.parametrize("args", [
    ["toolkit"],
    ["toolkit", "export", "--out", "never-written"],  # --model missing
    ["toolkit", "plan", "--bits", "3"],
    ["edge-runtime", "train", "--no-such-flag"],
    ["cloud-trainer", "--no-such-flag"],
])
def test_a_usage_error_exits_2(args: list[str]) -> None:
    r = run_cli(*args, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("usage:") and "Traceback" not in r.stderr, r.stderr
    assert not (REPO / "never-written").exists()


def test_toolkit_bad_input_exits_3_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_cli("toolkit", "export", *SMALL, "--board", "nope", "--out", str(out), timeout=120)
    assert r.returncode == 3, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: unknown board 'nope'")
    assert not out.exists()


@pytest.mark.parametrize("prog, extra", [
    ("edge-runtime", ["train", "--device-id", "d0"]),
    ("cloud-trainer", ["--run-dir", "{tmp}/run"]),
])
def test_runtime_bad_input_exits_3_with_one_error_line(prog: str, extra: list[str],
                                                       tmp_path: Path) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    r = run_cli(prog, *args, "--artifacts", str(tmp_path / "nonexistent"), "--broker",
                f"mqtt://127.0.0.1:{_closed_port()}", timeout=300)
    assert r.returncode == 3, r.stderr
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and "no manifest.json" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_edge_runtime_with_the_broker_down_exits_4(artifacts: Path, tmp_path: Path) -> None:
    """On the session's shared export (tests/conftest.py): a real program, built once."""
    port = _closed_port()
    r = run_cli("edge-runtime", "train", "--artifacts", str(artifacts), "--broker",
                f"mqtt://127.0.0.1:{port}", "--device-id", "d0", "--connect-timeout", "1",
                "--epochs", "1", "--state-dir", str(tmp_path), timeout=600)
    assert r.returncode == 4, r.stderr[-3000:]
    lines = _error_lines(r.stderr)
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0], r.stderr[-3000:]
    assert "Traceback" not in r.stderr


# -------------------------------------------------------------------- progress bars


def _plan(cache: Path, stdout: int) -> subprocess.CompletedProcess:
    """``toolkit plan`` with stdout on ``stdout``; output kept as raw bytes.

    Bytes, not text: text mode would turn tqdm's carriage returns into newlines.
    """
    return subprocess.run(
        [sys.executable, "-m", "toolkit", *PLAN, "--profile-cache", str(cache)],
        stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE, timeout=900, cwd=REPO,
    )


def _plan_under_a_terminal(cache: Path) -> subprocess.CompletedProcess:
    """``toolkit plan`` with stdout on a pseudo-terminal, as in an interactive shell."""
    master, slave = os.openpty()
    drained = bytearray()

    def drain() -> None:  # keep the terminal's buffer from filling up and blocking the child
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not chunk:
                return
            drained.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        result = _plan(cache, slave)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    assert b"recommendation" in drained, drained[-2000:]
    return result


def test_progress_bars_only_when_stdout_is_a_terminal(tmp_path: Path) -> None:
    """Profiling shows a tqdm bar on a terminal and none in captured output (logs, CI)."""
    piped = _plan(tmp_path / "a.json", subprocess.PIPE)
    assert piped.returncode == 0, piped.stderr.decode(errors="replace")
    assert b"recommendation" in piped.stdout
    for out in (piped.stdout, piped.stderr):
        assert b"profiling smallcnn" not in out and b"\r" not in out, out[-2000:]

    tty = _plan_under_a_terminal(tmp_path / "b.json")
    assert tty.returncode == 0, tty.stderr.decode(errors="replace")
    assert b"profiling smallcnn" in tty.stderr and b"\r" in tty.stderr  # the bar: not vacuous
