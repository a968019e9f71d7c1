"""Board profiles: the YAML files in ``firmware_configs/`` are the one source of truth.

``firmware_configs`` is a data-only package at the top of the repository, so the profiles
install with the wheel and are found by ``importlib.resources`` wherever hiertrain is
installed (a board's venv has no repository); ``$HIERTRAIN_BOARDS`` names another directory.

A profile says what the board can give hiertrain (memory budget, cores, a
sustained GFLOP/s figure for the planner), its usual link, and MQTT and serial
defaults. ``--board`` takes a profile name or a path to a YAML file of the same
schema, so a user can describe a board we do not ship.
"""

from __future__ import annotations

import importlib.resources
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from toolkit.core.errors import HiertrainError

SCHEMA_VERSION = 1
DEFAULT_SPOOL_MB = 256
"""Spool budget of a profile without ``mqtt.spool_mb``."""
PROFILES_PACKAGE = "firmware_configs"
_REPO_CONFIGS = Path(__file__).resolve().parents[3] / PROFILES_PACKAGE


def configs_dir() -> Path:
    """Where profiles live: ``$HIERTRAIN_BOARDS``, else the installed ``firmware_configs``
    package, else (an editable install made before it was a package) the repository's
    ``firmware_configs/`` next to this source tree."""
    env = os.environ.get("HIERTRAIN_BOARDS")
    if env:
        return Path(env)
    try:
        found = importlib.resources.files(PROFILES_PACKAGE)
    except ModuleNotFoundError:
        return _REPO_CONFIGS
    if isinstance(found, Path) and any(found.glob("*.yaml")):
        return found
    return _REPO_CONFIGS


@dataclass(frozen=True)
class BoardProfile:
    name: str
    description: str
    arch: str
    cores: int
    gflops: float
    total_mb: int
    budget_mb: int
    default_batch: int
    threads: int
    link_kbps: float
    link_latency_ms: float
    mqtt: dict = field(default_factory=dict)
    serial: dict = field(default_factory=dict)
    # Training speed relative to the machine that profiles for ``toolkit plan``; None:
    # the planner derives it from ``gflops`` and the speed it measures (docs/plan.md).
    relative_speed: float | None = None
    # Bytes the edge may keep in its on-disk spool while the broker, link or cloud is
    # down (``mqtt.spool_mb``; docs/delivery.md). Optional in a profile: DEFAULT_SPOOL_MB.
    spool_mb: int = DEFAULT_SPOOL_MB

    def to_dict(self) -> dict:
        return {
            "name": self.name, "description": self.description, "arch": self.arch,
            "cores": self.cores, "gflops": self.gflops, "total_mb": self.total_mb,
            "budget_mb": self.budget_mb, "default_batch": self.default_batch,
            "threads": self.threads, "link_kbps": self.link_kbps,
            "link_latency_ms": self.link_latency_ms, "relative_speed": self.relative_speed,
            "spool_mb": self.spool_mb,
        }


def _require(data: dict, path: str, kind: type, source: str):
    node = data
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            raise HiertrainError(f"board profile {source} lacks '{path}'")
        node = node[key]
    if kind is float and isinstance(node, int):
        node = float(node)
    if not isinstance(node, kind) or (kind in (int, float) and node <= 0):
        raise HiertrainError(
            f"board profile {source}: '{path}' must be a positive {kind.__name__}, got {node!r}"
        )
    return node


def _latency(data: dict, source: str) -> float:
    """``link.latency_ms``: optional, a number >= 0 (0 by default)."""
    value = (data.get("link") or {}).get("latency_ms", 0.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise HiertrainError(
            f"board profile {source}: 'link.latency_ms' must be a number >= 0, got {value!r}"
        )
    return float(value)


def parse_profile(data: object, source: str) -> BoardProfile:
    if not isinstance(data, dict):
        raise HiertrainError(f"board profile {source} is not a YAML mapping")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise HiertrainError(
            f"board profile {source} has schema_version {version!r}; this hiertrain reads "
            f"version {SCHEMA_VERSION}"
        )
    budget = _require(data, "memory.budget_mb", int, source)
    total = _require(data, "memory.total_mb", int, source)
    if budget > total:
        raise HiertrainError(
            f"board profile {source}: memory.budget_mb ({budget}) exceeds total_mb ({total})"
        )
    return BoardProfile(
        name=_require(data, "name", str, source),
        description=str(data.get("description", "")),
        arch=_require(data, "cpu.arch", str, source),
        cores=_require(data, "cpu.cores", int, source),
        gflops=_require(data, "cpu.gflops", float, source),
        total_mb=total,
        budget_mb=budget,
        default_batch=_require(data, "training.default_batch", int, source),
        threads=_require(data, "training.threads", int, source),
        link_kbps=_require(data, "link.kbps", float, source),
        link_latency_ms=_latency(data, source),
        relative_speed=(_require(data, "cpu.relative_speed", float, source)
                        if "relative_speed" in (data.get("cpu") or {}) else None),
        mqtt=dict(data.get("mqtt") or {}),
        spool_mb=(_require(data, "mqtt.spool_mb", int, source)
                  if "spool_mb" in (data.get("mqtt") or {}) else DEFAULT_SPOOL_MB),
        serial=dict(data.get("serial") or {}),
    )


def list_boards() -> list[str]:
    return sorted(p.stem for p in configs_dir().glob("*.yaml"))


def load_board(name_or_path: str) -> BoardProfile:
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = configs_dir() / f"{name_or_path}.yaml"
        if not path.is_file():
            raise HiertrainError(
                f"unknown board {name_or_path!r}; choose one of: {', '.join(list_boards())} "
                "(or pass a path to a profile .yaml)"
            )
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise HiertrainError(f"cannot read board profile {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        detail = "; ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())
        raise HiertrainError(f"board profile {path} is not valid YAML: {detail}") from None
    except UnicodeDecodeError:
        raise HiertrainError(f"board profile {path} is not UTF-8 text") from None
    return parse_profile(data, str(path))
