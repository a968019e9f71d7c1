"""``run_cloud``: the cloud trainer's entry point, the one module that knows both the loop and
the modes.

It takes the mode's strategy from ``cloud_trainer.modes.registry`` and hands it to the
training loop (``cloud_trainer.loop``), which never imports a mode by name: so the
loop, the modes and this module import one another in one direction only.
"""

from __future__ import annotations

import threading
from typing import Any

from cloud_trainer.config import CloudConfig
from cloud_trainer.group import Group, GroupEnv, check_group_options
from cloud_trainer.loop import CloudRun
from cloud_trainer.modes.registry import strategy_for

__all__ = ["CloudConfig", "CloudRun", "build_run", "run_cloud"]


def build_run(cfg: CloudConfig, group: Group | None = None) -> CloudRun:
    """The run of ``cfg`` with its mode's strategy: checked, resumed, not yet connected.

    ``group``: this process is one worker of several (``cloud_trainer.group``).
    """
    cfg.check()
    if group is not None:
        check_group_options(cfg.mode, cfg.amp, cfg.fleet_average)
    return CloudRun(cfg, strategy_for(cfg), group)


def run_cloud(cfg: CloudConfig, stop: threading.Event | None = None) -> dict[str, Any]:
    """Train until the run is done (see ``cloud_trainer.loop``); returns the summary dict.

    ``stop`` (optional) ends the run early, as if it went idle. Raises
    RunIncompleteError (a HiertrainError; its ``summary`` attribute holds the summary)
    when devices are missing or incomplete at the end, after writing everything that
    was trained.
    """
    env = GroupEnv.from_env()
    if env is None:
        return build_run(cfg).run(stop)
    cfg.check()
    group = Group(env)
    try:
        return build_run(cfg, group).run(stop)
    finally:
        group.close()
