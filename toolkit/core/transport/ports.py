"""Free local TCP ports, for anything that starts a listener on this machine.

In the core because the edge runtime needs one too (``edge-runtime cluster`` picks the
rendezvous port of its local ranks), and the runtimes may not import ``toolkit.lab``.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago.

    The OS picks it (bind to port 0); another process could grab it before the
    broker binds, which is why the brokers retry with a new port on EADDRINUSE.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
