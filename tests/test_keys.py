"""Signing keys per device (toolkit/core/keys.py, docs/security.md): HKDF against RFC 5869,
the key file a board holds, who may sign and check which topic, and ``toolkit keys derive``.

The broker-level half (a device signing as another over a real mosquitto, the ACL for any
run id) is in tests/test_security.py.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import InProcessLink
from toolkit.core.errors import HiertrainError, WireError
from toolkit.core.keys import (
    DeviceKey,
    DeviceKeys,
    RunKeys,
    device_key,
    fleet_key,
    hkdf_expand,
    hkdf_extract,
    hkdf_sha256,
)
from toolkit.core.protocol import topics
from toolkit.core.security import LinkSecurity, load_security, redact
from toolkit.core.transport.base import MessageHandler
from toolkit.core.transport.signing import OVERHEAD, SignedLink, sign

pytestmark = pytest.mark.security

RUN_KEY = b"0123456789abcdef-test-run-key-5ecret"
RUN = "r1"

# --------------------------------------------------------------------------- RFC 5869

# Appendix A, test cases 1-3 (the SHA-256 ones): IKM, salt, info, L, PRK, OKM.
RFC5869 = [
    (bytes([0x0B] * 22), bytes(range(0x00, 0x0D)), bytes(range(0xF0, 0xFA)), 42,
     "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5",
     "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf"
     "34007208d5b887185865"),
    (bytes(range(0x00, 0x50)), bytes(range(0x60, 0xB0)), bytes(range(0xB0, 0x100)), 82,
     "06a6b88c5853361a06104c9ceb35b45cef760014904671014a193f40c15fc244",
     "b11e398dc80327a1c8e7f78c596a49344f012eda2d4efad8a050cc4c19afa97c"
     "59045a99cac7827271cb41c65e590e09da3275600c2f09b8367793a9aca3db71"
     "cc30c58179ec3e87c14c01d5c1f3434f1d87"),
    (bytes([0x0B] * 22), b"", b"", 42,
     "19ef24a32c717b167f33a91d6f648bdf96596776afdb6377ac434c1c293ccb04",
     "8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
     "9d201395faa4b61a96c8"),
]


@pytest.mark.parametrize("ikm, salt, info, length, prk, okm", RFC5869)
def test_hkdf_matches_the_rfc_5869_vectors(ikm: bytes, salt: bytes, info: bytes, length: int,
                                           prk: str, okm: str) -> None:
    assert hkdf_extract(salt, ikm).hex() == prk
    assert hkdf_expand(bytes.fromhex(prk), info, length).hex() == okm
    assert hkdf_sha256(ikm, salt=salt, info=info, length=length).hex() == okm


def test_device_keys_are_the_documented_hkdf_and_differ_per_device_run_and_run_key() -> None:
    """The derivation is what docs/security.md says, checked with an independent HKDF."""
    hkdf = pytest.importorskip("cryptography.hazmat.primitives.kdf.hkdf")
    from cryptography.hazmat.primitives import hashes

    def reference(run: str, who: str) -> bytes:
        return hkdf.HKDF(hashes.SHA256(), 32, b"hiertrain device keys",
                         b"hiertrain device key v1\x00" + run.encode() + b"\x00" + who.encode()
                         ).derive(RUN_KEY)

    assert device_key(RUN_KEY, RUN, "robot-7") == reference(RUN, "robot-7")
    assert fleet_key(RUN_KEY, RUN) == reference(RUN, "cloud")
    keys = {device_key(RUN_KEY, RUN, "robot-7"), device_key(RUN_KEY, RUN, "robot-8"),
            device_key(RUN_KEY, "r2", "robot-7"), device_key(RUN_KEY + b"x", RUN, "robot-7"),
            fleet_key(RUN_KEY, RUN)}
    assert len(keys) == 5 and all(len(k) == 32 for k in keys)
    with pytest.raises(HiertrainError, match="cloud trainer's own id"):
        device_key(RUN_KEY, RUN, "cloud")  # that would be the fleet key
    with pytest.raises(HiertrainError, match="invalid device id"):
        device_key(RUN_KEY, RUN, "a/b")


# --------------------------------------------------------------------------- key files


def test_a_key_file_round_trips_and_names_what_it_is_for(tmp_path: Path) -> None:
    dk = DeviceKey.derive(RUN_KEY, RUN, "robot-7")
    text = dk.to_text()
    line = text.splitlines()[-1].split()
    assert line[:4] == ["hiertrain-device-key", "v1", RUN, "robot-7"]
    assert line[4:] == [dk.key.hex(), dk.fleet.hex()]
    assert DeviceKey.parse(text) == dk
    assert dk.key.hex() not in repr(dk) and dk.fleet.hex() not in repr(dk)
    path = dk.save(tmp_path / "robot-7.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(HiertrainError, match="exists; give --force"):
        DeviceKey.derive(RUN_KEY, RUN, "robot-8").save(path)
    assert DeviceKey.parse(path.read_text()) == dk  # not overwritten
    DeviceKey.derive(RUN_KEY, RUN, "robot-8").save(path, force=True)
    assert DeviceKey.parse(path.read_text()).device_id == "robot-8"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["robot-7.key"]  # no temporary left


@pytest.mark.parametrize("text, message", [
    ("hiertrain-device-key v2 r1 robot-7 00 11", "version v2; this build reads v1"),
    ("hiertrain-device-key v1 r1 robot-7 " + "ab" * 32, "got 5 fields"),
    ("hiertrain-device-key v1 r1 robot-7 " + "ab" * 31 + " " + "cd" * 32, "64 hex digits"),
    ("hiertrain-device-key v1 r1 robot-7 " + "zz" * 32 + " " + "cd" * 32, "64 hex digits"),
    ("hiertrain-device-key v1 r1 cloud " + "ab" * 32 + " " + "cd" * 32, "cloud trainer's own"),
    ("hiertrain-device-key v1 r/1 robot-7 " + "ab" * 32 + " " + "cd" * 32, "invalid run id"),
    ("# only a comment\n", "holds 0 key lines"),
])
def test_a_malformed_key_file_is_refused_in_one_line(text: str, message: str) -> None:
    with pytest.raises(HiertrainError, match=message) as err:
        DeviceKey.parse(text, "robot-7.key")
    assert "\n" not in str(err.value) and str(err.value).startswith("robot-7.key")


def test_a_board_refuses_a_key_made_for_another_device_or_run(tmp_path: Path) -> None:
    path = DeviceKey.derive(RUN_KEY, RUN, "robot-7").save(tmp_path / "robot-7.key")
    sec = load_security("mqtt://h", hmac_key_file=str(path), env={})
    assert sec.hmac_key is None and sec.device_key is not None
    assert sec.for_device(RUN, "robot-7") is sec
    for run, device in ((RUN, "robot-8"), ("r2", "robot-7")):
        with pytest.raises(HiertrainError) as err:
            sec.for_device(run, device)
        msg = str(err.value)
        assert "\n" not in msg and "for device 'robot-7' of run 'r1'" in msg, msg
        assert f"not '{device}' of run '{run}'" in msg and "toolkit keys derive" in msg
    with pytest.raises(HiertrainError, match="cloud-trainer needs the run key, not a device"):
        sec.require_run_key("cloud-trainer")
    # the same file's content from the environment, as a service manager would pass it
    env = load_security("mqtt://h", env={"HIERTRAIN_HMAC_KEY": path.read_text()})
    assert env.device_key == sec.device_key


def test_an_edge_given_the_run_key_keeps_only_its_own_key(caplog: Any) -> None:
    """Labs and tests may hand an edge the run key: it derives its key and drops the run key,
    so it signs exactly as a provisioned board would, and says so."""
    sec = load_security("mqtt://h", env={"HIERTRAIN_HMAC_KEY": RUN_KEY.decode()})
    sec.require_run_key("cloud-trainer")  # the cloud takes it as it is
    with caplog.at_level(logging.WARNING, logger="toolkit.core.security"):
        edge = sec.for_device(RUN, "robot-7")
    assert edge.hmac_key is None
    assert edge.device_key == DeviceKey.derive(RUN_KEY, RUN, "robot-7")
    assert "a deployed board should hold only its own key" in caplog.text
    assert RUN_KEY.decode() not in caplog.text and edge.device_key.key.hex() not in caplog.text
    assert RUN_KEY.decode() not in repr(edge) and edge.device_key.key.hex() not in repr(edge)
    from dataclasses import asdict

    assert redact(asdict(edge))["device_key"] == "<redacted>"
    assert edge.describe()["signs_as"] == "robot-7@r1"
    with pytest.raises(HiertrainError, match="is a device key file, not a run key"):
        from toolkit.core.security import run_key_from_text

        run_key_from_text(edge.device_key.to_text())


# --------------------------------------------------------------------------- who signs what


def test_a_board_signs_only_its_own_topics_and_checks_only_its_own_and_the_clouds() -> None:
    ring = DeviceKeys(DeviceKey.derive(RUN_KEY, RUN, "robot-a"))
    cloud = RunKeys(RUN_KEY)
    own = [topics.act_topic(RUN, "robot-a"), topics.status_topic(RUN, "robot-a"),
           topics.grad_topic(RUN, "robot-a"), topics.infer_reply_topic(RUN, "robot-a"),
           topics.ack_topic(RUN, "robot-a")]  # the per-device ack: any kind, same key
    for t in own:
        assert ring.signing_key(t) == ring.verifying_key(t) == cloud.signing_key(t)
    for t in (topics.status_topic(RUN, "cloud"),):
        assert ring.verifying_key(t) == cloud.signing_key(t) == fleet_key(RUN_KEY, RUN)
        with pytest.raises(HiertrainError, match="signs only its own topics"):
            ring.signing_key(t)
    for t in (topics.act_topic(RUN, "robot-b"), topics.act_topic("r2", "robot-a"),
              topics.status_topic("r2", "cloud")):
        with pytest.raises(HiertrainError, match="signs only its own topics"):
            ring.signing_key(t)
        with pytest.raises(WireError, match="no key to check") as err:
            ring.verifying_key(t)
        assert err.value.reason == "bad_signature"
    with pytest.raises(WireError) as err:
        cloud.verifying_key("not/a/hiertrain/topic")
    assert err.value.reason == "topic"


class _Bus:
    """An in-memory broker for :class:`_BusLink`: every publish reaches every subscription
    that matches it (MQTT wildcards), on every link."""

    def __init__(self) -> None:
        self.subs: list[tuple[str, MessageHandler]] = []

    def deliver(self, topic: str, payload: bytes) -> None:
        from paho.mqtt.client import topic_matches_sub

        for sub, handler in list(self.subs):
            if topic_matches_sub(sub, topic):
                handler(topic, payload, {})


class _BusLink(InProcessLink):
    def __init__(self, bus: _Bus, name: str) -> None:
        super().__init__(name)
        self.bus = bus

    def publish(self, topic: str, payload: bytes, **kw: Any) -> None:
        self.bus.deliver(topic, payload)

    def subscribe(self, topic: str, handler: MessageHandler, qos: int = 1) -> None:
        self.bus.subs.append((topic, handler))


def test_the_cloud_checks_each_device_with_its_own_key_and_signs_replies_with_it() -> None:
    """robot-a's key on robot-b's topic is a bad signature; each side accepts only what it
    should, in both directions, through the real SignedLink."""
    bus = _Bus()
    rejected: list[tuple[str, str]] = []
    got: list[tuple[str, str, bytes]] = []
    cloud = SignedLink(_BusLink(bus, "cloud"), RunKeys(RUN_KEY),
                       lambda reason, topic, detail: rejected.append(("cloud", reason)))
    cloud.subscribe(topics.act_wildcard(RUN), lambda t, p, _: got.append(("cloud", t, p)))
    edges = {}
    for name in ("robot-a", "robot-b"):
        edge = SignedLink(_BusLink(bus, name), DeviceKeys(DeviceKey.derive(RUN_KEY, RUN, name)),
                          lambda reason, topic, detail, n=name: rejected.append((n, reason)))
        for t in (topics.grad_topic(RUN, name), topics.status_topic(RUN, "cloud")):
            edge.subscribe(t, lambda t, p, _, n=name: got.append((n, t, p)))
        edges[name] = edge

    a_key = device_key(RUN_KEY, RUN, "robot-a")
    edges["robot-a"].publish(topics.act_topic(RUN, "robot-a"), b"batch of a")
    bus.deliver(topics.act_topic(RUN, "robot-b"),  # robot-a signing as robot-b
                sign(a_key, topics.act_topic(RUN, "robot-b"), b"forged batch of b"))
    bus.deliver(topics.act_topic(RUN, "robot-b"),  # the old scheme: the run key itself
                sign(RUN_KEY, topics.act_topic(RUN, "robot-b"), b"forged batch of b"))
    with pytest.raises(HiertrainError, match="signs only its own topics"):
        edges["robot-a"].publish(topics.act_topic(RUN, "robot-b"), b"forged batch of b")
    assert got == [("cloud", topics.act_topic(RUN, "robot-a"), b"batch of a")]
    assert rejected == [("cloud", "bad_signature")] * 2

    got.clear()
    rejected.clear()
    cloud.publish(topics.grad_topic(RUN, "robot-b"), b"grad for b")  # b's key: only b checks it
    cloud.publish(topics.status_topic(RUN, "cloud"), b"cloud online")  # the fleet key: all
    assert sorted(got) == [("robot-a", "hiertrain/r1/cloud/status", b"cloud online"),
                           ("robot-b", "hiertrain/r1/cloud/status", b"cloud online"),
                           ("robot-b", "hiertrain/r1/robot-b/grad", b"grad for b")]
    assert not rejected
    bus.deliver(topics.grad_topic(RUN, "robot-a"),  # robot-b's key on robot-a's gradients
                sign(device_key(RUN_KEY, RUN, "robot-b"), topics.grad_topic(RUN, "robot-a"),
                     b"forged grad"))
    assert rejected == [("robot-a", "bad_signature")]


def test_a_version_1_envelope_is_refused_with_its_own_reason() -> None:
    """An old build signs with the run key in a version-1 envelope: named, not 'forged'."""
    from toolkit.core.transport.signing import verify

    topic = topics.act_topic(RUN, "robot-a")
    v2 = sign(device_key(RUN_KEY, RUN, "robot-a"), topic, b"x")
    assert v2[4] == 2 and len(v2) == OVERHEAD + 1
    v1 = v2[:4] + b"\x01" + v2[5:]
    with pytest.raises(WireError, match="version 1 .* upgrade the sender") as err:
        verify(device_key(RUN_KEY, RUN, "robot-a"), topic, v1)
    assert err.value.reason == "bad_signature"
    with pytest.raises(TypeError, match="key ring"):
        SignedLink(_BusLink(_Bus(), "x"), RUN_KEY)  # type: ignore[arg-type]
    assert LinkSecurity(hmac_key=RUN_KEY).key_ring().__class__ is RunKeys


# --------------------------------------------------------------------------- the CLI


def test_toolkit_keys_derive(cli_in_process: Any, tmp_path: Path) -> None:
    run_key = tmp_path / "r1.key"
    run_key.write_text(RUN_KEY.decode() + "\n")
    run_key.chmod(0o600)
    out = tmp_path / "robot-7.key"
    argv = ["toolkit", "keys", "derive", "--run-key-file", str(run_key), "--run-id", RUN,
            "--device-id", "robot-7"]
    expected = DeviceKey.derive(RUN_KEY, RUN, "robot-7")
    r = cli_in_process(*argv, "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert DeviceKey.parse(out.read_text()) == expected
    assert expected.key.hex() not in r.stdout + r.stderr  # the key never goes to the terminal
    assert "robot-7" in r.stdout and "0600" in r.stdout

    r = cli_in_process(*argv, "-o", str(out))  # exists: refused, untouched
    assert r.returncode == 3 and "exists; give --force" in r.stderr, r.stderr
    r = cli_in_process(*argv[:-1], "robot-8", "-o", str(out), "--force")
    assert r.returncode == 0 and DeviceKey.parse(out.read_text()).device_id == "robot-8"

    r = cli_in_process(*argv, "-o", "-")  # asked for: on stdout
    assert r.returncode == 0 and DeviceKey.parse(r.stdout) == expected
    for bad, message in ((["--run-key-file", str(out)], "is a device key file, not a run key"),
                         (["--device-id", "cloud"], "cloud trainer's own id"),
                         (["--run-id", "a b"], "invalid run id")):
        r = cli_in_process(*argv, *bad, "-o", "-")
        assert r.returncode == 3 and message in r.stderr and not r.stdout, (bad, r.stderr)


def test_the_runtimes_refuse_the_wrong_kind_of_key(cli_in_process: Any, tmp_path: Path) -> None:
    """An edge given another device's key file, and a cloud trainer given a device key file,
    stop in a second with one line, before anything is loaded or connected."""
    key = DeviceKey.derive(RUN_KEY, RUN, "robot-7").save(tmp_path / "robot-7.key")
    common = ["--artifacts", str(tmp_path / "none"), "--broker", "mqtt://127.0.0.1:9",
              "--run-id", RUN, "--hmac-key-file", str(key)]
    r = cli_in_process("edge-runtime", "train", *common, "--device-id", "robot-8")
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert r.returncode == 3 and len(errors) == 1, r.stderr
    assert "for device 'robot-7' of run 'r1', not 'robot-8'" in errors[0], r.stderr
    r = cli_in_process("cloud-trainer", *common, "--run-dir", str(tmp_path / "run"))
    assert r.returncode == 3 and "cloud-trainer needs the run key" in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()
