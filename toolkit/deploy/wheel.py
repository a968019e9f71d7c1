"""What a board installs: the hiertrain wheel and the list of what the edge runtime imports.

A board needs hiertrain itself whether or not it is on a package index the board can reach,
so ``toolkit bundle`` packs a wheel built from this source tree (pure Python, one wheel for
every architecture) beside ``board-requirements.txt``, the edge runtime's imports and nothing
more, installed with ``pip install --no-deps`` (docs/deploy.md says why).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from toolkit import __version__
from toolkit.core.errors import HiertrainError

BOARD_REQUIREMENTS = "board-requirements.txt"
SOURCE_ROOT = Path(__file__).resolve().parents[2]
# A fixed time for every file in the wheel, so the same source gives the same bytes (the
# bundle is reproducible); 1980-01-01, the earliest a zip entry can carry.
_SOURCE_DATE_EPOCH = "315532800"


def board_requirements() -> bytes:
    return resources.files("toolkit.deploy").joinpath(BOARD_REQUIREMENTS).read_bytes()


def wheel_name() -> str:
    return f"hiertrain-{__version__}-py3-none-any.whl"


def build_wheel(source: Path = SOURCE_ROOT) -> bytes:
    """The hiertrain wheel built from ``source`` (a checkout: pyproject.toml beside the
    packages); HiertrainError when there is no source tree or the build fails."""
    if not (source / "pyproject.toml").is_file() or not (source / "edge_runtime").is_dir():
        raise HiertrainError(
            f"no hiertrain source tree at {source} to build the board's wheel from (toolkit "
            "was installed from a wheel); pass --no-wheel and install hiertrain on the board "
            "from your package index"
        )
    with tempfile.TemporaryDirectory(prefix="hiertrain-wheel-") as tmp:
        # A clean copy: setuptools builds in the tree it is given and keeps a build/ there,
        # whose stale files (a module deleted since) would end up in the wheel.
        tree = Path(tmp) / "src"
        tree.mkdir()
        for item in source.iterdir():
            if item.is_dir() and (item / "__init__.py").is_file():  # a package
                shutil.copytree(item, tree / item.name,
                                ignore=shutil.ignore_patterns("__pycache__"))
            elif item.name in ("pyproject.toml", "README.md", "LICENSE"):
                shutil.copy2(item, tree / item.name)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--quiet", "--wheel-dir", tmp, str(tree)],
            capture_output=True, text=True, timeout=600,
            env={**os.environ, "SOURCE_DATE_EPOCH": _SOURCE_DATE_EPOCH},
        )
        built = sorted(Path(tmp).glob("hiertrain-*.whl"))
        if proc.returncode != 0 or not built:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise HiertrainError(f"building the hiertrain wheel from {source} failed: "
                                 + " / ".join(tail))
        return built[0].read_bytes()
