"""Broker security against a real mosquitto: passwords, a per-device ACL, TLS with a test CA,
and signed messages checked by the cloud trainer (docs/security.md).

The test makes its own CA, server and client certificates (``cryptography``), a
``mosquitto_passwd`` password file and an ACL that lets each device write only under
``hiertrain/<run>/<its user name>/``, then starts mosquitto with a TLS-only listener on
127.0.0.1 and checks what an unauthenticated client, a device writing into another device's
topics, a tampering sender and a client trusting the wrong CA each get.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import queue
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, run_cli
from toolkit.core.errors import HiertrainError
from toolkit.core.keys import DeviceKey, device_key
from toolkit.core.protocol import topics
from toolkit.core.protocol.wire import decode, encode
from toolkit.core.security import LinkSecurity, load_security, redact
from toolkit.core.transport import Link, open_link
from toolkit.core.transport.signing import OVERHEAD, sign
from toolkit.lab.broker import HIERTRAIN_ACL, MosquittoBroker, MosquittoSecurity, find_mosquitto
from toolkit.lab.launch import ProcessGroup

pytestmark = [pytest.mark.security, pytest.mark.mqtt, pytest.mark.mosquitto]

RUN = "sec"
USERS = {"cloud": "cl0ud-pw-5ecret", "robot-a": "a-pw-5ecret-xyz", "robot-b": "b-pw-5ecret-xyz"}
HMAC_KEY = "0123456789abcdef-test-run-key-5ecret"
SECRETS = [*USERS.values(), HMAC_KEY]


# --------------------------------------------------------------------------- test PKI


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca: Path  # a CA nobody signed the broker's certificate with


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(key, path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.chmod(0o600)


def _cert(subject: str, key, issuer_name=None, issuer_key=None, *, ca: bool = False,
          sans: list | None = None):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name)
         .issuer_name(issuer_name or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                            critical=False)
    if issuer_key is not None:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer_key.public_key()), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


def _pem(cert, path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def make_pki(d: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, a rogue CA."""
    from cryptography import x509

    ca_key = _key()
    ca = _cert("hiertrain test CA", ca_key, ca=True)
    srv_key = _key()
    srv = _cert("127.0.0.1", srv_key, ca.subject, ca_key, sans=[
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")])
    cli_key = _key()
    cli = _cert("robot-a", cli_key, ca.subject, ca_key)
    rogue_key = _key()
    rogue = _cert("not the hiertrain CA", rogue_key, ca=True)
    for key, name in ((srv_key, "server.key"), (cli_key, "client.key")):
        _write_key(key, d / name)
    return Pki(ca=_pem(ca, d / "ca.pem"), server_cert=_pem(srv, d / "server.pem"),
               server_key=d / "server.key", client_cert=_pem(cli, d / "client.pem"),
               client_key=d / "client.key", rogue_ca=_pem(rogue, d / "rogue-ca.pem"))


def make_password_file(path: Path, users: dict[str, str]) -> Path:
    tool = shutil.which("mosquitto_passwd")
    assert tool, "mosquitto_passwd is part of Debian's mosquitto package"
    path.touch(mode=0o600)
    for user, password in users.items():
        # -b takes the password as an argument: fine for a throw-away test file.
        subprocess.run([tool, "-b", str(path), user, password], check=True, timeout=30,
                       capture_output=True)
    return path


def make_acl(path: Path) -> Path:
    """The recipe of docs/security.md, for any run id: the cloud owns every run, each device
    its own topics (``toolkit.lab.broker.HIERTRAIN_ACL``)."""
    path.write_text(HIERTRAIN_ACL)
    return path


def test_the_docs_show_the_tested_acl() -> None:
    doc = (REPO / "docs" / "security.md").read_text()
    assert f"```\n{HIERTRAIN_ACL}```" in doc, "docs/security.md's ACL differs from the tested one"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    pytest.importorskip("cryptography")
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secure_broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory
                  ) -> Iterator[MosquittoBroker]:
    if find_mosquitto() is None and not os.environ.get("CI"):
        pytest.skip("mosquitto is not installed (apt-get install mosquitto); CI installs it")
    d = tmp_path_factory.mktemp("mosq")
    sec = MosquittoSecurity(password_file=str(make_password_file(d / "passwd", USERS)),
                            acl_file=str(make_acl(d / "acl")), cafile=str(pki.ca),
                            certfile=str(pki.server_cert), keyfile=str(pki.server_key))
    with MosquittoBroker(security=sec).start(timeout=15) as broker:
        assert broker.url.startswith("mqtts://127.0.0.1:")
        yield broker


def _security(pki: Pki, user: str | None, **kw: Any) -> LinkSecurity:
    return LinkSecurity(username=user, password=USERS.get(user or ""), ca_file=str(pki.ca), **kw)


def _link(broker: MosquittoBroker, sec: LinkSecurity, name: str, **kw: Any) -> Link:
    return open_link(broker.url, f"{name}-{os.getpid()}-{random.getrandbits(24):06x}",
                     security=sec, **kw)


# --------------------------------------------------------------------------- options


def test_password_in_the_url_is_refused_and_secrets_come_from_files_or_env(
        tmp_path: Path) -> None:
    with pytest.raises(HiertrainError, match="--password-file") as err:
        load_security("mqtts://robot-a:hunter2@broker:8883", env={})
    assert "hunter2" not in str(err.value)

    pw = tmp_path / "pw"
    pw.write_text("from-file\n")
    sec = load_security("mqtts://broker", username="robot-a", password_file=str(pw),
                        env={"HIERTRAIN_MQTT_PASSWORD": "from-env"})
    assert sec.password == "from-file"  # the file wins over the environment
    sec = load_security("mqtts://robot-a@broker", env={"HIERTRAIN_MQTT_PASSWORD": "from-env",
                                                       "HIERTRAIN_HMAC_KEY": HMAC_KEY})
    assert (sec.username, sec.password, sec.hmac_key) == ("robot-a", "from-env",
                                                          HMAC_KEY.encode())
    assert "from-env" not in repr(sec) and HMAC_KEY not in repr(sec)
    assert redact({"cfg": {"security": {"password": "x", "hmac_key": b"y", "username": "u"}}}) \
        == {"cfg": {"security": {"password": "<redacted>", "hmac_key": "<redacted>",
                                 "username": "u"}}}
    with pytest.raises(HiertrainError, match="at least 16"):
        load_security("mqtt://h", env={"HIERTRAIN_HMAC_KEY": "short"})
    with pytest.raises(HiertrainError, match="mqtts://"):
        load_security("mqtt://h", ca_file="ca.pem", env={})
    with pytest.raises(HiertrainError, match="does not exist"):
        load_security("mqtt://h", username="u", password_file=str(tmp_path / "nope"), env={})


def test_the_clis_refuse_a_password_on_the_command_line(cli) -> None:
    for cmd in (["edge-runtime", "train", "--artifacts", "a", "--device-id", "d"],
                ["cloud-trainer", "--artifacts", "a", "--run-dir", "r"],
                ["toolkit", "gateway", "--serial", "/dev/null"]):
        r = cli(*cmd, "--broker", "mqtts://robot-a:hunter2@127.0.0.1:8883", timeout=120)
        assert r.returncode == 3, (cmd, r.stderr)
        assert "--password-file" in r.stderr and "hunter2" not in r.stderr + r.stdout, r.stderr


# --------------------------------------------------------------------------- broker


def test_unauthenticated_and_wrong_password_clients_are_refused(
        secure_broker: MosquittoBroker, pki: Pki) -> None:
    start = time.monotonic()
    anon = _link(secure_broker, LinkSecurity(ca_file=str(pki.ca)), "anon")
    with pytest.raises(HiertrainError, match="(?i)not authori[sz]ed.*requires a user name") as err:
        anon.connect(timeout=10)
    anon.close()
    wrong = _link(secure_broker, LinkSecurity(username="robot-a", password="guess",
                                              ca_file=str(pki.ca)), "wrong")
    with pytest.raises(HiertrainError, match="(?i)not authori[sz]ed|bad user name") as err:
        wrong.connect(timeout=10)
    wrong.close()
    assert "guess" not in str(err.value)
    assert time.monotonic() - start < 8, "a refusal is final: no retrying until the timeout"


def test_tls_with_the_wrong_ca_fails_clearly(secure_broker: MosquittoBroker, pki: Pki) -> None:
    link = _link(secure_broker, LinkSecurity(username="robot-a", password=USERS["robot-a"],
                                             ca_file=str(pki.rogue_ca)), "rogue")
    start = time.monotonic()
    with pytest.raises(HiertrainError, match="certificate is not trusted.*--ca-file"):
        link.connect(timeout=20)
    assert time.monotonic() - start < 8
    link.close()
    # and a plain mqtt:// client cannot talk to the TLS-only listener at all
    plain = open_link(secure_broker.url.replace("mqtts://", "mqtt://"), f"plain-{os.getpid()}")
    with pytest.raises(HiertrainError):
        plain.connect(timeout=2)
    plain.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_device_cannot_publish_into_another_devices_topics(
        secure_broker: MosquittoBroker, pki: Pki, protocol: str) -> None:
    got: queue.Queue[str] = queue.Queue()
    cloud = _link(secure_broker, _security(pki, "cloud"), "cloud")
    cloud.subscribe("hiertrain/#", lambda t, p, props: got.put(f"{t} {p.decode()}"))
    cloud.connect(timeout=10)
    robot_a = _link(secure_broker, _security(pki, "robot-a", cert_file=str(pki.client_cert),
                                             key_file=str(pki.client_key)),
                    "robot-a", protocol=protocol)
    try:
        robot_a.connect(timeout=10)
        robot_a.publish(topics.act_topic(RUN, "robot-a"), b"mine")
        assert got.get(timeout=5) == f"hiertrain/{RUN}/robot-a/act mine"
        # another device's topics, the cloud's broadcasts, and what only the cloud sends
        # robot-a (its gradients, replies and acks), in this run and in one the ACL never names
        for victim in (topics.act_topic(RUN, "robot-b"), topics.status_topic(RUN, "robot-b"),
                       topics.status_topic(RUN, "cloud"),
                       topics.grad_topic(RUN, "robot-a"), topics.infer_reply_topic(RUN, "robot-a"),
                       topics.ack_topic(RUN, "robot-a"), topics.act_topic("other-run", "robot-b")):
            if protocol == "5":  # MQTT 5: the PUBACK says "Not authorized"
                with pytest.raises(HiertrainError, match="refused the publish.*ACL"):
                    robot_a.publish(victim, b"forged")
            else:  # MQTT 3.1.1 has no way to say it: the broker acknowledges and drops
                robot_a.publish(victim, b"forged")
        robot_a.publish(topics.act_topic(RUN, "robot-a"), b"still mine")
        assert got.get(timeout=5) == f"hiertrain/{RUN}/robot-a/act still mine"
        with pytest.raises(queue.Empty):  # nothing forged ever reached the cloud
            print("unexpected:", got.get(timeout=0.5))
    finally:
        robot_a.close()
        cloud.close()


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_device_reads_only_its_own_topics_and_the_clouds_in_any_run(
        secure_broker: MosquittoBroker, pki: Pki, protocol: str) -> None:
    """With the ACL for any run id, robot-a reads what the cloud sends it alone and the
    cloud's broadcasts, and nothing of robot-b's -- also in a run the ACL never names, and
    also through a wildcard subscription."""
    mine: list[str] = []
    theirs: list[str] = []
    for run in (RUN, "any-run-7"):
        mine += [topics.grad_topic(run, "robot-a"), topics.infer_reply_topic(run, "robot-a"),
                 topics.status_topic(run, "robot-a"),
                 topics.weights_topic(run, "robot-a"), topics.status_topic(run, "cloud"),
                 topics.ack_topic(run, "robot-a")]
        theirs += [topics.act_topic(run, "robot-b"), topics.grad_topic(run, "robot-b"),
                   topics.infer_reply_topic(run, "robot-b"), topics.ack_topic(run, "robot-b"),
                   topics.status_topic(run, "robot-b"), topics.weights_topic(run, "robot-b"),
                   topics.infer_request_topic(run, "robot-b"),
                   topics.act_topic(run, "robot-a")]  # its own uploads are the cloud's to read
    got: queue.Queue[str] = queue.Queue()
    robot_a = _link(secure_broker, _security(pki, "robot-a"), "robot-a", protocol=protocol)
    cloud = _link(secure_broker, _security(pki, "cloud"), "cloud")
    try:
        robot_a.connect(timeout=10)
        for t in mine:
            robot_a.subscribe(t, lambda t, p, props: got.put(t))
        refused = []
        for t in [*theirs, "hiertrain/#"]:
            try:
                robot_a.subscribe(t, lambda t, p, props: got.put(t))
            except HiertrainError:  # mosquitto may refuse the SUBSCRIBE itself
                refused.append(t)
        assert "hiertrain/#" not in refused  # so delivery is filtered message by message
        cloud.connect(timeout=10)
        for t in [*theirs, *mine]:
            cloud.publish(t, t.encode())
        seen: set[str] = set()
        deadline = time.monotonic() + 10
        while not set(mine) <= seen and time.monotonic() < deadline:
            try:
                seen.add(got.get(timeout=0.5))
            except queue.Empty:
                pass
        time.sleep(0.5)
        while not got.empty():
            seen.add(got.get_nowait())
    finally:
        robot_a.close()
        cloud.close()
    assert seen == set(mine), {"missing": set(mine) - seen, "leaked": seen - set(mine)}


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_signed_request_and_reply_with_properties(secure_broker: MosquittoBroker, pki: Pki,
                                                  protocol: str) -> None:
    """Signing composes with MQTT 5 properties and with the 3.1.1 property envelope."""
    key = HMAC_KEY.encode()
    requests: queue.Queue[tuple[bytes, dict]] = queue.Queue()
    replies: queue.Queue[bytes] = queue.Queue()
    rejected: list[tuple[str, str]] = []
    cloud = _link(secure_broker, LinkSecurity("cloud", USERS["cloud"], str(pki.ca),
                                              hmac_key=key),
                  "cloud", protocol=protocol, on_reject=lambda r, t, d: rejected.append((r, t)))
    cloud.subscribe(topics.infer_request_wildcard(RUN),
                    lambda t, p, props: requests.put((p, props)))
    edge = _link(secure_broker, LinkSecurity("robot-a", USERS["robot-a"], str(pki.ca),
                                             hmac_key=key).for_device(RUN, "robot-a"),
                 "robot-a", protocol=protocol)
    reply_topic = topics.infer_reply_topic(RUN, "robot-a")
    edge.subscribe(reply_topic, lambda t, p, props: replies.put(p))
    try:
        cloud.connect(timeout=10)
        edge.connect(timeout=10)
        edge.publish(topics.infer_request_topic(RUN, "robot-a"), b"request",
                     properties={"response_topic": reply_topic, "correlation_data": b"c1"})
        payload, props = requests.get(timeout=5)
        assert payload == b"request" and props["correlation_data"] == b"c1"
        cloud.publish(props["response_topic"], b"reply")
        assert replies.get(timeout=5) == b"reply"
        assert edge.bytes_sent == len(b"request") + 37  # the signature is on the wire
    finally:
        edge.close()
        cloud.close()
    assert not rejected


# --------------------------------------------------------------------------- end to end


def _secret_files(d: Path, user: str) -> tuple[Path, Path]:
    """``user``'s broker password file and its signing key: the run key for the cloud, a
    device key file made by ``toolkit keys derive`` (a real process) for a device."""
    pw, run_key = d / f"{user}.pw", d / "run.key"
    pw.write_text(USERS[user] + "\n")
    run_key.write_text(HMAC_KEY + "\n")
    for p in (pw, run_key):
        p.chmod(0o600)
    if user == "cloud":
        return pw, run_key
    key = d / f"{user}.key"
    r = run_cli("toolkit", "keys", "derive", "--run-key-file", str(run_key), "--run-id", RUN,
                "--device-id", user, "-o", str(key), timeout=120)
    assert r.returncode == 0, r.stderr
    return pw, key


def test_signed_training_over_tls_end_to_end(secure_broker: MosquittoBroker, pki: Pki,
                                             artifacts: Path, tmp_path: Path,
                                             procs: ProcessGroup) -> None:
    """edge-runtime -> mosquitto (TLS, password, ACL) -> cloud-trainer, every message signed:
    the cloud with the run key, the edge with its own device key file.

    While the two train, an attacker holding the cloud's broker account (say, a compromised
    broker) injects a tampered copy, an unsigned message, a signed message replayed under
    robot-b's topic, and a new batch for robot-a signed with robot-b's device key (a rogue
    robot-b signing as robot-a): the cloud drops each with its reason, trains none of them
    and trains everything real.
    """
    run = RUN
    cloud_pw, key = _secret_files(tmp_path, "cloud")
    edge_pw, edge_key = _secret_files(tmp_path, "robot-a")
    rogue_key = DeviceKey.parse(_secret_files(tmp_path, "robot-b")[1].read_text()).key
    assert rogue_key == device_key(HMAC_KEY.encode(), run, "robot-b")
    tls = ["--ca-file", str(pki.ca)]
    run_dir = tmp_path / "cloud"
    attacker = _link(secure_broker, _security(pki, "cloud"), "attacker")
    captured: queue.Queue[bytes] = queue.Queue()
    attacker.subscribe(topics.act_topic(run, "robot-a"), lambda t, p, _: captured.put(p))
    attacker.connect(timeout=20)
    cloud = procs.start("cloud", [
        "cloud_trainer", "--artifacts", str(artifacts), "--broker", secure_broker.url,
        "--run-dir", str(run_dir), "--run-id", run, "--device-ids", "robot-a", "--threads", "1",
        "--idle-timeout", "30", "--username", "cloud", "--password-file", str(cloud_pw),
        "--hmac-key-file", str(key), *tls])
    # Subscribed before the edge starts: a 96-sample edge can be done before a cloud that is
    # still importing torch has a session to queue its batches in.
    procs.wait_until(lambda: "cloud trainer online" in procs.output("cloud"), 120,
                     "the cloud trainer did not come online", must_live=("cloud",))
    # The edge takes its password from the environment, the other supported way.
    edge = procs.start("edge", [
        "edge_runtime", "train", "--artifacts", str(artifacts), "--broker", secure_broker.url,
        "--device-id", "robot-a", "--run-id", run, "--epochs", "1", "--limit", "96",
        "--backend", "torch", "--report", str(tmp_path / "edge.json"), "--state-dir",
        str(tmp_path), "--threads", "1", "--username", "robot-a",
        "--hmac-key-file", str(edge_key), *tls],
        env={"HIERTRAIN_MQTT_PASSWORD": USERS["robot-a"]})
    try:
        real = captured.get(timeout=120)  # a signed activation batch of robot-a
        tampered = bytearray(real)
        tampered[-30] ^= 0x01  # one bit of the payload
        victim = topics.act_topic(run, "robot-a")
        attacker.publish(victim, bytes(tampered))  # -> bad_signature
        attacker.publish(victim, real[37:])  # the bare wire message, signature cut off -> unsigned
        forged = sign(b"a key that is not the run's key!", victim, real[37:])
        attacker.publish(victim, forged)  # -> bad_signature
        attacker.publish(topics.act_topic(run, "robot-b"), real)  # replay elsewhere -> bad_sig.
        # robot-b signing as robot-a: a batch robot-a never made (a fresh seq), which the
        # cloud would train as robot-a's if it took robot-b's key for robot-a's
        batch = decode(real[OVERHEAD:], expected_run_id=run)
        batch.seq = 10_000
        attacker.publish(victim, sign(rogue_key, victim, encode(batch)))  # -> bad_signature
        procs.wait_all(["edge", "cloud"], 240)
    finally:
        attacker.close()
    logs = {f.name: f.read_text() for f in tmp_path.glob("*.log")}
    assert edge.returncode == 0 and cloud.returncode == 0, {k: v[-3000:] for k, v in logs.items()}
    summary = json.loads((run_dir / "cloud_summary.json").read_text())
    report = json.loads((tmp_path / "edge.json").read_text())
    assert report["batches_published"] >= 5  # 96 samples, batch 16
    assert summary["per_device"]["robot-a"]["trained"] == report["batches_published"]
    assert summary["dropped"] == {"bad_signature": 4, "unsigned": 1}, summary["dropped"]
    assert report["config"]["security"]["device_key"] == "<redacted>"
    assert report["config"]["security"]["hmac_key"] is None  # the edge never had the run key
    assert report["config"]["security"]["password"] == "<redacted>"
    # No secret in any log, report, summary or file the run wrote.
    written = [*logs.values(), *(p.read_text(errors="replace") for p in run_dir.rglob("*")
                                 if p.is_file() and p.suffix in (".json", ".jsonl", ".csv",
                                                                 ".log", ".txt"))]
    written.append(json.dumps(report))
    secrets = [*SECRETS, *(DeviceKey.derive(HMAC_KEY.encode(), run, d).key.hex()
                           for d in ("robot-a", "robot-b"))]
    for secret in secrets:
        assert not any(secret in text for text in written), secret
