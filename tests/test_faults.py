"""Delivery and resume under faults (docs/delivery.md), marker ``faults``.

The main test runs a real cloud trainer and a real edge runtime (processes) on a real
mosquitto with persistence, the edge through a TCP proxy paced like a slow uplink, and
in turn SIGKILLs and restarts the broker, the cloud trainer and the edge (``--resume``),
and cuts the edge's link for a while. It then checks the sequence-number ledger: every
batch the edge produced was trained exactly once, and the final accuracy is within
noise of an undisturbed run of the same configuration, run alongside.

The spool and the persistent session are also tested on their own (no processes).
The soak (many random cycles) is ``benchmarks/faults_soak.py``.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_runtime.publisher import Publisher
from edge_runtime.spool import Spool
from tests.conftest import REPO, wait_until
from toolkit.core.artifacts.boards import DEFAULT_SPOOL_MB, load_board
from toolkit.core.errors import HiertrainError
from toolkit.core.protocol.messages import Ack
from toolkit.core.transport import open_link
from toolkit.lab.broker import EmbeddedBroker, MosquittoBroker, find_mosquitto, free_port
from toolkit.lab.faults import Broker, Run

needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None,
                                     reason="mosquitto not installed (apt-get install mosquitto)")

ACCURACY_FLOOR = 0.85
"""Both runs must learn digits (an undisturbed 1-epoch run reaches ~0.95)."""
ACCURACY_TOLERANCE = 0.06
"""|faulted - undisturbed| full accuracy on the 360 test digits. The faulted run trains
the same batches once each but in another order on the cloud (resent batches arrive
late), and the edge's exit head sees the same data; seeds vary between runs of this
test, and accuracy varies by ~2-3 points between otherwise identical runs, so 6 points
is two such spreads, while losing or repeating a fifth of the batches costs more."""


# ------------------------------------------------------------------------- spool


@pytest.mark.faults
def test_spool_survives_reopen_and_blocks_when_full(tmp_path: Path) -> None:
    """What the edge relies on: rows and ``next_seq`` survive closing (a kill), a full
    spool blocks the producer until an ack frees room, and acked rows go."""
    path = tmp_path / "s.sqlite"
    sp = Spool(path, max_bytes=302)
    for seq in range(3):
        sp.append("t/act", bytes(100), seq=seq)
    sp.append("t/status", b"{}", retain=True, kind="status")
    assert sp.bytes == 302 and len(sp) == 4
    sp.close()

    sp = Spool(path, max_bytes=302)  # as after a SIGKILL: committed rows are there
    assert sp.next_seq == 3 and sp.pending_seqs() == [0, 1, 2]
    row = sp.next_after(0)
    assert row is not None and row.seq == 0 and row.payload == bytes(100)
    done = threading.Event()

    def producer() -> None:
        sp.append("t/act", bytes(100), seq=3)  # full: waits for the ack below
        done.set()

    threading.Thread(target=producer, daemon=True).start()
    time.sleep(0.5)
    assert not done.is_set(), "a full spool must block (policy: block, lose nothing)"
    assert sp.confirm(2) == 2  # the cloud acks seqs 0 and 1
    assert done.wait(5)
    assert sp.pending_seqs() == [2, 3] and sp.next_seq == 4 and sp.full_waits == 1
    with pytest.raises(HiertrainError, match="stayed full"):
        sp.append("t/act", bytes(250), seq=4, timeout=0.3)
    assert sp.clear() == 3 and sp.next_seq == 0
    sp.close()


@pytest.mark.faults
def test_spool_budget_comes_from_the_board_profile(tmp_path: Path) -> None:
    good = Path(__file__).resolve().parents[1] / "firmware_configs" / "rpi5.yaml"
    assert load_board("rpi5").spool_mb == 1024 and load_board("rpi4").spool_mb == 512
    p = tmp_path / "mine.yaml"
    p.write_text(good.read_text().replace("spool_mb: 1024", "spool_mb: -5"))
    with pytest.raises(HiertrainError, match="'mqtt.spool_mb' must be a positive int"):
        load_board(str(p))
    p.write_text(good.read_text().replace("  spool_mb: 1024\n", ""))
    assert load_board(str(p)).spool_mb == DEFAULT_SPOOL_MB


@pytest.mark.faults
@pytest.mark.mqtt
def test_publisher_keeps_batches_until_acked_and_resends_when_the_cloud_restarts(
        tmp_path: Path) -> None:
    """A PUBACK does not free a batch, the cloud's ack does; a gap below an acked seq, or
    an ack from a new trainer instance, sends what is left again; a seq already spooled
    is not spooled twice."""
    got: queue.Queue[int] = queue.Queue()
    with EmbeddedBroker() as broker:
        sub = open_link(broker.url, f"sub-{os.getpid()}")
        sub.subscribe("hiertrain/r/e0/act", lambda t, p, props: got.put(int(p)))
        sub.connect(timeout=10)
        link = open_link(broker.url, f"edge-{os.getpid()}")
        link.connect(timeout=10)
        spool = Spool(tmp_path / "spool.sqlite", 1 << 20)
        pub = Publisher(link, spool=spool, device="e0")
        try:
            for seq in range(5):
                assert pub.submit("hiertrain/r/e0/act", b"%d" % seq, seq=seq)
            pub.flush(10)

            def received(n: int) -> list[int]:
                return sorted(got.get(timeout=10) for _ in range(n))

            assert received(5) == [0, 1, 2, 3, 4]
            assert spool.pending_seqs() == [0, 1, 2, 3, 4]  # acknowledged by the broker only
            pub.on_ack(Ack(run="r", instance="A", connects=1,
                           trained={"e0": {"low": 2, "above": [4]}}))
            assert spool.pending_seqs() == [2, 3]
            assert received(2) == [2, 3]  # 2 and 3 pending below acked 4: lost, resend
            pub.on_ack(Ack(run="r", instance="A", connects=1, trained={"e0": {"low": 3,
                                                                              "above": []}}))
            time.sleep(0.5)
            assert got.empty()  # same trainer, same session: no resend
            pub.on_ack(Ack(run="r", instance="B", connects=1, trained={"e0": {"low": 3,
                                                                              "above": []}}))
            assert received(1) == [3]  # the trainer restarted: seq 3 again
            assert not pub.submit("hiertrain/r/e0/act", b"3", seq=3)  # spooled before
            # The subscriber can see a resend before its PUBACK reaches the publisher,
            # which counts it after the PUBACK: wait (bounded) for the count to land.
            wait_until(lambda: pub.stats.resent >= 3, 10, "the third resend to be counted")
            assert pub.stats.resent == 3 and pub.stats.rewinds == 2 and pub.stats.skipped == 1
            assert pub.stats.confirmed == 4
        finally:
            pub.close()
            spool.close()
            link.close()
            sub.close()


@pytest.mark.faults
@pytest.mark.mqtt
def test_a_full_spool_without_any_ack_falls_back_to_puback(tmp_path: Path) -> None:
    """No trainer that acks (an older one, or an ACL hiding the acks): a full spool must
    not block training for good; it frees batches at the broker's PUBACK instead."""
    with EmbeddedBroker() as broker:
        link = open_link(broker.url, f"edge-{os.getpid()}")
        link.connect(timeout=10)
        spool = Spool(tmp_path / "spool.sqlite", 350)
        pub = Publisher(link, spool=spool, device="e0", block_timeout=20, ack_grace_s=1.0)
        try:
            for seq in range(10):  # 1000 bytes through a 350-byte spool
                assert pub.submit("hiertrain/r/e0/act", bytes(100), seq=seq)
            pub.flush(10)
            assert pub.device is None and spool.full_waits >= 1
            assert len(spool.pending_seqs()) <= 3 and pub.stats.acked == 10
        finally:
            pub.close()
            spool.close()
            link.close()


# ---------------------------------------------------------- persistent session


@pytest.mark.faults
@pytest.mark.mosquitto
@needs_mosquitto
def test_persistent_session_keeps_batches_across_subscriber_and_broker_restarts(
        tmp_path: Path) -> None:
    """QoS 1 messages published while the subscriber is gone are queued by the broker for
    its session, and survive a broker restart (mosquitto persistence), in order."""
    port = free_port()
    broker = MosquittoBroker(port=port, persistence=tmp_path / "db").start(timeout=15)
    got: queue.Queue[bytes] = queue.Queue()
    cid = f"sub-{os.getpid()}-{random.getrandbits(20):05x}"
    sub = pub = None
    try:
        sub = open_link(broker.url, cid, session_expiry=300)
        sub.subscribe("hiertrain/t/+/act", lambda t, p, props: got.put(p))
        sub.connect(timeout=10)
        sub.close()  # keeps the session
        pub = open_link(broker.url, f"pub-{cid}")
        pub.connect(timeout=10)
        for i in range(5):
            pub.publish("hiertrain/t/e0/act", b"m%d" % i)
        pub.close()
        broker.stop()  # a graceful restart saves the database
        broker = MosquittoBroker(port=port, persistence=tmp_path / "db").start(timeout=15)
        sub = open_link(broker.url, cid, session_expiry=300)
        sub.subscribe("hiertrain/t/+/act", lambda t, p, props: got.put(p))
        sub.connect(timeout=10)
        received = [got.get(timeout=10) for _ in range(5)]
        assert received == [b"m%d" % i for i in range(5)]
        sub.end_session = True
    finally:
        for link in (sub, pub):
            if link is not None:
                link.close()
        broker.stop()


# ------------------------------------------------------------------- the faults


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    if find_mosquitto() is None:
        pytest.skip("mosquitto not installed (apt-get install mosquitto)")
    b = Broker(tmp_path / "mosquitto-db")
    yield b
    b.stop()


@pytest.mark.faults
@pytest.mark.mosquitto
@pytest.mark.slow
def test_kills_and_link_drop_train_every_batch_exactly_once(artifacts: Path, broker: Broker,
                                                           tmp_path: Path) -> None:
    """SIGKILL + restart the edge (``--resume``), then the broker, then the cloud trainer,
    then cut the edge's link for 4 s; one epoch of 89 batches paced at ~7 batches/s.
    Every seq 0..88 must be in the cloud's trained ledger once (``batches_trained`` counts
    the surviving model's steps, so a batch trained twice would make it larger), the edge
    must end with an empty spool, and accuracy must match the undisturbed run."""
    ref_broker = Broker(tmp_path / "ref-db")  # the undisturbed run gets a broker of its own
    ref = Run(tmp_path / "ref", artifacts, ref_broker, epochs=1, rate=None, run="ref", cwd=REPO)
    run = Run(tmp_path / "faulted", artifacts, broker, epochs=1, rate=30_000, run="faulted",
              cwd=REPO)
    try:
        ref.start_cloud()
        run.start_cloud()
        ref.start_edge()
        run.start_edge()
        # The edge first: its restart sends its whole spool, which would also repair what
        # the later faults lose; after it, only the resends they trigger can.
        run.wait_until(lambda: run.edge_seq() >= 20, 120, "edge at seq 20")
        run.crash_edge(1.0)
        run.wait_until(lambda: run.edge_seq() >= 35, 120, "resumed edge at seq 35")
        run.crash_broker(2.0)
        run.wait_until(lambda: run.cloud_trained() >= 50, 90, "cloud checkpoint at 50")
        time.sleep(1.0)  # ~7 batches trained after that checkpoint die with the trainer
        run.crash_cloud(1.0)
        run.wait_until(lambda: run.edge_seq() >= 70, 120, "edge at seq 70")
        run.drop_link(4.0)
        res = run.finish(180)
        base = ref.finish(60)
    finally:
        run.close()
        ref.close()
        ref_broker.stop()
    total = 89  # 1437 digits // 16
    cloud, edge, ledger = res["cloud"], res["edge"], res["ledger"]
    assert run.kills == {"broker": 1, "cloud": 1, "edge": 1, "link": 1}
    assert cloud["complete"] and cloud["per_device"]["e0"]["published"] == total
    assert ledger["trained"] == {"low": total, "above": []}  # each seq 0..88, no gaps
    assert ledger["batches_trained"] == cloud["batches_trained"] == total  # none twice
    assert cloud["per_device"]["e0"]["trained"] == total
    assert edge["batches_published"] == total and edge["delivery"]["resumed"] is not None
    assert edge["delivery"]["confirmed"] and edge["delivery"]["spool_pending"] == 0
    assert edge["delivery"]["rewinds"] >= 1  # the broker, cloud and link faults made it resend
    assert base["ledger"]["trained"] == {"low": total, "above": []}
    faulted_acc, base_acc = cloud["full_accuracy"], base["cloud"]["full_accuracy"]
    assert min(faulted_acc, base_acc) >= ACCURACY_FLOOR, (faulted_acc, base_acc)
    assert abs(faulted_acc - base_acc) <= ACCURACY_TOLERANCE, (faulted_acc, base_acc)
