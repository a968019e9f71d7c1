"""Board profiles ship inside the wheel: a board's venv has no repository.

``firmware_configs/`` at the top of the repository is the one source of truth; it is a
data-only package, so the wheel carries its YAML files and ``toolkit.core.artifacts.boards``
finds them through ``importlib.resources`` in an installed copy. Building the wheel takes
about two seconds (offline: ``pip wheel --no-build-isolation``, no dependencies).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``toolkit bundle`` packs (``toolkit.deploy.wheel``: built from a clean copy of
    the sources, so no build/ or *.egg-info is left in the tree or raced for by xdist)."""
    from toolkit.deploy.wheel import build_wheel, wheel_name

    whl = tmp_path_factory.mktemp("dist") / wheel_name()
    whl.write_bytes(build_wheel())
    return whl


def test_the_wheel_carries_every_board_profile_and_schema(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    profiles = sorted(p.name for p in (REPO / "firmware_configs").glob("*.yaml"))
    assert {"rpi4.yaml", "rpi5.yaml", "jetson-orin-nano.yaml"} <= set(profiles)
    for name in profiles:
        assert f"firmware_configs/{name}" in names
    schemas = sorted(p.name for p in (REPO / "toolkit/core/artifacts/schemas").glob("*.json"))
    for name in schemas:
        assert f"toolkit/core/artifacts/schemas/{name}" in names
    assert "toolkit/deploy/board-requirements.txt" in names  # what toolkit bundle packs


def test_an_installed_copy_outside_the_repository_loads_its_profiles(
        wheel: Path, tmp_path: Path) -> None:
    """The wheel unpacked (what pip installs of a pure-Python wheel) away from the
    repository: ``toolkit boards`` material comes from the installed copy, and
    ``$HIERTRAIN_BOARDS`` still overrides it."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "robot.yaml").write_text(
        (REPO / "firmware_configs/rpi4.yaml").read_text().replace("name: rpi4", "name: robot"))
    code = ("import json, toolkit.core.artifacts.boards as b; "
            "print(json.dumps({'module': b.__file__, 'dir': str(b.configs_dir()), "
            "'boards': b.list_boards(), 'spool': b.load_board('rpi4').spool_mb}))")
    env = {k: v for k, v in os.environ.items() if k != "HIERTRAIN_BOARDS"}
    env["PYTHONPATH"] = str(site)  # first on sys.path: before any editable install
    out = tmp_path / "elsewhere"
    out.mkdir()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=out, env=env)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert Path(got["module"]).is_relative_to(site)
    assert Path(got["dir"]) == site / "firmware_configs"
    assert got["boards"] == sorted(p.stem for p in (REPO / "firmware_configs").glob("*.yaml"))
    assert got["spool"] == 512
    env["HIERTRAIN_BOARDS"] = str(mine)
    code = ("import toolkit.core.artifacts.boards as b; "
            "print(b.list_boards(), b.load_board('robot').name)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60, cwd=out, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["['robot']", "robot"]


def test_edge_train_takes_the_profile_where_flags_are_unset_and_flags_win() -> None:
    """``edge-runtime train --board``: the profile fills --threads and --spool-mb when they
    are unset; a flag given wins and is named in the log line."""
    from edge_runtime.board import apply_board, check_batch
    from edge_runtime.cli import build_parser
    from toolkit.core.artifacts.boards import load_board

    base = ["train", "--artifacts", "a", "--device-id", "d", "--board", "rpi5"]
    args = build_parser().parse_args(base)
    got = apply_board(args)
    assert got is not None and (args.threads, args.spool_mb) == (4, 1024.0)
    assert got.taken == {"--threads": "4", "--spool-mb": "1024 MB"} and not got.kept
    args = build_parser().parse_args([*base, "--threads", "1", "--spool-mb", "0.5"])
    got = apply_board(args)
    assert (args.threads, args.spool_mb) == (1, 0.5)
    assert got.kept == {"--threads": "1", "--spool-mb": "0.5 MB"} and not got.taken
    assert "flags given win: --threads 1, --spool-mb 0.5 MB" in got.describe()
    assert apply_board(build_parser().parse_args(base[:-2])) is None  # no --board: no profile
    rpi5 = load_board("rpi5")
    assert check_batch(rpi5, rpi5.default_batch) is None
    assert "exported with batch 7" in check_batch(rpi5, 7)


def test_a_bundle_without_a_source_tree_to_build_from_says_no_wheel(tmp_path: Path) -> None:
    from toolkit.core.errors import HiertrainError
    from toolkit.deploy.wheel import build_wheel

    with pytest.raises(HiertrainError, match=r"no hiertrain source tree at .*pass --no-wheel"):
        build_wheel(tmp_path)  # what an installed toolkit (no checkout) would meet
