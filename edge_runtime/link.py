"""Opening the edge's broker link: client id, last will, bounded connect.

Shared by training and inference so both identify themselves the same way.
"""

from __future__ import annotations

import logging
import os
import secrets

from toolkit.core.protocol.messages import Status
from toolkit.core.protocol.topics import status_topic
from toolkit.core.security import LinkSecurity
from toolkit.core.transport import Link, LinkShape, open_link, shape_link

log = logging.getLogger("edge_runtime")


def client_id(role: str, run: str, device: str) -> str:
    """Unique per process: a restarted device must not collide with its own stale session
    (the broker would drop one of them) and tests may run several devices at once."""
    return f"ht-{role}-{run}-{device}-{os.getpid()}-{secrets.token_hex(3)}"


def connect_edge(
    broker: str, run: str, device: str, *, role: str, timeout: float, will: bool,
    shape: LinkShape | None = None, security: LinkSecurity | None = None,
) -> Link:
    """Connected link; with ``will`` the broker marks the device "offline" if it dies.

    With ``shape`` the link's publishes go through a modelled slow uplink
    (:class:`~toolkit.core.transport.shaping.ShapedLink`), so wall-clock time reflects it.
    ``security`` adds credentials, TLS files and message signing (:mod:`toolkit.core.security`):
    a device key file made for another device or run is refused here, and a run key is
    narrowed to this device's own key (:meth:`LinkSecurity.for_device`).

    ``Link.connect`` retries with backoff, logging each retry, and raises
    HiertrainError naming the URL once ``timeout`` has passed.
    """
    if security is not None:
        security = security.for_device(run, device)
    link = shape_link(open_link(broker, client_id(role, run, device), security=security), shape)
    if will:
        offline = Status(role="edge", device=device, run=run, state="offline",
                         message="connection lost without a clean disconnect")
        link.set_will(status_topic(run, device), offline.encode(), retain=True)
    log.info("connecting to %s as device %r (run %r)", link.address.url, device, run)
    link.connect(timeout=timeout)
    return link
