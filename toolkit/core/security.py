"""Link security options shared by every CLI: broker credentials, TLS, message signing.

One source of truth for how a process proves who it is to the broker and how
it checks the broker and its peers (docs/security.md has the threat model):

* **Credentials** (``--username`` plus ``--password-file`` or the environment
  variable ``HIERTRAIN_MQTT_PASSWORD``). A password on the command line -- in
  ``--broker mqtt://user:pass@host`` -- is refused: every local user can read
  a process's arguments (``ps``, ``/proc/<pid>/cmdline``) and shells keep them
  in their history.
* **TLS** (``mqtts://`` URLs; ``--ca-file`` to trust a private CA,
  ``--cert-file``/``--key-file`` for a client certificate).
* **Signing** (``--hmac-key-file`` or ``HIERTRAIN_HMAC_KEY``): every message
  is signed, every incoming one verified (:mod:`toolkit.core.transport.signing`).
  The cloud trainer takes the run key; a board takes its device key file
  (``toolkit keys derive``, :mod:`toolkit.core.keys`). An edge given the run key
  derives its own key from it and drops the run key (:meth:`LinkSecurity.for_device`),
  with a warning: fine in a lab, but a deployed board should hold only its own key.

Secrets live in :class:`LinkSecurity` fields that are left out of its repr,
and :func:`redact` scrubs them from any config dict a run writes to a report,
so neither logs nor JSON files ever carry them.

The CLIs call :func:`add_security_args` on their parsers and
:func:`security_from_args` once, then pass the :class:`LinkSecurity` down in
their config dataclass to :func:`toolkit.core.transport.open_link`.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from toolkit.core.errors import HiertrainError
from toolkit.core.keys import DeviceKey, DeviceKeys, KeyRing, RunKeys, is_device_key_text

log = logging.getLogger(__name__)

PASSWORD_ENV = "HIERTRAIN_MQTT_PASSWORD"
"""Environment variable holding the broker password (when no ``--password-file``)."""
HMAC_KEY_ENV = "HIERTRAIN_HMAC_KEY"
"""Environment variable holding the run key or a device key file's content (when no
``--hmac-key-file``)."""

MIN_HMAC_KEY_BYTES = 16
"""Shortest signing key accepted; ``openssl rand -hex 32`` makes a 64-character one."""

SECRET_FIELDS = frozenset({"password", "hmac_key", "device_key"})
"""Keys :func:`redact` blanks wherever they occur in a config dict."""
REDACTED = "<redacted>"


@dataclass(frozen=True)
class LinkSecurity:
    """How a link authenticates and what it checks; the default is an open link.

    ``password``, ``hmac_key`` (the run key) and ``device_key`` (a board's key file,
    :mod:`toolkit.core.keys`) stay out of ``repr`` (and so out of logs); reports go
    through :func:`redact`. At most one of the two keys is set.
    """

    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    hmac_key: bytes | None = field(default=None, repr=False)
    device_key: DeviceKey | None = field(default=None, repr=False)

    @property
    def uses_tls_files(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))

    def tls_context(self) -> ssl.SSLContext:
        """A client TLS context: the system's CAs, or only ``ca_file``; a client cert if given.

        Hostname checking stays on: a certificate for another name is refused,
        so the broker's certificate must name the host in the URL (an IP
        address needs an IP subjectAltName).
        """
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file)
            if self.cert_file:
                ctx.load_cert_chain(self.cert_file, self.key_file)
        except (OSError, ssl.SSLError) as exc:
            raise HiertrainError(
                f"cannot load the TLS files (--ca-file {self.ca_file}, --cert-file "
                f"{self.cert_file}, --key-file {self.key_file}): {exc}"
            ) from None
        return ctx

    @property
    def signs(self) -> bool:
        return self.hmac_key is not None or self.device_key is not None

    def key_ring(self) -> KeyRing | None:
        """Which key signs and checks each topic (``SignedLink``); None: no signing."""
        if self.device_key is not None:
            return DeviceKeys(self.device_key)
        if self.hmac_key is not None:
            return RunKeys(self.hmac_key)
        return None

    def for_device(self, run_id: str, device_id: str) -> LinkSecurity:
        """This security as an edge ``device_id`` of ``run_id`` holds it (before connecting).

        A device key file made for another device or run is refused in one line. The run
        key is accepted for labs and tests: the edge derives its own key from it and keeps
        only that (so it behaves exactly like a provisioned board), with a warning.
        """
        if self.device_key is not None:
            self.device_key.check_for(run_id, device_id)
            return self
        if self.hmac_key is None:
            return self
        log.warning("deriving the signing key of device %s from the run key: fine in a lab, "
                    "but a deployed board should hold only its own key (toolkit keys derive "
                    "--run-id %s --device-id %s, docs/security.md)", device_id, run_id,
                    device_id)
        return replace(self, hmac_key=None,
                       device_key=DeviceKey.derive(self.hmac_key, run_id, device_id))

    def require_run_key(self, who: str) -> None:
        """Refuse a device key file where the run key is needed (the cloud trainer)."""
        if self.device_key is not None:
            raise HiertrainError(
                f"{who} needs the run key, not a device key file (this one is device "
                f"{self.device_key.device_id!r}'s of run {self.device_key.run_id!r}); give "
                "--hmac-key-file the run key")

    def check(self, url: str) -> None:
        """Refuse combinations that cannot work, before anything connects."""
        scheme = url.strip().split(":", 1)[0].lower() if isinstance(url, str) else ""
        if self.hmac_key is not None and self.device_key is not None:
            raise ValueError("give a LinkSecurity the run key or a device key, not both")
        if bool(self.cert_file) != bool(self.key_file):
            raise HiertrainError("give --cert-file and --key-file together (a client "
                                 "certificate needs its private key)")
        if scheme == "serial" and (self.username or self.password or self.uses_tls_files):
            raise HiertrainError(
                "broker credentials and TLS files belong to the 'toolkit gateway' that bridges "
                "the serial line, not to the device; give them there (signing still works)"
            )
        if scheme == "mqtt" and self.uses_tls_files:
            raise HiertrainError(f"--ca-file/--cert-file/--key-file need an mqtts:// broker "
                                 f"URL, not {_safe_url(url)}")
        if self.password is not None and self.username is None:
            raise HiertrainError("a broker password needs --username")

    def describe(self) -> dict[str, Any]:
        """What a summary or log may say about the link's security: no secrets."""
        return {"username": self.username, "password": self.password is not None,
                "ca_file": self.ca_file, "client_cert": self.cert_file is not None,
                "signing": self.signs,
                "signs_as": (None if self.device_key is None
                             else f"{self.device_key.device_id}@{self.device_key.run_id}")}


def _safe_url(url: str) -> str:
    """``url`` with any password replaced, for error messages."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        return url.replace(f":{parts.password}@", f":{REDACTED}@", 1)
    except ValueError:
        return "<unparsable URL>"


def read_secret_file(path: str | os.PathLike[str], what: str) -> str:
    """The secret in ``path`` without surrounding whitespace; one-line errors.

    A file others can read is accepted with a warning (like ssh, but not
    fatal: containers often mount secrets 0644).
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise HiertrainError(f"{what} file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise HiertrainError(f"cannot read the {what} file {p}: {exc}") from None
    secret = text.strip()
    if not secret:
        raise HiertrainError(f"{what} file {p} is empty")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s file %s is readable by other users; chmod 600 it", what, p)
    return secret


def run_key_from_text(text: str, source: str = "the HMAC key") -> bytes:
    """The run key in a key file's text (its utf-8 bytes, as every build has used them);
    a device key file or a key too short to be secret is refused in one line."""
    if is_device_key_text(text):
        raise HiertrainError(f"{source} is a device key file, not a run key; give the run "
                             "key (the file the cloud trainer reads)")
    key = text.strip().encode("utf-8")
    if len(key) < MIN_HMAC_KEY_BYTES:
        raise HiertrainError(
            f"{source} is {len(key)} bytes; use at least {MIN_HMAC_KEY_BYTES} "
            "(e.g. openssl rand -hex 32 > run.key)"
        )
    return key


def _secret(file: str | None, env_name: str, env: Mapping[str, str], what: str) -> str | None:
    if file:
        return read_secret_file(file, what)
    value = env.get(env_name)
    if value is None:
        return None
    if not value.strip():
        raise HiertrainError(f"{env_name} is set but empty; unset it or give the {what}")
    return value.strip()


def load_security(
    url: str,
    *,
    username: str | None = None,
    password_file: str | None = None,
    ca_file: str | None = None,
    cert_file: str | None = None,
    key_file: str | None = None,
    hmac_key_file: str | None = None,
    signing: bool = True,
    env: Mapping[str, str] | None = None,
) -> LinkSecurity:
    """Build and check a :class:`LinkSecurity` for ``url`` from options and the environment.

    A password inside ``url`` is refused (see the module docstring); a user
    name there is taken when ``username`` is not given. ``signing=False`` for
    processes that only relay messages (the gateway): they need no key.
    """
    env = os.environ if env is None else env
    url_user = None
    if isinstance(url, str) and "://" in url and not url.lower().startswith("serial:"):
        from urllib.parse import unquote, urlsplit

        try:
            parts = urlsplit(url.strip())
            has_password = parts.password is not None
            url_user = unquote(parts.username) if parts.username else None
        except ValueError:
            has_password = False  # parse_url reports the bad URL later, in its own words
        if has_password:
            raise HiertrainError(
                f"the broker URL {_safe_url(url)} carries a password: command lines are visible "
                f"to every user of the machine. Put it in a file (--password-file, chmod 600) "
                f"or in {PASSWORD_ENV}, and the user name in --username"
            )
    user = username or url_user
    password = _secret(password_file, PASSWORD_ENV, env, "password")
    if password is not None and user is None:
        if password_file:
            raise HiertrainError("--password-file needs --username")
        password = None  # a password in the environment for another tool: not ours to use
    key: bytes | None = None
    device: DeviceKey | None = None
    if signing:
        text = _secret(hmac_key_file, HMAC_KEY_ENV, env, "HMAC key")
        if text is not None and is_device_key_text(text):
            device = DeviceKey.parse(text, f"device key file {hmac_key_file}" if hmac_key_file
                                     else f"the device key in {HMAC_KEY_ENV}")
        elif text is not None:
            key = run_key_from_text(text)
    sec = LinkSecurity(username=user, password=password, ca_file=ca_file, cert_file=cert_file,
                       key_file=key_file, hmac_key=key, device_key=device)
    sec.check(url)
    return sec


def add_security_args(parser: argparse.ArgumentParser, *, signing: bool = True) -> None:
    """The broker-security options, the same on every command that connects."""
    g = parser.add_argument_group(
        "broker security (docs/security.md)",
        f"secrets come from files or the environment ({PASSWORD_ENV}"
        + (f", {HMAC_KEY_ENV}" if signing else "") + "), never from the command line",
    )
    g.add_argument("--username", default=None, help="broker user name (MQTT username)")
    g.add_argument("--password-file", default=None, metavar="PATH",
                   help=f"file holding the broker password (unset: ${PASSWORD_ENV}, if set)")
    g.add_argument("--ca-file", default=None, metavar="PATH",
                   help="with mqtts://: trust this CA (PEM) instead of the system's")
    g.add_argument("--cert-file", default=None, metavar="PATH",
                   help="with mqtts://: client certificate (PEM), with --key-file")
    g.add_argument("--key-file", default=None, metavar="PATH",
                   help="with mqtts://: the client certificate's private key (PEM)")
    if signing:
        g.add_argument("--hmac-key-file", default=None, metavar="PATH",
                       help="sign every message and check every incoming one: the run key "
                            "(cloud trainer), or a board's device key file from 'toolkit "
                            f"keys derive' (unset: ${HMAC_KEY_ENV}; no signing if neither)")


def security_from_args(args: argparse.Namespace, url: str | None = None) -> LinkSecurity:
    """:func:`load_security` from the options :func:`add_security_args` added."""
    url = getattr(args, "broker", None) if url is None else url
    return load_security(
        url or "",
        username=getattr(args, "username", None),
        password_file=getattr(args, "password_file", None),
        ca_file=getattr(args, "ca_file", None),
        cert_file=getattr(args, "cert_file", None),
        key_file=getattr(args, "key_file", None),
        hmac_key_file=getattr(args, "hmac_key_file", None),
        signing=hasattr(args, "hmac_key_file"),
    )


def redact(value: Any) -> Any:
    """``value`` (a config dict, possibly nested) with every secret field blanked.

    For reports that dump a whole config (``asdict(cfg)``): ``password``, ``hmac_key``
    and ``device_key`` become ``"<redacted>"`` when set, wherever they are.
    """
    if isinstance(value, Mapping):
        return {k: (REDACTED if k in SECRET_FIELDS and v is not None else redact(v))
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value
