"""Streaming image folders (toolkit.core.data.stream) against real files, real DataLoader
worker processes, a real broker on 127.0.0.1 and real edge-runtime / cloud-trainer processes.

The folders are digits written as PNG and JPEG files at 20 x 20 (so the stream resizes them
to the exported 8 x 8), a few hundred images: small, but every path a 224-px folder takes.
"""

from __future__ import annotations

import json
import secrets
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edge_runtime.train import TrainConfig, open_training_data, run_training
from tests.conftest import REPO, wait_until
from toolkit.core.data.augment import Augment
from toolkit.core.data.datasets import Dataset, batches, load_dataset, normalize, shard
from toolkit.core.data.live import ReplayBuffer, SidecarLabels, label_source
from toolkit.core.data.stream import FolderStream
from toolkit.core.errors import HiertrainError
from toolkit.core.protocol.codec import decode
from toolkit.core.protocol.topics import act_topic
from toolkit.core.transport import open_link
from toolkit.lab.launch import start_cloud

ARTIFACTS = {"digits": True}
"""conftest.exported options: smallcnn on 1 x 8 x 8, batch 16, with the digits mean/std."""
BATCH = 16
SIZE = 20  # pixels on disk; the model takes 8 x 8
MEAN, STD = (0.3,), (0.37,)


def write_digits(root: Path, n: int, *, start: int = 0) -> Path:
    """``n`` digits as ``root/<label>/<i>.png|jpg`` (every third one JPEG), upscaled to SIZE."""
    ds = load_dataset("digits", "train")
    for i in range(start, start + n):
        x, y = ds.x[i % len(ds), 0], int(ds.y[i % len(ds)])
        img = Image.fromarray((x.numpy() * 255).round().astype(np.uint8)).resize(
            (SIZE, SIZE), Image.NEAREST)
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        img.save(root / str(y) / (f"{i:05d}.jpg" if i % 3 == 0 else f"{i:05d}.png"))
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_digits(tmp_path_factory.mktemp("frames") / "digits", 300)


def _in_memory(root: Path, shard_spec: tuple[int, int] = (0, 1), limit: int | None = None
               ) -> Dataset:
    ds = load_dataset(str(root), "train", input_shape=(1, 8, 8), limit=limit, seed=0)
    if shard_spec[1] > 1:
        ds = shard(ds, *shard_spec)
    return Dataset(normalize(ds.x, MEAN, STD), ds.y, ds.classes, ds.name)


# --------------------------------------------------------------------------- the stream itself


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.parametrize("shard_spec", [(0, 1), (1, 2)])
def test_stream_gives_the_in_memory_batches(folder: Path, workers: int,
                                            shard_spec: tuple[int, int]) -> None:
    """Same samples, order and pixels as load_dataset + shard + batches, per (seed, epoch)."""
    mem = _in_memory(folder, shard_spec)
    stream = FolderStream(folder, input_shape=(1, 8, 8), mean=MEAN, std=STD, shard=shard_spec,
                          workers=workers)
    assert len(stream) == len(mem) and stream.classes == mem.classes
    for epoch, seed in [(0, 0), (2, 5)]:
        got = list(stream.batches(BATCH, epoch=epoch, seed=seed))
        want = list(batches(mem, BATCH, epoch=epoch, seed=seed))
        assert len(got) == len(want) == len(mem) // BATCH
        for (xs, ys), (xm, ym) in zip(got, want, strict=True):
            assert xs.shape == xm.shape == (BATCH, 1, 8, 8) and xs.dtype == torch.float32
            assert torch.equal(ys, ym)
            torch.testing.assert_close(xs, xm, atol=1e-5, rtol=0)  # float rounding only
    # the order really moves with the epoch
    first = [y for _, y in stream.batches(BATCH, epoch=0, seed=0)]
    other = [y for _, y in stream.batches(BATCH, epoch=1, seed=0)]
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_limit_picks_the_same_samples_as_the_in_memory_load(folder: Path) -> None:
    mem = _in_memory(folder, limit=100)
    stream = FolderStream(folder, input_shape=(1, 8, 8), mean=MEAN, std=STD, limit=100,
                          workers=0)
    got = torch.cat([y for _, y in stream.batches(BATCH, epoch=0, seed=0)])
    want = torch.cat([y for _, y in batches(mem, BATCH, epoch=0, seed=0)])
    assert len(stream) == 100 and torch.equal(got, want)


@pytest.mark.parametrize("augment", [Augment(), Augment(flip=True, crop=True, color=True)])
def test_starting_mid_epoch_gives_the_remaining_batches(folder: Path, augment: Augment) -> None:
    """``start=k`` (what --resume asks for) yields batches k.. of the same epoch, pixel for
    pixel, augmentation included, and with another number of workers."""
    a = FolderStream(folder, input_shape=(1, 8, 8), mean=MEAN, std=STD, augment=augment,
                     workers=1)
    b = FolderStream(folder, input_shape=(1, 8, 8), mean=MEAN, std=STD, augment=augment,
                     workers=0)
    whole = list(a.batches(BATCH, epoch=1, seed=3))
    rest = list(b.batches(BATCH, epoch=1, seed=3, start=5))
    assert len(rest) == len(whole) - 5
    for (xw, yw), (xr, yr) in zip(whole[5:], rest, strict=True):
        assert torch.equal(xw, xr) and torch.equal(yw, yr)


def test_augmentation_changes_pixels_per_epoch_but_not_labels(folder: Path) -> None:
    plain = FolderStream(folder, input_shape=(1, 8, 8), workers=0)
    aug = FolderStream(folder, input_shape=(1, 8, 8), augment=Augment.parse("flip,crop"),
                       workers=0)
    (xp, yp), (xa, ya) = next(plain.batches(BATCH, epoch=0, seed=0)), \
        next(aug.batches(BATCH, epoch=0, seed=0))
    assert torch.equal(yp, ya) and not torch.equal(xp, xa)
    assert xa.min() >= 0 and xa.max() <= 1  # no normalisation asked: [0, 1] pixels
    assert aug.describe()["augment"] == ["flip", "crop"]
    again = next(aug.batches(BATCH, epoch=0, seed=0))[0]
    assert torch.equal(xa, again)  # the same (seed, epoch): the same draws
    later = torch.cat([x for x, _ in aug.batches(BATCH, epoch=1, seed=0)])
    same_images = torch.cat([x for x, _ in plain.batches(BATCH, epoch=1, seed=0)])
    assert not torch.equal(later, same_images)


def test_augment_names_are_checked() -> None:
    assert Augment.parse("none") == Augment() and not Augment.parse("")
    assert Augment.parse(" crop , flip").names == ["flip", "crop"]
    with pytest.raises(HiertrainError, match="unknown augmentation 'blur'.*flip, crop, color"):
        Augment.parse("flip,blur")


def test_bad_folders_are_one_sentence_errors(tmp_path: Path, folder: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "x.png")
    with pytest.raises(HiertrainError, match="not a dataset folder layout"):
        FolderStream(flat, input_shape=(1, 8, 8))
    with pytest.raises(HiertrainError, match="shard 2 of 2"):
        FolderStream(folder, input_shape=(1, 8, 8), shard=(2, 2))
    small = write_digits(tmp_path / "small", 10)
    with pytest.raises(HiertrainError, match="fewer than one batch"):
        FolderStream(small, input_shape=(1, 8, 8), workers=0).batches(BATCH, epoch=0, seed=0)
    broken = write_digits(tmp_path / "broken", 40)
    stream = FolderStream(broken, input_shape=(1, 8, 8), workers=1)  # indexed, not decoded
    victim = Path(str(stream.images.paths[7]))  # a training image
    victim.write_bytes(b"not an image")
    with pytest.raises(HiertrainError, match=f"cannot read image {victim}") as info:
        for _ in stream.batches(BATCH, epoch=0, seed=0):  # 32 samples: all in this epoch
            pass
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- through the edge


def _uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


class Acts:
    """Every activation message of one device, decoded, from a subscriber on the broker."""

    def __init__(self, url: str, run: str, device: str) -> None:
        self.run, self.items, self.lock = run, [], threading.Lock()
        self.link = open_link(url, _uid("acts"))
        self.link.subscribe(act_topic(run, device), self._on)
        self.link.connect(timeout=10)

    def _on(self, topic: str, payload: bytes, props: dict) -> None:
        with self.lock:
            self.items.append(decode(bytes(payload), expected_run_id=self.run))

    def by_seq(self) -> dict:
        with self.lock:
            return {a.seq: a for a in self.items}

    def close(self) -> None:
        self.link.close()


@pytest.mark.mqtt
def test_resume_mid_epoch_trains_the_remaining_batches(artifacts, manifest, broker, folder,
                                                       tmp_path):
    """--max-batches stops mid-epoch with a checkpoint; --resume publishes exactly the rest
    of that epoch, in the order an uninterrupted run would have used."""
    run, dev = _uid("run"), "cam-0"
    acts = Acts(broker.url, run, dev)
    base = dict(artifacts=artifacts, broker=broker.url, device_id=dev, run_id=run, epochs=1,
                data=str(folder), quiet=True, connect_timeout=10, state_dir=tmp_path,
                confirm_timeout=0, workers=0, backend="torch")
    try:
        first = run_training(TrainConfig(**base, max_batches=4))
        assert first["batches_published"] == 4 and first["data"]["kind"] == "image-folder stream"
        second = run_training(TrainConfig(**base, resume=True))
        per_epoch = len(open_training_data(manifest, TrainConfig(**base))) // BATCH
        assert second["delivery"]["resumed"] == {"epoch": 0, "batch": 4, "seq": 4}
        assert second["batches_published"] == per_epoch
        wait_until(lambda: len(acts.by_seq()) >= per_epoch, 20, "every activation")
        got = acts.by_seq()
    finally:
        acts.close()
    want = list(FolderStream(folder, input_shape=(1, 8, 8), workers=0).batches(
        BATCH, epoch=0, seed=0))
    assert sorted(got) == list(range(per_epoch))
    for seq, (_, y) in enumerate(want):
        assert (got[seq].epoch, got[seq].batch_index) == (0, seq)
        assert torch.equal(got[seq].labels, y), seq


@pytest.mark.mqtt
def test_edge_runtime_train_streams_a_folder_to_the_cloud(artifacts, broker, folder, tmp_path,
                                                          procs):
    """``edge-runtime train --data DIR`` as a real process, decoding in a worker process,
    with augmentation; a real cloud trainer trains every batch it publishes."""
    run = _uid("run")
    cloud = start_cloud(procs, ["cloud_trainer", "--artifacts", str(artifacts), "--broker",
                                broker.url, "--run-dir", str(tmp_path / "cloud"), "--run-id",
                                run, "--devices", "1", "--eval-data", str(folder),
                                "--threads", "1", "--quiet", "--idle-timeout", "60"],
                        broker.url, run)
    edge = procs.start("edge", [
        "edge_runtime", "train", "--artifacts", str(artifacts), "--broker", broker.url,
        "--device-id", "cam-0", "--run-id", run, "--epochs", "2", "--data", str(folder),
        "--workers", "1", "--augment", "flip,crop", "--report", str(tmp_path / "edge.json"),
        "--state-dir", str(tmp_path), "--threads", "1", "--quiet"])
    procs.wait_all(timeout=300)
    logs = {f.name: f.read_text()[-3000:] for f in tmp_path.glob("*.log")}
    assert edge.returncode == 0 and cloud.returncode == 0, logs
    report = json.loads((tmp_path / "edge.json").read_text())
    summary = json.loads((tmp_path / "cloud" / "cloud_summary.json").read_text())
    n = 2 * (240 // BATCH)  # 300 images, 20 % held out
    assert report["batches_published"] == n
    assert report["data"] == {"kind": "image-folder stream", "name": "digits",
                              "root": str(folder), "samples": 240, "workers": 1,
                              "prefetch": 2, "augment": ["flip", "crop"]}
    assert report["config"]["augment"] == {"flip": True, "crop": True, "color": False}
    assert summary["per_device"]["cam-0"]["trained"] == n
    assert not summary.get("dropped"), summary


def test_cli_bad_data_folder_is_one_line(artifacts, cli_in_process, tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "x.png")
    for extra, words in [(["--data", str(flat)], "not a dataset folder layout"),
                         (["--augment", "color"], "--augment color needs the raw pixels"),
                         (["--data", str(flat), "--live", "--lr-schedule", "cosine"],
                          "needs a known number of batches"),
                         (["--augment", "blur"], "unknown augmentation 'blur'"),
                         (["--workers", "-1"], "expected an integer >= 0"),
                         (["--data", str(flat), "--max-batches", "0"], "positive integer")]:
        res = cli_in_process("edge-runtime", "train", "--artifacts", str(artifacts), "--broker",
                             "mqtt://127.0.0.1:1", "--device-id", "d", "--state-dir",
                             str(tmp_path), "--quiet", *extra)
        assert res.returncode in (2, 3), (extra, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert words in lines[-1] and "Traceback" not in res.stderr, (extra, res.stderr)


# --------------------------------------------------------------------------- live source


def test_replay_buffer_is_a_bounded_uniform_sample() -> None:
    buf = ReplayBuffer(10, np.random.default_rng(0))
    for i in range(1000):
        buf.offer((torch.zeros(1), i))
        assert len(buf) <= 10
    kept = [label for _, label in buf.items]
    assert buf.peak == 10 and len(set(kept)) == 10
    assert max(kept) > 100  # not just the first ten: later items replace earlier ones
    assert len({label for _, label in buf.draw(10)}) == 10  # distinct draws
    none = ReplayBuffer(0, np.random.default_rng(0))
    none.offer((torch.zeros(1), 0))
    assert len(none) == 0


def test_sidecar_labels_are_read_as_the_file_grows(tmp_path: Path) -> None:
    side = tmp_path / "labels.csv"
    side.write_text("file,label\na.png,1\nb.png,")  # b's line is still being written
    labels = SidecarLabels(side)
    assert labels(tmp_path / "a.png") == 1 and labels(tmp_path / "b.png") is None
    with side.open("a") as f:
        f.write("2\n")
    assert labels(tmp_path / "b.png") == 2
    jsonl = tmp_path / "labels.jsonl"
    jsonl.write_text('{"file": "c.png", "label": 3}\n')
    assert SidecarLabels(jsonl)(tmp_path / "c.png") == 3
    side.write_text("d.png,cat\n")
    with pytest.raises(HiertrainError, match="not an integer"):
        SidecarLabels(side)(tmp_path / "d.png")


@pytest.mark.mqtt
def test_live_training_follows_a_growing_folder(artifacts, broker, tmp_path, procs):
    """``edge-runtime train --live``: a writer process keeps adding frames (and their labels
    to labels.csv) while the edge trains; the edge trains on frames written after its first
    batch, mixes in replayed ones, never holds more than --replay of them, and ends once the
    frames stop for --idle-timeout."""
    ds = load_dataset("digits", "train")
    n, first = 160, BATCH
    frames = tmp_path / "frames.npz"
    np.savez(frames, x=(ds.x[:n, 0].numpy() * 255).round().astype(np.uint8),
             y=ds.y[:n].numpy())
    live = tmp_path / "live"
    live.mkdir()
    for i in range(first):  # the frames there before the edge starts
        Image.fromarray((ds.x[i, 0].numpy() * 255).round().astype(np.uint8)).save(
            live / f"f{i:05d}.png")
    (live / "labels.csv").write_text("".join(f"f{i:05d}.png,{int(ds.y[i])}\n"
                                             for i in range(first)))
    run, dev, replay = _uid("run"), "cam-live", 40
    acts = Acts(broker.url, run, dev)
    try:
        edge = procs.start("edge", [
            "edge_runtime", "train", "--artifacts", str(artifacts), "--broker", broker.url,
            "--device-id", dev, "--run-id", run, "--data", str(live), "--live",
            "--replay", str(replay), "--idle-timeout", "6", "--report",
            str(tmp_path / "edge.json"), "--state-dir", str(tmp_path), "--threads", "1",
            "--confirm-timeout", "0", "--quiet"])
        procs.wait_until(lambda: acts.by_seq(), 120, "the edge's first batch", ("edge",))
        writer = procs.start_command("writer", [
            sys.executable, str(REPO / "tests/frame_writer.py"), str(frames), str(live),
            "--first", str(first), "--per-tick", "8", "--tick", "0.3"])
        procs.wait_all(timeout=180)
        assert writer.returncode == 0 and edge.returncode == 0, procs.tails(["edge", "writer"])
        report = json.loads((tmp_path / "edge.json").read_text())
        wait_until(lambda: len(acts.by_seq()) >= report["batches_published"], 20,
                   "every activation")
        got = acts.by_seq()
    finally:
        acts.close()
    data = report["data"]
    assert data["kind"] == "live folder" and data["frames_found"] == n
    # trained on frames the writer added after the edge's first batch
    assert data["frames_trained"] > first and int(data["last_frame"][1:6]) >= first
    assert 0 < data["replay_peak"] <= replay and data["replayed"] > 0
    assert report["batches_published"] == len(got) == data["batches"] >= 2
    assert data["frames_trained"] + data["replayed"] == BATCH * len(got)
    # the first batch is the frames that were there, in name order, labelled by the sidecar
    assert got[0].labels.tolist() == ds.y[:first].tolist()
    # the classes the edge saw are those of its batches: inference masks the rest
    assert report["seen_classes"] == sorted({c for a in got.values() for c in a.labels.tolist()})


def test_labels_from_a_callback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "camlabels.py").write_text(
        "def label(path):\n    return None if 'x' in path else len(path) % 10\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = label_source(tmp_path, "camlabels:label")
    assert fn(Path("/a/b.png")) == len("/a/b.png") % 10 and fn(Path("/x.png")) is None
    with pytest.raises(HiertrainError, match="cannot import it"):
        label_source(tmp_path, "camlabels:nope")
