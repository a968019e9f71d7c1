"""MQTT transport on paho-mqtt 2.x.

Design notes (the why):

* paho's own network thread (``loop_start``) does all socket work. Our paho
  callbacks only record state and hand messages to the application handlers,
  which in turn must only enqueue them (see :class:`toolkit.core.transport.base.Link`).
* MQTT 5 by default, because request/response needs ResponseTopic and
  CorrelationData. The embedded amqtt broker speaks only MQTT 3.1.1 and answers
  an MQTT 5 CONNECT with "unsupported protocol version"; with ``protocol="auto"``
  (the default) the link then reconnects as 3.1.1 and carries those properties
  in a small envelope in front of the payload
  (``toolkit.core.transport.base.wrap_properties``). Messages
  without properties -- activations, gradients -- are never wrapped, so bulk
  payloads are not copied and foreign clients see the same bytes.
* The first connect retries with exponential backoff (0.5 s doubling to 8 s)
  within a deadline, so starting edge and cloud before the broker works. After
  that paho reconnects by itself, and we re-subscribe in ``on_connect``.
  Links use clean sessions unless ``session_expiry`` is given: then the
  session (subscriptions and the QoS 1 messages queued for them) outlives a
  disconnect or a crash of this process by that many seconds, for a
  subscriber with a stable client id that must not miss what was published
  while it was down (the cloud trainer, ``docs/delivery.md``).
* ``publish`` blocks until the PUBACK for QoS 1: a caller that returned from
  publish knows the broker holds the message, and the blocking gives natural
  back-pressure on big activation batches.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from toolkit.core.errors import BrokerUnreachableError, HiertrainError
from toolkit.core.transport.base import (
    BrokerAddress,
    Link,
    MessageHandler,
    _no_op,
    check_properties,
    parse_url,
    topic_matches,
    unwrap_properties,
    wrap_properties,
)

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode
except ImportError:  # absent, or paho 1.x (no enums); serial:// links do not need it
    raise HiertrainError(
        "mqtt:// and mqtts:// links need paho-mqtt 2.x, which is not installed: "
        "pip install 'paho-mqtt>=2' (serial:// links work without it)"
    ) from None

log = logging.getLogger(__name__)

#: Backoff of the first connect: start, factor 2, cap.
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 8.0

# CONNACK codes. 132 is MQTT 5 "unsupported protocol version"; paho maps the
# 3.1.1 code 1 a v3 broker answers to a v5 CONNECT onto the same value.
_RC_UNSUPPORTED_PROTOCOL = 132
# Refusals that will not go away by retrying: bad credentials, not authorized,
# banned, bad client id (3.1.1 codes 2, 4, 5 map onto the v5 values here).
_RC_FATAL = frozenset({133, 134, 135, 138, 140})
_RC_AUTH = frozenset({134, 135})  # bad user name or password, not authorized


class _PahoNoiseFilter(logging.Filter):
    """Demote paho's "Client is not connected" ERROR to DEBUG.

    paho logs it once per failed background reconnect; our own WARNING
    ("lost connection ... reconnecting") already says that, once.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.getMessage().startswith(
            "Client is not connected"
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_paho_log = logging.getLogger(f"{__name__}.paho")
_paho_log.addFilter(_PahoNoiseFilter())

PROTOCOLS = {"auto": mqtt.MQTTv5, "5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


def _to_paho_properties(props: Mapping[str, Any]) -> Properties | None:
    if not props:
        return None
    p = Properties(PacketTypes.PUBLISH)
    if "response_topic" in props:
        p.ResponseTopic = props["response_topic"]
    if "correlation_data" in props:
        p.CorrelationData = props["correlation_data"]
    if "user_properties" in props:
        p.UserProperty = props["user_properties"]
    return p


def _from_paho_properties(p: Properties | None) -> dict[str, Any]:
    props: dict[str, Any] = {}
    if p is None:
        return props
    if hasattr(p, "ResponseTopic"):
        props["response_topic"] = p.ResponseTopic
    if hasattr(p, "CorrelationData"):
        props["correlation_data"] = bytes(p.CorrelationData)
    if hasattr(p, "UserProperty"):
        props["user_properties"] = [(str(k), str(v)) for k, v in p.UserProperty]
    return props


def _describe_os_error(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused the connection (nothing listening?)"
    if isinstance(exc, socket.gaierror):
        return f"host name not resolved ({exc})"
    if isinstance(exc, TimeoutError):
        return f"unreachable (no answer within {timeout:.1f} s)"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc})"
    return f"unreachable ({type(exc).__name__}: {exc})"


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Disable Nagle: small request/reply messages otherwise wait ~40-90 ms for delayed ACKs."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # TLS wrappers and unix sockets may refuse; harmless
        pass


class MqttLink(Link):
    """A :class:`Link` over MQTT (paho-mqtt 2.x, MQTT 5 by default).

    Handlers run on paho's network thread: enqueue and return; never train,
    sleep or call blocking link methods that wait for the broker there (a
    ``publish`` from a handler returns once queued, since its acknowledgement
    would arrive on the very thread that is waiting).
    """

    def __init__(
        self,
        address: BrokerAddress | str,
        client_id: str,
        *,
        protocol: str = "auto",
        keepalive: int = 30,
        max_inflight: int = 64,
        max_queued: int = 1024,
        publish_timeout: float = 60.0,
        tls_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        session_expiry: int | None = None,
        receive_maximum: int | None = None,
    ) -> None:
        """Create an unconnected link.

        ``protocol``: "auto" (MQTT 5, falling back to 3.1.1 when the broker
        refuses 5), "5" or "3.1.1". ``max_inflight`` unacknowledged QoS 1
        messages keep the pipe full; ``max_queued`` bounds paho's outgoing
        queue so a dead broker turns into an error instead of unbounded memory.
        ``username``/``password`` override credentials in the URL (the CLIs
        read them from a file or the environment, :mod:`toolkit.core.security`);
        ``tls_context`` replaces the system-CA default for ``mqtts://``.
        ``session_expiry`` (seconds > 0): a persistent session (MQTT 5 clean start
        off + Session Expiry Interval; 3.1.1 clean session off, kept until the
        broker's own limit); None: clean sessions.
        ``receive_maximum`` (> 0): acknowledge incoming QoS 1 messages manually
        (:meth:`defer_ack`; a handler that does not defer is acknowledged when it
        returns) and ask an MQTT 5 broker to send at most this many unacknowledged
        ones; None: paho acknowledges each message when its handlers return.
        """
        if receive_maximum is not None and not 0 < receive_maximum <= 65535:
            raise ValueError("receive_maximum must be 1..65535 (None: automatic acks)")
        if session_expiry is not None and session_expiry <= 0:
            raise ValueError("session_expiry must be > 0 seconds (None: clean sessions)")
        if isinstance(address, str):
            address = parse_url(address)
        if username is not None:
            address = dataclasses.replace(address, username=username, password=password)
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, not {protocol!r}")
        super().__init__(address, client_id)
        self._protocol_pref = protocol
        self._protocol = PROTOCOLS[protocol]
        self._keepalive = keepalive
        self._max_inflight = max_inflight
        self._max_queued = max_queued
        self.publish_timeout = publish_timeout
        self._tls_context = tls_context
        self.session_expiry = session_expiry
        self.receive_maximum = receive_maximum
        self.end_session = False
        self._will: tuple[str, bytes, int, bool] | None = None
        self._subs: dict[str, tuple[int, MessageHandler]] = {}
        self._subs_lock = threading.Lock()
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._ever_connected = False
        self._v5_confirmed = False
        # CONNACK of the attempt in progress, set by _on_connect.
        self._connack: ReasonCode | None = None
        self._connack_event = threading.Event()
        # SUBACK results by message id; waiters pop their own entries.
        self._suback_cond = threading.Condition()
        self._suback: dict[int, list[ReasonCode]] = {}
        self._resub_mids: list[int] = []
        self._in_callback = threading.local()
        # PUBACK reason codes that refused a publish (MQTT 5: e.g. "Not authorized"
        # when the broker's ACL forbids the topic), by message id.
        self._refused_pubs: dict[int, ReasonCode] = {}
        self._refused_lock = threading.Lock()

    # ----------------------------------------------------------------- state
    @property
    def is_connected(self) -> bool:
        return self._connected.is_set()

    @property
    def closed(self) -> bool:
        return self._closing.is_set()

    @property
    def protocol_version(self) -> str:
        """Protocol the broker accepted: "5" or "3.1.1" (after the auto fallback)."""
        return "5" if self._protocol == mqtt.MQTTv5 else "3.1.1"

    # --------------------------------------------------------------- connect
    def set_will(self, topic: str, payload: bytes, retain: bool = True, qos: int = 1) -> None:
        if self._client is not None:
            raise RuntimeError("set_will() must be called before connect()")
        self._will = (topic, bytes(payload), qos, retain)

    def _needs_probe(self) -> bool:
        """Whether "auto" must first check for MQTT 5 with a bare CONNECT.

        amqtt parses every CONNECT as 3.1.1 before it checks the protocol
        level; the MQTT 5 will-properties field shifts the will and
        username fields, amqtt then waits for bytes that never come, and no
        CONNACK is sent. A CONNECT without will and credentials parses far
        enough to be refused cleanly, so that is what we probe with.
        """
        return (
            self._protocol_pref == "auto"
            and self._protocol == mqtt.MQTTv5
            and not self._v5_confirmed
            and (self._will is not None or self.address.username is not None)
        )

    def _on_probe_connack(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._connack = reason_code
        self._connack_event.set()

    def _new_client(self, probe: bool = False) -> mqtt.Client:
        v5 = self._protocol == mqtt.MQTTv5
        persistent = self.session_expiry is not None and not probe
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            # The probe must not take over (and so end) a persistent session of ours.
            client_id=f"{self.client_id}-probe" if probe else self.client_id,
            protocol=self._protocol,
            clean_session=None if v5 else not persistent,
            manual_ack=self.receive_maximum is not None and not probe,
        )
        client.enable_logger(_paho_log)
        client.max_inflight_messages_set(self._max_inflight)
        client.max_queued_messages_set(self._max_queued)
        client.reconnect_delay_set(1, int(BACKOFF_MAX_S))
        if probe:
            client.on_connect = self._on_probe_connack
            if self.address.tls:
                client.tls_set_context(self._tls_context or ssl.create_default_context())
            return client
        if self.address.username is not None:
            client.username_pw_set(self.address.username, self.address.password)
        if self.address.tls:
            client.tls_set_context(self._tls_context or ssl.create_default_context())
        if self._will is not None:
            topic, payload, qos, retain = self._will
            client.will_set(topic, payload, qos=qos, retain=retain)
        client.on_socket_open = _no_delay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        return client

    def _stop_client(self, client: mqtt.Client) -> None:
        try:
            client.disconnect()
        except Exception:  # noqa: BLE001 -- best effort on a half-open client
            log.debug("disconnect during cleanup failed", exc_info=True)
        client.loop_stop()

    def _attempt(
        self, deadline: float, probe: bool = False
    ) -> tuple[str, ReasonCode | None] | None:
        """One connect attempt; None on success, else (reason, CONNACK code or None).

        With ``probe`` the session is a bare MQTT 5 CONNECT that is closed again
        at once: success means the broker answered anything but "unsupported
        protocol version" (even "not authorized" proves it speaks MQTT 5).
        """
        client = self._new_client(probe)
        if not probe:
            self._client = client
        self._connack = None
        self._connack_event.clear()
        remaining = max(0.1, deadline - time.monotonic())
        client.connect_timeout = min(remaining, 5.0)
        try:
            if self._protocol == mqtt.MQTTv5:
                persistent = self.session_expiry is not None and not probe
                props = Properties(PacketTypes.CONNECT)
                if persistent:
                    props.SessionExpiryInterval = int(self.session_expiry or 0)
                if self.receive_maximum is not None and not probe:
                    props.ReceiveMaximum = int(self.receive_maximum)
                client.connect(self.address.host, self.address.port, self._keepalive,
                               clean_start=not persistent,
                               properties=props if (persistent or self.receive_maximum) else None)
            else:
                client.connect(self.address.host, self.address.port, self._keepalive)
        except ssl.SSLCertVerificationError as exc:
            # Retrying cannot fix a certificate the CA file does not vouch for.
            if not probe:
                self._client = None
            raise HiertrainError(
                f"TLS to MQTT broker at {self.address.url} failed: the broker's certificate "
                f"is not trusted ({exc.verify_message or exc}); check --ca-file and that the "
                "certificate names this host"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            return _describe_os_error(exc, client.connect_timeout), None
        # Run the handshake on this thread with client.loop(): a failed attempt
        # then has no network thread to stop (loop_stop() can sit out paho's
        # 1 s reconnect sleep), and paho's own reconnect logic stays out of it.
        wait = max(0.1, min(deadline - time.monotonic(), 10.0))
        handshake_deadline = time.monotonic() + wait
        lost = False
        while not self._connack_event.is_set():
            left = handshake_deadline - time.monotonic()
            if left <= 0:
                break
            if client.loop(min(left, 0.1)) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                lost = not self._connack_event.is_set()
                break
        rc = self._connack
        if rc is None:
            self._abandon(client)
            if lost:
                return "closed the connection during the MQTT handshake", None
            return f"accepted TCP but sent no CONNACK within {wait:.1f} s", None
        if probe:
            self._abandon(client)
            if rc.value == _RC_UNSUPPORTED_PROTOCOL:
                return f"refused the MQTT session ({rc})", rc
            return None
        if rc.is_failure:
            self._abandon(client)
            return f"refused the MQTT session ({rc})", rc
        client.loop_start()
        return None

    @staticmethod
    def _abandon(client: mqtt.Client) -> None:
        """Close a client whose handshake failed (no network thread was started)."""
        try:
            client.disconnect()
            for _ in range(5):  # flush DISCONNECT and let paho close the socket
                if client.socket() is None or client.loop(0.02) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
        except Exception:  # noqa: BLE001 -- best effort on a half-open client
            log.debug("cleanup of a failed connect attempt failed", exc_info=True)

    def connect(self, timeout: float = 30.0) -> None:
        """Connect within ``timeout`` s, retrying with backoff; subscriptions are live on return.

        Each retry is logged with its reason; when the deadline passes the last
        reason is raised as HiertrainError naming the URL.
        """
        if self._connected.is_set():
            return
        if self._closing.is_set():
            raise RuntimeError("link was closed; create a new one")
        where = f"{self.address.host}:{self.address.port}"
        deadline = time.monotonic() + timeout
        delay = BACKOFF_START_S
        while True:
            probe = self._needs_probe()
            failure = self._attempt(deadline, probe=probe)
            if failure is None:
                if probe:
                    self._v5_confirmed = True
                    continue
                break
            reason, rc = failure
            if rc is not None and rc.value == _RC_UNSUPPORTED_PROTOCOL:
                if self._protocol_pref == "auto" and self._protocol == mqtt.MQTTv5:
                    log.info("broker at %s does not speak MQTT 5; using MQTT 3.1.1", where)
                    self._protocol = mqtt.MQTTv311
                    continue
            if rc is not None and rc.value in _RC_FATAL | {_RC_UNSUPPORTED_PROTOCOL}:
                self._client = None
                hint = ""
                if rc.value in _RC_AUTH:
                    hint = ("; check --username and the password (--password-file or "
                            "HIERTRAIN_MQTT_PASSWORD)" if self.address.username is not None
                            else "; the broker requires a user name and password (--username "
                            "and --password-file or HIERTRAIN_MQTT_PASSWORD)")
                raise HiertrainError(f"MQTT broker at {self.address.url} {reason}{hint}")
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closing.is_set():
                self._client = None
                raise BrokerUnreachableError(
                    f"cannot reach MQTT broker at {self.address.url}: {reason}")
            pause = min(delay, remaining)
            log.warning("broker at %s %s, retrying in %.1f s", where, reason, pause)
            if self._closing.wait(pause):
                self._client = None
                raise HiertrainError(f"link to {self.address.url} closed while connecting")
            delay = min(delay * 2, BACKOFF_MAX_S)
        # Connected: wait for the SUBACKs of subscriptions registered before connect.
        with self._suback_cond:
            mids = list(self._resub_mids)
        for mid in mids:
            codes = self._wait_suback(mid, max(0.5, deadline - time.monotonic()))
            refused = [str(c) for c in codes if c.is_failure]
            if refused:
                raise HiertrainError(
                    f"MQTT broker at {self.address.url} refused a subscription: {refused[0]}"
                )
        log.info(
            "connected to %s as %r (MQTT %s)",
            self.address.url,
            self.client_id,
            self.protocol_version,
        )

    # ------------------------------------------------------- paho callbacks
    def _on_connect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        if reason_code.is_failure:
            self._connack = reason_code
            self._connack_event.set()
            return
        # Snapshot and mark connected under one lock hold: a concurrent
        # subscribe() is then either in the snapshot or sees "connected" and
        # subscribes itself, never neither.
        with self._subs_lock:
            subs = [(t, qos) for t, (qos, _) in self._subs.items()]
            self._connected.set()
        mids = []
        for topic, qos in subs:
            rc, mid = client.subscribe(topic, qos)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                mids.append(mid)
        with self._suback_cond:
            for old in self._resub_mids:  # nobody waits for a reconnect's SUBACKs
                self._suback.pop(old, None)
            self._resub_mids = mids
        self._count_connect()
        if self._ever_connected:
            log.info("reconnected to %s, re-subscribed %d topic(s)", self.address.url, len(subs))
        self._ever_connected = True
        self._connack = reason_code
        self._connack_event.set()

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: Any,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is not self._client:
            return
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected and not self._closing.is_set():
            log.warning(
                "lost connection to %s (%s); reconnecting in the background",
                self.address.url,
                reason_code,
            )

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._suback_cond:
            self._suback[mid] = list(reason_codes)
            self._suback_cond.notify_all()

    def _on_publish(
        self,
        client: mqtt.Client,
        userdata: Any,
        mid: int,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        # Runs before paho marks the message published, so publish() sees it.
        with self._refused_lock:
            if reason_code.is_failure:
                self._refused_pubs[mid] = reason_code
            else:
                self._refused_pubs.pop(mid, None)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        payload, props = unwrap_properties(msg.payload)
        if msg.properties is not None:
            props = {**props, **_from_paho_properties(msg.properties)}
        topic = msg.topic
        self._count_received(len(payload))
        with self._subs_lock:
            handlers = [h for f, (_, h) in self._subs.items() if topic_matches(f, topic)]
        if not handlers:
            log.debug("message on %s matches no handler", topic)
        manual = self.receive_maximum is not None and msg.qos > 0
        self._in_callback.active = True
        self._in_callback.message = (client, msg.mid, msg.qos) if manual else None
        self._in_callback.deferred = False
        try:
            for handler in handlers:
                try:
                    handler(topic, payload, dict(props))
                except Exception:  # noqa: BLE001 -- a handler bug must not kill paho's thread
                    log.exception("handler for %s raised; message dropped", topic)
        finally:
            self._in_callback.active = False
            self._in_callback.message = None
            if manual and not self._in_callback.deferred:
                client.ack(msg.mid, msg.qos)

    def defer_ack(self) -> Callable[[], None]:
        """See :meth:`Link.defer_ack`. The release acknowledges on the connection the
        message came on; after a reconnect the broker resends what was not acknowledged
        (the receiver's ledger drops the duplicate)."""
        message = getattr(self._in_callback, "message", None)
        if message is None:
            return _no_op
        self._in_callback.deferred = True
        client, mid, qos = message
        once = threading.Lock()

        def release() -> None:
            if once.acquire(blocking=False):
                client.ack(mid, qos)

        return release

    # -------------------------------------------------------------- messaging
    def _wait_suback(self, mid: int, timeout: float) -> list[ReasonCode]:
        deadline = time.monotonic() + timeout
        with self._suback_cond:
            while mid not in self._suback:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HiertrainError(
                        f"MQTT broker at {self.address.url} did not confirm a subscription "
                        f"within {timeout:.1f} s"
                    )
                self._suback_cond.wait(remaining)
            return self._suback.pop(mid)

    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1) -> None:
        """Register ``handler`` for ``topic`` (wildcards allowed) and, if connected,
        block until the broker confirmed it (bounded by ``publish_timeout``).

        One handler per filter: subscribing the same filter again replaces it.
        Avoid overlapping filters -- the broker may deliver a message once per
        matching subscription.
        """
        with self._subs_lock:
            self._subs[topic] = (qos, handler)
            connected = self._connected.is_set()
        client = self._client
        if client is None or not connected:
            return  # subscribed in _on_connect
        rc, mid = client.subscribe(topic, qos)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            return  # connection dropped meanwhile; _on_connect will subscribe
        if getattr(self._in_callback, "active", False):
            return  # SUBACK arrives on this thread; cannot wait for it here
        codes = self._wait_suback(mid, self.publish_timeout)
        for code in codes:
            if code.is_failure:
                raise HiertrainError(
                    f"MQTT broker at {self.address.url} refused subscription to {topic!r}: {code}"
                )

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        properties: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        """Publish and, for QoS >= 1, block until the broker's acknowledgement.

        ``properties`` may hold ``response_topic``, ``correlation_data`` and
        ``user_properties``; they travel as MQTT 5 properties, or in an envelope
        on a 3.1.1 connection. Raises HiertrainError on timeout, a full outgoing
        queue, or (QoS 0) no connection.
        """
        client = self._client
        if client is None:
            raise RuntimeError("publish() before connect()")
        if self._closing.is_set():
            raise RuntimeError("publish() on a closed link")
        data = bytes(payload) if not isinstance(payload, bytes) else payload
        props = check_properties(properties) if properties else {}
        if props and self._protocol != mqtt.MQTTv5:
            wire: bytes = wrap_properties(data, props)
            paho_props = None
        else:
            wire = data
            paho_props = _to_paho_properties(props)
        info = client.publish(topic, wire, qos=qos, retain=retain, properties=paho_props)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise HiertrainError(
                f"outgoing MQTT queue to {self.address.url} is full ({self._max_queued} "
                "messages): the broker is not keeping up or the connection is down"
            )
        if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
            if qos == 0:
                raise HiertrainError(f"not connected to MQTT broker at {self.address.url}")
            # paho keeps QoS>0 messages and sends them after reconnecting, but
            # leaves rc=NO_CONN, which makes wait_for_publish() raise at once.
            info.rc = MQTTErrorCode.MQTT_ERR_SUCCESS
        elif info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_AGAIN):
            raise HiertrainError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        if qos > 0 and not getattr(self._in_callback, "active", False):
            limit = self.publish_timeout if timeout is None else timeout
            try:
                info.wait_for_publish(limit)
            except (RuntimeError, ValueError) as exc:
                raise HiertrainError(f"publish to {topic!r} failed: {exc}") from exc
            if not info.is_published():
                raise HiertrainError(
                    f"MQTT broker at {self.address.url} did not acknowledge a "
                    f"{len(data)}-byte message on {topic!r} within {limit:.1f} s"
                )
            with self._refused_lock:
                refused = self._refused_pubs.pop(info.mid, None)
            if refused is not None:
                raise HiertrainError(
                    f"MQTT broker at {self.address.url} refused the publish to {topic!r} "
                    f"({refused}): this client may not write there (broker ACL)"
                )
        self._count_sent(len(data))

    def close(self) -> None:
        """Send DISCONNECT (so the broker drops the will) and stop paho's thread.

        With ``end_session`` set, a persistent MQTT 5 session is discarded instead
        of kept (Session Expiry Interval 0 in the DISCONNECT): once a run is complete.
        """
        end_session = self.end_session
        self._closing.set()
        client, self._client = self._client, None
        self._connected.clear()
        if client is None:
            return
        if end_session and self.session_expiry is not None and self._protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
            try:
                client.disconnect(properties=props)
            except Exception:  # noqa: BLE001 -- best effort, as in _stop_client
                log.debug("disconnect ending the session failed", exc_info=True)
        self._stop_client(client)


def open_mqtt_link(address: BrokerAddress, client_id: str, **kw: Any) -> MqttLink:
    """Factory entry used by :func:`toolkit.core.transport.open_link`."""
    return MqttLink(address, client_id, **kw)
