"""``toolkit keys derive``: a board's signing key file, made from the run key.

Why a command rather than ``openssl``: a device key is HKDF of the run key with the run
and device ids (:mod:`toolkit.core.keys`), and its file names what it is for, so a board
refuses a key made for another device or run. Whoever provisions boards runs this where
the run key is; the board receives only its own file (docs/security.md).

The key never reaches a terminal by accident: it goes to a 0600 file (an existing one is
kept unless ``--force``), and to stdout only when asked with ``-o -``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from toolkit.core.errors import HiertrainError


def add_keys_parser(sub: Any) -> None:
    """``toolkit keys`` and its one sub-command, ``derive``."""
    sp = sub.add_parser("keys", help="per-device message signing keys (docs/security.md)")
    ksub = sp.add_subparsers(dest="keys_command", required=True, metavar="{derive}")
    d = ksub.add_parser(
        "derive", help="write a device's signing key file, derived from the run key",
        description="Derive DEVICE's signing key for run RUN from the run key and write it "
                    "as a key file for that device's --hmac-key-file (mode 0600).")
    d.add_argument("--run-key-file", required=True, metavar="PATH",
                   help="the run key: the file the cloud trainer's --hmac-key-file reads")
    d.add_argument("--run-id", required=True, metavar="RUN", help="the run the key is for")
    d.add_argument("--device-id", required=True, metavar="DEVICE",
                   help="the device the key is for (its --device-id and broker user name)")
    d.add_argument("-o", "--out", default=None, metavar="PATH",
                   help="key file to write (mode 0600); '-' prints it on stdout instead; "
                        "unset: DEVICE.key in the current directory")
    d.add_argument("--force", action="store_true", help="replace an existing key file")
    d.set_defaults(func=cmd_keys_derive)


def cmd_keys_derive(args: argparse.Namespace) -> int:
    from toolkit.core.keys import DeviceKey
    from toolkit.core.protocol.topics import validate_id
    from toolkit.core.security import read_secret_file, run_key_from_text

    run_id = validate_id(args.run_id, "run id")
    device_id = validate_id(args.device_id, "device id")
    path = args.run_key_file
    run_key = run_key_from_text(read_secret_file(path, "run key"), f"run key file {path}")
    key = DeviceKey.derive(run_key, run_id, device_id)
    if args.out == "-":
        sys.stdout.write(key.to_text())
        return 0
    if args.out is not None and not args.out.strip():
        raise HiertrainError("-o is empty; give a file name, or '-' for stdout")
    out = key.save(args.out or f"{device_id}.key", force=args.force)
    print(f"wrote {out}: the signing key of device {device_id} in run {run_id} (mode 0600); "
          f"copy it to that device only, for its --hmac-key-file")
    return 0
