"""``edge-runtime train --board NAME|PATH``: what a board profile sets on the edge.

An installed edge is started by the bundle's systemd unit with ``--board
/opt/hiertrain/board.yaml``; without it the edge would silently run on defaults that
know nothing of the board (torch's thread count, the export-time profile's spool
budget). What the edge can apply from a profile (``firmware_configs/*.yaml``):

* ``training.threads`` -> ``--threads``;
* ``mqtt.spool_mb`` -> ``--spool-mb`` (docs/delivery.md, "Spool");
* ``training.default_batch``: only a check. The exported program has a static batch
  (the manifest's), so a profile that asks for another batch is reported, not applied.

Flags given on the command line win over the profile. Not applied, on purpose:
``link.kbps`` / ``latency_ms`` describe the board's usual uplink for the planner; shaping a
real link down to them would only slow a real deployment (``--link-kbps`` is for
emulating a slow link on a fast one). ``memory.budget_mb`` is enforced by the unit's
``MemoryMax``, outside the process.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import Any

from toolkit.core.artifacts.boards import BoardProfile, load_board

log = logging.getLogger("edge_runtime")


@dataclass
class BoardSettings:
    """A profile and what it set: ``taken`` from the profile, ``kept`` explicit flags."""

    profile: BoardProfile
    source: str
    taken: dict[str, Any] = field(default_factory=dict)
    kept: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        taken = ", ".join(f"{k} {v}" for k, v in self.taken.items()) or "nothing"
        text = f"board profile {self.profile.name} ({self.source}): took {taken}"
        if self.kept:
            text += "; flags given win: " + ", ".join(f"{k} {v}" for k, v in self.kept.items())
        return text


def apply_board(args: argparse.Namespace) -> BoardSettings | None:
    """Fill ``args.threads`` and ``args.spool_mb`` from ``args.board`` where they are unset
    (None); HiertrainError for an unknown or malformed profile, before any work."""
    if not getattr(args, "board", None):
        return None
    profile = load_board(args.board)
    settings = BoardSettings(profile, args.board)
    for name, value, unit in (("threads", profile.threads, ""),
                              ("spool_mb", float(profile.spool_mb), " MB")):
        given = getattr(args, name)
        if given is None:
            setattr(args, name, value)
            settings.taken[f"--{name.replace('_', '-')}"] = f"{value:g}{unit}"
        else:
            settings.kept[f"--{name.replace('_', '-')}"] = f"{given:g}{unit}"
    return settings


def check_batch(profile: BoardProfile, batch_size: int) -> str | None:
    """A warning when the profile's default batch is not the exported program's (static)
    batch; None when they agree."""
    if profile.default_batch == batch_size:
        return None
    return (f"board profile {profile.name} trains batches of {profile.default_batch}, but the "
            f"artifacts were exported with batch {batch_size} (an exported program's batch is "
            f"fixed): training with {batch_size}; re-export with 'toolkit export --board "
            f"{profile.name}' to follow the profile")
