"""The training modes both runtimes agree on: ``ht`` and the two baselines it is measured against.

==========  ====================================  ==================================
mode        edge                                  cloud
==========  ====================================  ==================================
``ht``      trains edge + exit head locally,      trains the cloud segment on the
            streams int8 cut activations, never   activations; nothing goes back
            waits (this method)
``split``   classic split learning: forward the   forward + backward of the cloud
            edge segment, send the activation,    segment, sends the gradient of
            wait for its gradient, backward       the activation back (``grad``
                                                  topic); one batch at a time
``cloud``   uploads the raw images losslessly     trains the whole network
            (``toolkit.core.protocol.images``); no compute      (``FullModel``) on them
==========  ====================================  ==================================

An edge announces its mode in its ``online`` status (``extra["mode"]``); an
``online`` status without one is an ``ht`` edge of an earlier version. The
cloud trainer announces its own in every status. A cloud trainer refuses the
messages of an edge running another mode (drop reason ``mode``) instead of
training on something else than it thinks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from toolkit.core.errors import HiertrainError

if TYPE_CHECKING:  # kept light: the CLIs import this module before torch
    from toolkit.core.protocol.messages import Status

MODES: tuple[str, ...] = ("ht", "split", "cloud")
DEFAULT_MODE = "ht"


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else HiertrainError naming the choices."""
    if mode not in MODES:
        raise HiertrainError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
    return mode


def announced_mode(status: Status) -> str | None:
    """The mode a status announces; None when it says nothing about it (not ``online``)."""
    mode = status.extra.get("mode")
    if mode is None and status.state == "online":
        return DEFAULT_MODE  # edges before modes existed were all ht
    return None if mode is None else str(mode)


def mismatch(device: str, device_mode: str, cloud_mode: str) -> str:
    """The one sentence both sides print when an edge and the cloud trainer disagree."""
    return (f"device {device!r} runs --mode {device_mode} but the cloud trainer runs --mode "
            f"{cloud_mode}; start the edges and the cloud trainer with the same --mode")
