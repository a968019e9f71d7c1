"""toolkit.lab.launch.ProcessGroup, the launcher of the demo, the tests and the benchmarks:
bounded waits that kill and report with the log's tail, kill and restart, output in files."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from toolkit.lab.launch import LaunchError, ProcessGroup, start_cloud

SLEEPER = "import sys, time; print('up', flush=True); print('to stderr', file=sys.stderr); " \
          "time.sleep(60)"


def test_a_wait_that_runs_out_kills_the_process_and_shows_its_log(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as procs:
        p = procs.start_command("sleeper", [sys.executable, "-c", SLEEPER])
        procs.wait_until(lambda: "up" in procs.output("sleeper"), 30, "sleeper never started")
        t = time.monotonic()
        with pytest.raises(LaunchError, match=r"(?s)sleeper did not finish within 1 s.*up"):
            procs.wait("sleeper", 1)
        assert time.monotonic() - t < 15
        assert p.poll() == -signal.SIGKILL  # not left running behind the test
        with pytest.raises(LaunchError, match="sleeper did not finish within 1 s"):
            procs.start_command("sleeper", [sys.executable, "-c", SLEEPER])
            procs.wait_all(["sleeper"], 1)
        assert procs.returncode("sleeper") == -signal.SIGKILL


def test_kill_and_restart_keep_every_run_s_log(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as procs:
        first = procs.start_command("s", [sys.executable, "-c", SLEEPER], separate_stderr=True)
        with pytest.raises(ValueError, match="still running"):
            procs.start_command("s", [sys.executable, "-c", SLEEPER])
        procs.wait_until(lambda: "up" in procs.output("s"), 30, "s never started")
        assert procs.errors("s").strip() == "to stderr" and "to stderr" not in procs.output("s")
        second = procs.restart("s")  # SIGKILL, then the same command line again
        assert first.poll() == -signal.SIGKILL and second.poll() is None
        procs.wait_until(lambda: "up" in procs.output("s"), 30, "s never restarted")
        assert procs.logs["s"].name == "s-2.log" and (tmp_path / "s.log").exists()
        procs.send_signal("s", signal.SIGTERM)
        assert procs.wait("s", 30) == -signal.SIGTERM
    assert second.poll() is not None


def test_a_failed_process_is_reported_with_its_exit_code_and_log(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as procs:
        procs.start_command("bad", [sys.executable, "-c", "import sys; print('boom'); "
                                                           "sys.exit(3)"])
        with pytest.raises(LaunchError, match=r"(?s)bad exited with 3.*boom"):
            procs.wait_exit(["bad"], 30)
        assert procs.wait_all(timeout=5) == {"bad": 3}
        assert "--- bad (exit 3) ---\nboom" in procs.tails()


def test_leaving_the_group_stops_what_still_runs(tmp_path: Path) -> None:
    with ProcessGroup(tmp_path) as procs:
        p = procs.start("sleeper", ["http.server", "0", "--bind", "127.0.0.1"])
    assert p.poll() is not None


@pytest.mark.mqtt
def test_start_cloud_reports_a_trainer_that_fails_or_never_comes_online(
        tmp_path: Path, embedded_broker) -> None:
    """``start_cloud`` (demo, bench, fault kit) returns only for a subscribed trainer: one that
    exits is reported with its own one-line error, one that never says "online" at the
    deadline, and neither is left running."""
    url = embedded_broker.url
    with ProcessGroup(tmp_path) as procs:
        with pytest.raises(LaunchError, match=r"(?s)cloud exited with 3 .*error: .*manifest"):
            start_cloud(procs, ["cloud_trainer", "--artifacts", str(tmp_path / "none"),
                                "--broker", url, "--run-dir", str(tmp_path / "run"),
                                "--run-id", "r", "--quiet"], url, "r")
    with ProcessGroup(tmp_path / "second") as procs:  # a group reports any failed member
        t = time.monotonic()
        with pytest.raises(LaunchError, match="the cloud trainer did not come online within 2 s"):
            # a process that lives but never publishes a cloud status
            start_cloud(procs, ["http.server", "0", "--bind", "127.0.0.1"], url, "r",
                        name="quiet", timeout=2)
        assert time.monotonic() - t < 15
    assert procs.returncode("quiet") is not None  # stopped on leaving the group
