"""Message transports between edge and cloud, chosen by URL scheme.

``open_link("mqtt://127.0.0.1:1883", "edge-0")`` returns a :class:`Link`; the
runtimes never import a transport module directly, so adding one (a planned
``serial://`` link for boards without networking) is a new module plus one
line in ``_TRANSPORTS``. Transport modules are imported lazily so that, for
example, a serial-only deployment does not need paho installed.
"""

from __future__ import annotations

import importlib
from typing import Any

from toolkit.core.errors import HiertrainError
from toolkit.core.security import LinkSecurity
from toolkit.core.transport.base import (
    DEFAULT_PORTS,
    PROPERTY_KEYS,
    BrokerAddress,
    Link,
    MessageHandler,
    parse_url,
)
from toolkit.core.transport.shaping import (
    LinkShape,
    ShapedLink,
    drain_s,
    link_summary,
    shape_link,
)
from toolkit.core.transport.signing import RejectHandler, SignedLink

__all__ = [
    "DEFAULT_PORTS",
    "PROPERTY_KEYS",
    "BrokerAddress",
    "Link",
    "LinkShape",
    "MessageHandler",
    "ShapedLink",
    "SignedLink",
    "drain_s",
    "link_summary",
    "open_link",
    "parse_url",
    "shape_link",
]

# scheme -> "module:factory"; the factory is called as factory(address, client_id, **kw).
_TRANSPORTS: dict[str, str] = {
    "mqtt": "toolkit.core.transport.mqtt:open_mqtt_link",
    "mqtts": "toolkit.core.transport.mqtt:open_mqtt_link",
    "serial": "toolkit.core.transport.serial_link:open_serial_link",
}


def open_link(
    url: str,
    client_id: str,
    *,
    security: LinkSecurity | None = None,
    on_reject: RejectHandler | None = None,
    **kw: Any,
) -> Link:
    """Create an unconnected link for ``url``; call ``connect()`` on it next.

    ``security`` (:mod:`toolkit.core.security`) adds broker credentials and TLS
    files to an MQTT link and, with a run key or a device key, wraps the link in a
    :class:`~toolkit.core.transport.signing.SignedLink` (keyed per topic by
    :meth:`~toolkit.core.security.LinkSecurity.key_ring`) whose rejected incoming
    messages go to ``on_reject(reason, topic, detail)``. Other keyword
    arguments go to the transport's constructor (for MQTT see
    :class:`toolkit.core.transport.mqtt.MqttLink`).
    """
    if security is not None:
        security.check(url)
    if isinstance(url, str) and url.strip().lower().startswith("serial:"):
        from toolkit.core.transport.serial_link import parse_serial_url  # no port in the URL

        address: BrokerAddress = parse_serial_url(url)
    else:
        address = parse_url(url)
    target = _TRANSPORTS.get(address.scheme)
    if target is None:  # parse_url and _TRANSPORTS disagree: a bug, but say it plainly
        raise HiertrainError(f"no transport for {address.scheme}:// URLs ({url!r})")
    if security is not None and address.scheme in DEFAULT_PORTS:
        if security.username is not None:
            kw.setdefault("username", security.username)
            kw.setdefault("password", security.password)
        if address.tls and security.uses_tls_files:
            kw.setdefault("tls_context", security.tls_context())
    module_name, factory_name = target.split(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    link: Link = factory(address, client_id, **kw)
    keys = security.key_ring() if security is not None else None
    if keys is not None:
        link = SignedLink(link, keys, on_reject)
    return link
