"""The baseline modes (``--mode split`` and ``--mode cloud``) against real parts.

End to end: ``python -m cloud_trainer`` and ``python -m edge_runtime`` as separate processes
through the embedded broker on 127.0.0.1 (smallcnn on digits, 2 epochs, one torch thread each),
checked for accuracy, exactly-once training and the bytes each way. Gradient plumbing: one
split-learning step with float32 both ways gives the weights of one eager step of the whole
network (run in-process with a real broker: no second torch start-up needed to prove math).
Mode mismatch: refused on both sides. Lossless upload: the cloud's model input is the edge's,
bit for bit, for digits, uint8 images and resized images.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.conftest import REPO, InProcessCloud
from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.data.datasets import batches, load_dataset, normalize
from toolkit.core.errors import HiertrainError
from toolkit.core.models.rewrites import host_stat_layers
from toolkit.core.models.segments import FullModel, load_segments
from toolkit.core.protocol.images import IMAGE_SCHEME, decode_images, encode_images
from toolkit.core.protocol.topics import status_topic
from toolkit.core.protocol.wire import ActivationBatch, decode, encode, message_size
from toolkit.lab.broker import EmbeddedBroker
from toolkit.lab.launch import ProcessGroup, start_cloud

BATCH = 32
EPOCHS = 2
TIMEOUT_S = 180


ARTIFACTS = {"digits": True, "batch": BATCH, "exit_channels": 16}
"""conftest.exported options; artifacts, manifest and broker: tests/conftest.py"""


def _run_id() -> str:
    return f"m{random.getrandbits(32):08x}"


# --------------------------------------------------------------------------- lossless upload


def _model_input_after_wire(x: torch.Tensor, mean: Any, std: Any) -> tuple[torch.Tensor, Any]:
    msg = ActivationBatch("r", "d", 0, 0, 0, labels=torch.zeros(len(x), dtype=torch.int64),
                          **encode_images(x))
    got = decode(encode(msg))
    return normalize(decode_images(got), mean, std), got


def test_uploaded_images_are_the_edges_model_input_bit_for_bit(tmp_path: Path) -> None:
    # digits (levels of 1/16), uint8 images (1/255) and images the loader resized (no grid)
    rng = np.random.default_rng(0)
    npz = tmp_path / "imgs.npz"
    u8 = rng.integers(0, 256, size=(40, 6, 6, 3), dtype=np.uint8)
    np.savez(npz, x_train=u8, y_train=np.arange(40) % 10, x_test=u8[:10],
             y_test=np.arange(10))
    cases = {
        "digits": (load_dataset(None, "train", input_shape=(1, 8, 8), limit=64).x, 1),
        "uint8": (load_dataset(str(npz), "train", input_shape=(3, 6, 6)).x, 1),
        "resized": (load_dataset(str(npz), "train", input_shape=(3, 5, 5)).x, 4),
    }
    for name, (x, bytes_per_pixel) in cases.items():
        c = x.shape[1]
        mean, std = [0.3, 0.4, 0.5][:c], [0.2, 0.25, 0.3][:c]
        got, msg = _model_input_after_wire(x, mean, std)
        assert torch.equal(got, normalize(x, mean, std)), name  # bit for bit
        assert (msg.quantized is not None) == (bytes_per_pixel == 1), name
        assert len(encode(msg)) == message_size(
            x.shape, IMAGE_SCHEME if bytes_per_pixel == 1 else None, run_id="r", device_id="d")
    # a tampered scale is refused, not decoded into other images
    msg = ActivationBatch("r", "d", 0, 0, 0, **encode_images(cases["digits"][0]))
    assert msg.quantized is not None
    msg.quantized.scale = torch.tensor([0.3])
    with pytest.raises(HiertrainError, match="scale"):
        decode_images(decode(encode(msg)))


# --------------------------------------------------------------------------- end to end


def _run_mode(mode: str, url: str, artifacts: Path, tmp: Path) -> tuple[dict, dict]:
    run = _run_id()
    cloud_dir = tmp / "cloud"
    with ProcessGroup(tmp, cwd=REPO) as procs:
        cloud = start_cloud(procs, [
            "cloud_trainer", "--mode", mode, "--artifacts", str(artifacts), "--broker", url,
            "--run-dir", str(cloud_dir), "--run-id", run, "--device-ids", "e0", "--threads", "1",
            "--quiet", "--idle-timeout", "60"], url, run)  # uploads before it subscribes are lost
        edge = procs.start("edge", [
            "edge_runtime", "train", "--mode", mode, "--artifacts", str(artifacts),
            "--broker", url, "--device-id", "e0", "--run-id", run, "--epochs", str(EPOCHS),
            "--report", str(tmp / "edge.json"), "--state-dir", str(tmp), "--threads", "1",
            "--quiet"])
        procs.wait_all(["edge", "cloud"], TIMEOUT_S)
    logs = {f.name: f.read_text()[-3000:] for f in tmp.glob("*.log")}
    assert edge.returncode == 0 and cloud.returncode == 0, logs
    return (json.loads((cloud_dir / "cloud_summary.json").read_text()),
            json.loads((tmp / "edge.json").read_text()))


def _check_common(mode: str, summary: dict, report: dict) -> None:
    keys = ("mode", "samples", "bytes_up", "bytes_down", "wall_s", "full_accuracy")
    print("edge", {k: report[k] for k in keys}, "cloud", {k: summary[k] for k in keys})
    dev = summary["per_device"]["e0"]
    assert summary["mode"] == report["mode"] == mode
    assert report["batches_published"] == EPOCHS * (report["samples"] // BATCH // EPOCHS) > 0
    assert dev["published"] == dev["trained"] == report["batches_published"]  # exactly once
    assert dev["duplicates"] == 0 and not summary["dropped"], summary
    assert summary["samples"] == report["samples"]
    assert summary["full_accuracy"] > 0.5, summary  # 10 classes: chance is 0.1
    assert summary["exit_accuracy"] is None and report["exit_accuracy"] is None
    assert report["full_accuracy"] is None  # measured by the cloud
    assert report["wall_s"] > 0 and summary["wall_s"] > 0
    # the cloud received at least every upload the edge reports
    assert summary["bytes_up_per_device"]["e0"] >= report["act_bytes_sent"] > 0
    assert report["bytes_up"] >= report["act_bytes_sent"]


@pytest.mark.mqtt
def test_split_learning_trains_end_to_end(artifacts: Path, manifest: Manifest,
                                          broker: EmbeddedBroker, tmp_path: Path) -> None:
    summary, report = _run_mode("split", broker.url, artifacts, tmp_path)
    _check_common("split", summary, report)
    grad_bytes = report["batches_published"] * message_size(
        (BATCH, *manifest.cut_shape), None, run_id=summary["run_id"], device_id="e0",
        has_labels=False)  # float32 gradients, one per batch
    assert summary["bytes_down"] == summary["bytes_down_per_device"]["e0"] == grad_bytes
    assert report["bytes_down"] >= grad_bytes  # plus the cloud's status messages
    assert report["backend"] == "torch" and report["grad_wait_s"] > 0
    assert report["payload_bytes_per_sample"] < report["float32_bytes_per_sample"] / 2  # int8
    assert summary["eval_edge_device"] == "e0"  # scored with the edge's published weights


@pytest.mark.mqtt
def test_cloud_mode_trains_end_to_end(artifacts: Path, manifest: Manifest,
                                      broker: EmbeddedBroker, tmp_path: Path) -> None:
    summary, report = _run_mode("cloud", broker.url, artifacts, tmp_path)
    _check_common("cloud", summary, report)
    assert summary["bytes_down"] == 0  # the cloud sent nothing to the edge
    # The edge subscribes to nothing; amqtt still hands a connecting client the retained
    # statuses of the run (seen here, a few hundred bytes): far less than one gradient.
    one_grad = message_size((BATCH, *manifest.cut_shape), None, run_id=summary["run_id"],
                            device_id="e0", has_labels=False)
    assert report["bytes_down"] < one_grad
    # one byte per pixel: digits travel losslessly on their 1/16 grid
    per_batch = message_size((BATCH, *manifest.input_shape), IMAGE_SCHEME,
                             run_id=summary["run_id"], device_id="e0")
    assert report["act_bytes_sent"] == report["batches_published"] * per_batch
    assert report["float32_batches"] == 0


# --------------------------------------------------------------------------- in-process


def _Cloud(artifacts: Path, url: str, run_dir: Path, run: str, **kw: Any) -> InProcessCloud:
    """The cloud on a thread; its error is kept in ``.error`` for the test to check."""
    return InProcessCloud(artifacts, url, run_dir, run, reraise=False, **kw)


def _edge_cfg(artifacts: Path, url: str, run: str, tmp: Path, **kw: Any):
    from edge_runtime.train import TrainConfig

    return TrainConfig(artifacts=artifacts, broker=url, device_id="e0", run_id=run,
                       state_dir=tmp, quiet=True, connect_timeout=10, **kw)


@pytest.mark.mqtt
def test_one_split_step_is_one_step_of_the_whole_network(
        artifacts: Path, manifest: Manifest, broker: EmbeddedBroker, tmp_path: Path) -> None:
    """float32 up, float32 down: the split step must be exactly the chain rule."""
    from cloud_trainer.optim import make_optimizer
    from edge_runtime.train import load_training_data, run_training

    run = _run_id()
    cloud = _Cloud(artifacts, broker.url, tmp_path / "cloud", run, mode="split", grad_bits=32,
                   device_ids=["e0"], idle_timeout=30)
    report = run_training(_edge_cfg(artifacts, broker.url, run, tmp_path, mode="split",
                                    float_act=True, epochs=1, limit=BATCH, grad_timeout=60))
    cloud.join(60)
    assert cloud.error is None, cloud.error
    assert report["batches_published"] == 1 and report["act_codec"] == "float32"

    ref = load_segments(manifest)
    full = FullModel(ref.step.edge, ref.cloud).train()
    opt = make_optimizer(full.parameters(), manifest)
    ds = load_training_data(manifest, None, "0/1", limit=BATCH, seed=0)
    x, y = next(batches(ds, BATCH, epoch=0, seed=0))
    loss = F.cross_entropy(full(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    for _, layer in host_stat_layers(ref.step.edge):
        layer.update_running_stats(*layer.last_stats)

    edge_got = torch.load(report["weights_path"], weights_only=True)
    cloud_got = torch.load(tmp_path / "cloud" / "cloud_final.pt", weights_only=True)
    init = load_segments(manifest)
    moved = 0
    for want_state, got, before in ((ref.step.state_dict(), edge_got, init.step.state_dict()),
                                    (ref.cloud.state_dict(), cloud_got, init.cloud.state_dict())):
        assert set(got) == set(want_state)
        for k, want in want_state.items():
            if want.is_floating_point():
                torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-7, msg=k)
                moved += not torch.equal(want, before[k])
            else:
                assert torch.equal(got[k], want), k
    assert moved > 10  # the step changed the weights (else the comparison proves nothing)


@pytest.mark.mqtt
def test_split_with_int8_gradients(artifacts: Path, manifest: Manifest, broker: EmbeddedBroker,
                                   tmp_path: Path) -> None:
    from cloud_trainer.modes.split import GRAD_SCHEME
    from edge_runtime.train import run_training

    run = _run_id()
    cloud = _Cloud(artifacts, broker.url, tmp_path / "cloud", run, mode="split", grad_bits=8,
                   device_ids=["e0"], idle_timeout=30)
    report = run_training(_edge_cfg(artifacts, broker.url, run, tmp_path, mode="split",
                                    epochs=1, limit=3 * BATCH, grad_timeout=60))
    cloud.join(60)
    assert cloud.error is None, cloud.error
    assert cloud.summary is not None and cloud.summary["per_device"]["e0"]["trained"] == 3
    per_grad = message_size((BATCH, *manifest.cut_shape), GRAD_SCHEME, run_id=run,
                            device_id="e0", has_labels=False)
    assert cloud.summary["bytes_down"] == 3 * per_grad  # one byte per gradient element
    assert report["bytes_down"] >= 3 * per_grad and report["malformed_grads"] == 0


@pytest.mark.mqtt
def test_a_mode_mismatch_is_refused_on_both_sides(
        artifacts: Path, broker: EmbeddedBroker, tmp_path: Path) -> None:
    from edge_runtime.train import run_training

    # a split edge meets an ht cloud: the edge stops at once, naming both modes
    run = _run_id()
    cloud = _Cloud(artifacts, broker.url, tmp_path / "c1", run, mode="ht",
                   device_ids=["e0"], idle_timeout=3)
    time.sleep(1.0)
    t = time.monotonic()
    with pytest.raises(HiertrainError, match=r"--mode split.*--mode ht"):
        run_training(_edge_cfg(artifacts, broker.url, run, tmp_path, mode="split", epochs=1,
                               limit=BATCH, grad_timeout=60))
    assert time.monotonic() - t < 30  # refused, not timed out
    cloud.join(60)
    assert isinstance(cloud.error, HiertrainError) and "--mode split" in str(cloud.error)

    # an uploading (cloud-mode) edge meets an ht cloud: nothing it sends is trained
    run = _run_id()
    cloud = _Cloud(artifacts, broker.url, tmp_path / "c2", run, mode="ht",
                   device_ids=["e0"], idle_timeout=3)
    time.sleep(1.0)
    report = run_training(_edge_cfg(artifacts, broker.url, run, tmp_path, mode="cloud",
                                    epochs=1, limit=4 * BATCH))
    cloud.join(60)
    assert isinstance(cloud.error, HiertrainError), cloud.error
    assert "refused" in str(cloud.error) and "--mode cloud" in str(cloud.error)
    summary = json.loads((tmp_path / "c2" / "cloud_summary.json").read_text())
    assert summary["batches_trained"] == 0
    assert summary["dropped"]["mode"] >= 1 + report["batches_published"]  # status + every batch


def test_only_a_live_status_of_another_mode_refuses_a_device() -> None:
    from cloud_trainer.ingest import DeviceRegistry, DropCounter, Ingest, Ledger
    from toolkit.core.protocol.messages import Status

    ingest = Ingest("r", cut_shape=(4, 2, 2), num_classes=10, max_batch=64, ledger=Ledger(),
                    registry=DeviceRegistry(), drops=DropCounter(), mode="ht")

    def status(device: str, state: str, **extra: Any) -> None:
        ingest.on_status(status_topic("r", device),
                         Status("edge", device, "r", state, extra=extra).encode(), {})

    status("old", "done", mode="split")  # retained from an earlier split run: not refused
    status("old", "online", mode="ht")
    status("legacy", "online")  # an edge from before modes: ht
    status("e0", "online", mode="split")
    status("e0", "done", mode="split")
    assert ingest.registry.admitted() == ["old", "legacy"]
    assert list(ingest.registry.refused()) == ["e0"]
    assert "--mode split" in ingest.registry.refused()["e0"]
    assert ingest.drops.snapshot() == {"mode": 2}


def test_split_refuses_the_executorch_backend(artifacts: Path, tmp_path: Path) -> None:
    from edge_runtime.train import run_training

    with pytest.raises(HiertrainError, match="torch backend"):
        run_training(_edge_cfg(artifacts, "mqtt://127.0.0.1:1", _run_id(), tmp_path,
                               mode="split", backend="executorch"))


@pytest.mark.mqtt
def test_cloud_mode_resumes_with_its_trained_edge_segment(
        artifacts: Path, broker: EmbeddedBroker, tmp_path: Path) -> None:
    """The checkpoint holds the edge segment the cloud trained, and only a cloud-mode run
    may resume it."""
    from edge_runtime.train import run_training

    run, run_dir = _run_id(), tmp_path / "cloud"
    cloud = _Cloud(artifacts, broker.url, run_dir, run, mode="cloud", device_ids=["e0"],
                   idle_timeout=30)
    time.sleep(1.0)  # subscribed before the uploads (the cloud is in this process already)
    run_training(_edge_cfg(artifacts, broker.url, run, tmp_path, mode="cloud", epochs=1,
                           limit=8 * BATCH))
    cloud.join(60)
    assert cloud.error is None, cloud.error
    first = cloud.summary
    assert first is not None and first["batches_trained"] == 8

    # Restarted: the edge's retained "done" status and the checkpoint say all is trained.
    again = _Cloud(artifacts, broker.url, run_dir, run, mode="cloud", device_ids=["e0"],
                   idle_timeout=30)
    again.join(60)
    assert again.error is None, again.error
    assert again.summary is not None and again.summary["resumed_batches"] == 8
    assert again.summary["session_batches_trained"] == 0
    assert again.summary["full_accuracy"] == first["full_accuracy"]  # same trained edge + cloud

    with pytest.raises(HiertrainError, match="--mode cloud"):
        from cloud_trainer.trainer import CloudConfig, build_run

        build_run(CloudConfig(artifacts=artifacts, broker=broker.url, run_dir=run_dir,
                              run_id=run, mode="ht"))
