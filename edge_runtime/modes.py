"""The training loop of each ``--mode``: the registry ``edge_runtime.train`` dispatches on.

Every loop has the same signature (:data:`ModeLoop`) and returns the mode's edge
report; ``run_training`` does the setup, the status protocol and the report around
it. The loops are imported when chosen: a board training ht never imports the
baselines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from toolkit.core.protocol.modes import check_mode

ModeLoop = Callable[..., dict[str, Any]]
"""``loop(cfg, manifest, codec, scheme, ds, backend, link, run, device) -> report``."""


def mode_loop(mode: str) -> ModeLoop:
    """The training loop of ``mode`` (ht, split or cloud)."""
    mode = check_mode(mode)
    if mode == "split":
        from edge_runtime.split_learning import split_loop

        return split_loop
    if mode == "cloud":
        from edge_runtime.upload import upload_loop

        return upload_loop
    from edge_runtime.ht_loop import ht_loop

    return ht_loop
