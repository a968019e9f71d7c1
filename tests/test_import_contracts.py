"""The import rule (runtimes import only toolkit's run-time core; no cycles) holds, and can fail.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``); ``lint-imports``
reads the source without importing it. Each "can fail" test copies the three
packages into a temporary tree, adds one violating import there and checks that
the named contract breaks: a contract that cannot fail guards nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("toolkit", "edge_runtime", "cloud_trainer")

RUNTIMES_RULE = "The runtimes import only toolkit's run-time core"
CORE_RULE = "The run-time core imports neither runtime nor the build side"
INDEPENDENCE_RULE = "Board and server never import each other"
LAYERS_RULE = "Build-side layers"
CYCLES_RULE = "No import cycles between sibling modules or packages"


def _lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the tree at ``root``, resolving the packages from there first."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    code = "import sys; from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def _broken(out: str) -> set[str]:
    """Names of the contracts the report lists as BROKEN."""
    return {line.rsplit(" BROKEN", 1)[0].strip() for line in out.splitlines()
            if line.rstrip().endswith("BROKEN")}


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the three packages and pyproject.toml, the .py sources only."""
    root = tmp_path_factory.mktemp("imports")
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, root / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.json", "*.pyc"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_the_contracts_hold_on_the_repository() -> None:
    r = _lint(REPO)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "BROKEN" not in r.stdout
    for rule in (RUNTIMES_RULE, CORE_RULE, INDEPENDENCE_RULE, LAYERS_RULE, CYCLES_RULE):
        assert rule in r.stdout, r.stdout


@pytest.mark.parametrize("module, line, rule", [
    # a board module reaching the exporter: the build side would ship to every robot
    ("edge_runtime/_bad.py", "from toolkit.build import export\n", RUNTIMES_RULE),
    # the server reaching the lab's brokers
    ("cloud_trainer/_bad.py", "import toolkit.lab.broker\n", RUNTIMES_RULE),
    # a function-level import counts as much as a top-level one
    ("edge_runtime/_bad.py", "def f():\n    from toolkit.cli import main\n", RUNTIMES_RULE),
    # the core reaching a runtime
    ("toolkit/core/_bad.py", "import edge_runtime.train\n", CORE_RULE),
    # the core reaching the build side
    ("toolkit/core/protocol/_bad.py", "from toolkit.plan import planner\n", CORE_RULE),
    # the board importing the server
    ("edge_runtime/_bad.py", "import cloud_trainer.ingest\n", INDEPENDENCE_RULE),
    # planning reaching up into the exporter
    ("toolkit/plan/_bad.py", "import toolkit.build.export\n", LAYERS_RULE),
    # a cycle: the wire format importing back a module that imports it
    ("toolkit/core/protocol/_bad.py", "import toolkit.core.protocol.codec\n", None),
])
def test_a_violating_import_breaks_its_contract(tree: Path, module: str, line: str,
                                               rule: str | None) -> None:
    target = tree / module
    extra: list[tuple[Path, str]] = [(target, line)]
    if rule is None:
        # close a loop: codec imports _bad, and _bad imports codec
        rule = CYCLES_RULE
        codec = tree / "toolkit/core/protocol/codec.py"
        loop = "\nfrom toolkit.core.protocol import _bad  # noqa\n"
        extra.append((codec, codec.read_text() + loop))
    saved = {path: path.read_text() if path.exists() else None for path, _ in extra}
    try:
        for path, text in extra:
            path.write_text(text)
        r = _lint(tree)
    finally:
        for path, text in saved.items():
            if text is None:
                path.unlink()
            else:
                path.write_text(text)
    assert r.returncode != 0, r.stdout[-3000:]
    broken = _broken(r.stdout)
    assert any(b.startswith(rule) for b in broken), (rule, broken, r.stdout[-3000:])
    # the report names the violating module itself, not only violations the tree already had
    assert "_bad" in r.stdout, r.stdout[-3000:]
