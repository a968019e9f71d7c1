"""Tests for toolkit.core.data.datasets: every source, the splits, shards, batches and the pickle
guard."""

from __future__ import annotations

import builtins
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toolkit.core.data import datasets as data
from toolkit.core.data.datasets import (
    CIFAR10_CLASSES,
    Dataset,
    batches,
    digits_stats,
    load_dataset,
    normalize,
    shard,
    shared_cifar10,
)
from toolkit.core.errors import HiertrainError

SHARED_CIFAR10 = data._SHARED_CIFAR10


def _ids(n: int) -> Dataset:
    """A dataset whose label is the sample's index, so samples can be told apart."""
    return Dataset(x=torch.zeros(n, 1, 2, 2), y=torch.arange(n), classes=["a"], name="ids")


# --------------------------------------------------------------------------- digits


def test_digits_shapes_ranges_and_split_sizes() -> None:
    train = load_dataset(None)
    test = load_dataset("digits", "test")
    assert (len(train), len(test)) == (1437, 360)  # 80/20 of 1797
    for ds in (train, test):
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.x.shape[1:] == (1, 8, 8)
        assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
        assert ds.classes == [str(i) for i in range(10)] and ds.name == "digits"


def test_digits_read_directly_are_scikit_learns_digits(monkeypatch) -> None:
    """The bundled CSV is read without importing scikit-learn (start-up time); it must be
    exactly what ``load_digits`` returns, and ``load_digits`` is the fallback without it."""
    import numpy as np
    from sklearn.datasets import load_digits

    from toolkit.core.data import datasets

    images, labels = datasets._digits_arrays()
    ref = load_digits()
    assert datasets._digits_csv() is not None  # the fast path is the one taken here
    assert np.array_equal(images, ref.images) and np.array_equal(labels, ref.target)
    monkeypatch.setattr(datasets, "_digits_csv", lambda: None)
    datasets._digits_arrays.cache_clear()
    fallback_images, fallback_labels = datasets._digits_arrays()
    datasets._digits_arrays.cache_clear()
    assert np.array_equal(fallback_images, images) and np.array_equal(fallback_labels, labels)


def test_digits_split_is_stratified_and_fixed() -> None:
    train, test = load_dataset(None, "train"), load_dataset(None, "test")
    tr, te = Counter(train.y.tolist()), Counter(test.y.tolist())
    assert sorted(tr) == sorted(te) == list(range(10))
    for c in range(10):
        assert abs(te[c] - 0.2 * (tr[c] + te[c])) <= 1
    # The partition never moves with `seed` (an edge and the cloud may use different seeds).
    other = load_dataset(None, "test", seed=7)
    assert torch.equal(other.x, test.x) and torch.equal(other.y, test.y)


def test_digits_input_shape_repeats_gray_and_resizes() -> None:
    ds = load_dataset(None, "test", input_shape=(3, 16, 16))
    assert ds.x.shape == (360, 3, 16, 16)
    assert torch.equal(ds.x[:, 0], ds.x[:, 1]) and torch.equal(ds.x[:, 0], ds.x[:, 2])
    assert 0.0 <= float(ds.x.min()) and float(ds.x.max()) <= 1.0


def test_limit_is_seeded_and_deterministic() -> None:
    a = load_dataset(None, limit=50, seed=3)
    b = load_dataset(None, limit=50, seed=3)
    c = load_dataset(None, limit=50, seed=4)
    assert len(a) == 50
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    assert len(load_dataset(None, "test", limit=10_000)) == 360


def test_digits_stats_normalise_the_train_split() -> None:
    mean, std = digits_stats()
    assert len(mean) == len(std) == 1
    x = normalize(load_dataset(None).x, mean, std)
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std(correction=0)) - 1) < 1e-4


# --------------------------------------------------------------------------- normalize


def test_normalize_per_channel() -> None:
    x = torch.ones(2, 3, 2, 2) * torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1)
    out = normalize(x, (0.2, 0.3, 0.4), (1.0, 0.5, 0.25))
    assert torch.allclose(out[:, :, 0, 0], torch.tensor([[0.0, 0.2, 0.8]] * 2))
    assert normalize(x[0], [0.0] * 3, [1.0] * 3).shape == (3, 2, 2)


@pytest.mark.parametrize(
    "mean, std", [((0.5,), (1.0,)), ((0.5,) * 3, (1.0, 0.0, 1.0))], ids=["count", "zero-std"]
)
def test_normalize_rejects_bad_stats(mean: tuple[float, ...], std: tuple[float, ...]) -> None:
    with pytest.raises(HiertrainError):
        normalize(torch.zeros(1, 3, 2, 2), mean, std)


# --------------------------------------------------------------------------- shard / batches


@pytest.mark.parametrize("count", [1, 3, 4])
def test_shards_are_disjoint_and_cover(count: int) -> None:
    ds = _ids(10)
    parts = [shard(ds, i, count).y.tolist() for i in range(count)]
    flat = [v for p in parts for v in p]
    assert sorted(flat) == list(range(10)) and len(set(flat)) == 10
    assert parts == [shard(ds, i, count).y.tolist() for i in range(count)]  # deterministic
    assert parts[0][:2] == ([0, count] if count < 10 else [0])  # strided


@pytest.mark.parametrize("index, count", [(3, 3), (-1, 3), (0, 0), (11, 12)])
def test_shard_errors(index: int, count: int) -> None:
    with pytest.raises(HiertrainError):
        shard(_ids(10), index, count)


def test_batches_drop_last_and_order() -> None:
    ds = _ids(10)
    full = list(batches(ds, 3, epoch=0, seed=1))
    assert [len(y) for _, y in full] == [3, 3, 3]
    ragged = list(batches(ds, 3, epoch=0, seed=1, drop_last=False))
    assert [len(y) for _, y in ragged] == [3, 3, 3, 1]
    seen = torch.cat([y for _, y in ragged]).tolist()
    assert sorted(seen) == list(range(10))
    assert all(x.shape == (len(y), 1, 2, 2) for x, y in ragged)


def test_batches_are_seeded_per_epoch() -> None:
    ds = _ids(64)

    def order(epoch: int, seed: int) -> list[int]:
        return torch.cat([y for _, y in batches(ds, 8, epoch=epoch, seed=seed)]).tolist()

    assert order(0, 5) == order(0, 5)
    assert order(0, 5) != order(1, 5)
    assert order(0, 5) != order(0, 6)


@pytest.mark.parametrize("n, batch_size", [(5, 8), (5, 0)])
def test_batches_errors(n: int, batch_size: int) -> None:
    with pytest.raises(HiertrainError):
        next(batches(_ids(n), batch_size, epoch=0, seed=0))


# --------------------------------------------------------------------------- .npz


def _write_npz(path: Path, n_train: int = 12, n_test: int = 4, shape=(6, 5, 3), **extra) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        path,
        x_train=rng.integers(0, 256, (n_train, *shape), dtype=np.uint8),
        y_train=np.arange(n_train) % 3,
        x_test=rng.integers(0, 256, (n_test, *shape), dtype=np.uint8),
        y_test=np.arange(n_test) % 3,
        **extra,
    )


def test_npz_loads_hwc_as_chw(tmp_path: Path) -> None:
    path = tmp_path / "tiny.npz"
    _write_npz(path)
    raw = np.load(path)
    ds = load_dataset(str(path))
    assert ds.x.shape == (12, 3, 6, 5) and ds.x.dtype == torch.float32
    assert torch.equal(ds.x, torch.from_numpy(raw["x_train"]).permute(0, 3, 1, 2) / 255.0)
    assert ds.y.dtype == torch.int64 and ds.y.tolist() == (np.arange(12) % 3).tolist()
    assert ds.classes == ["0", "1", "2"] and ds.name == "tiny"
    test = load_dataset(path, "test", input_shape=(3, 4, 4), limit=3)
    assert test.x.shape == (3, 3, 4, 4)


def test_npz_gray_and_class_names(tmp_path: Path) -> None:
    path = tmp_path / "gray.npz"
    _write_npz(path, shape=(4, 4), classes=np.array(["a", "b", "c"]))
    ds = load_dataset(str(path), input_shape=(3, 4, 4))
    assert ds.x.shape == (12, 3, 4, 4) and ds.classes == ["a", "b", "c"]


def test_npz_channel_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "rgb.npz"
    _write_npz(path)
    with pytest.raises(HiertrainError, match="has 3 channels, the model expects 1"):
        load_dataset(str(path), input_shape=(1, 6, 5))


def test_npz_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.npz"
    np.savez(missing, x_train=np.zeros((2, 4, 4, 3), np.uint8))
    empty = tmp_path / "empty.npz"
    _write_npz(empty, n_train=0)
    floats = tmp_path / "floats.npz"
    np.savez(floats, x_train=np.zeros((2, 4, 4, 3)), y_train=np.zeros(2, np.int64),
             x_test=np.zeros((2, 4, 4, 3)), y_test=np.zeros(2, np.int64))
    objects = tmp_path / "objects.npz"  # object arrays are pickles: must be refused
    np.savez(objects, x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1),
             x_test=np.zeros(1), y_test=np.zeros(1))
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip")
    for path, words in [(missing, "lacks"), (empty, "no train samples"), (floats, "uint8"),
                        (objects, "cannot read"), (corrupt, "cannot read")]:
        with pytest.raises(HiertrainError, match=words):
            load_dataset(str(path))


# --------------------------------------------------------------------------- cifar-10-batches-py


def _write_cifar(root: Path, per_batch: int = 4, protocol: int = 2) -> dict[str, np.ndarray]:
    """A tiny cifar-10-batches-py folder with numpy arrays, as the real one is laid out."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(1)
    written: dict[str, np.ndarray] = {}
    for i, fname in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        x = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        batch = {b"batch_label": b"batch", b"data": x, b"labels": labels}
        # Mix protocols: 2 (bytes via _codecs.encode), 4 (_reconstruct), 5 (_frombuffer).
        proto = (protocol, 4, 5)[i % 3]
        (root / fname).write_bytes(pickle.dumps(batch, protocol=proto))
        written[fname] = x
    meta = {b"label_names": [n.encode() for n in CIFAR10_CLASSES], b"num_vis": 3072}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def test_cifar_batches_folder(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    written = _write_cifar(root)
    train = load_dataset(str(root))
    assert train.x.shape == (20, 3, 32, 32) and train.x.dtype == torch.float32
    assert train.y.dtype == torch.int64 and train.classes == CIFAR10_CLASSES
    first = torch.from_numpy(written["data_batch_1"][0].reshape(3, 32, 32)) / 255.0
    assert torch.equal(train.x[0], first)
    test = load_dataset(str(tmp_path), "test")  # the parent folder is accepted too
    assert test.y.tolist() == [5, 6, 7, 8]
    second = torch.from_numpy(written["test_batch"][1].reshape(3, 32, 32)) / 255.0
    assert torch.equal(test.x[1], second)


def test_cifar_missing_batch(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar(root)
    (root / "data_batch_3").unlink()
    with pytest.raises(HiertrainError, match="data_batch_3"):
        load_dataset(str(root))


class _Evil:
    """Unpickling this runs a command, unless the unpickler refuses."""

    def __init__(self, func, command: str) -> None:
        self.func, self.command = func, command

    def __reduce__(self):
        return (self.func, (self.command,))


@pytest.mark.parametrize("target", ["data_batch_2", "batches.meta"])
@pytest.mark.parametrize("how", ["os.system", "builtins.eval"])
def test_cifar_refuses_malicious_pickle(
    tmp_path: Path, target: str, how: str, capfd: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar(root)
    marker = tmp_path / "pwned"
    if how == "os.system":
        payload = _Evil(os.system, f"echo pwned; touch {marker}")
    else:
        payload = _Evil(builtins.eval, f"__import__('pathlib').Path({str(marker)!r}).touch()")
    evil = {b"data": payload, b"labels": [0], b"label_names": payload}
    (root / target).write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(HiertrainError, match="refusing"):
        load_dataset(str(root))
    assert not marker.exists()
    assert "pwned" not in capfd.readouterr().out


def test_cifar_garbage_pickles(tmp_path: Path) -> None:
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar(root)
    (root / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(HiertrainError, match="not a readable"):
        load_dataset(str(root), "test")
    (root / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(HiertrainError, match="not a CIFAR-10 dict"):
        load_dataset(str(root), "test")
    floats = {"data": np.zeros((2, 3072)), "labels": [0, 1]}
    (root / "test_batch").write_bytes(pickle.dumps(floats))
    with pytest.raises(HiertrainError, match="not a CIFAR-10 batch"):
        load_dataset(str(root), "test")


# --------------------------------------------------------------------------- ImageFolder


def _write_images(root: Path, classes: dict[str, int], size=(10, 7), start: int = 0) -> None:
    """Solid-colour PNGs, each colour unique so a sample can be recognised after loading."""
    value = start
    for name, count in classes.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            Image.new("RGB", size, (value, 255 - value, 7)).save(root / name / f"{i}.png")
            value += 3


def _red(ds: Dataset) -> set[int]:
    return {round(float(v) * 255) for v in ds.x[:, 0, 0, 0]}


def test_image_folder_holdout_resized(tmp_path: Path) -> None:
    _write_images(tmp_path / "pets", {"cat": 5, "dog": 5})
    train = load_dataset(str(tmp_path / "pets"), input_shape=(3, 12, 12))
    test = load_dataset(str(tmp_path / "pets"), "test", input_shape=(3, 12, 12))
    assert (len(train), len(test)) == (8, 2)
    assert train.x.shape == (8, 3, 12, 12) and train.x.dtype == torch.float32
    assert train.classes == ["cat", "dog"] and train.name == "pets"
    assert sorted(test.y.tolist()) == [0, 1]  # stratified: one of each
    assert not _red(train) & _red(test) and len(_red(train) | _red(test)) == 10
    gray = load_dataset(str(tmp_path / "pets"), input_shape=(1, 5, 6))
    assert gray.x.shape == (8, 1, 5, 6)


def test_image_folder_train_test_subfolders(tmp_path: Path) -> None:
    _write_images(tmp_path / "train", {"a": 3, "b": 2})
    _write_images(tmp_path / "test", {"a": 1, "b": 1}, start=100)
    train = load_dataset(str(tmp_path))
    test = load_dataset(str(tmp_path), "test")
    assert (len(train), len(test)) == (5, 2)
    assert train.x.shape == (5, 3, 7, 10)  # no input_shape: native H x W
    assert _red(test) == {100, 103}


def test_image_folder_errors(tmp_path: Path) -> None:
    mixed = tmp_path / "mixed"
    _write_images(mixed, {"a": 2})
    _write_images(mixed, {"b": 2}, size=(4, 4))
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "x.png")
    no_images = tmp_path / "no_images"
    (no_images / "a").mkdir(parents=True)
    only_test = tmp_path / "only_test"
    _write_images(only_test / "test", {"a": 2})
    tiny = tmp_path / "tiny"  # one image: nothing left to hold out
    _write_images(tiny, {"a": 1})
    for root, split, words in [(mixed, "train", "different sizes"), (flat, "train", "accepted"),
                               (no_images, "train", "no usable images"),
                               (only_test, "test", "no train/"), (tiny, "test", "no test samples")]:
        with pytest.raises(HiertrainError, match=words):
            load_dataset(str(root), split)
    with pytest.raises(HiertrainError, match="expects 4 input channels"):
        load_dataset(str(mixed), input_shape=(4, 4, 4))


# --------------------------------------------------------------------------- argument errors


def test_argument_errors(tmp_path: Path) -> None:
    text = tmp_path / "data.csv"
    text.write_text("1,2\n")
    cases = [
        dict(source=str(tmp_path / "nope")),
        dict(source=None, split="validation"),
        dict(source=None, limit=0),
        dict(source=None, seed=-1),
        dict(source=None, input_shape=(1, 8)),
        dict(source=None, input_shape=(2, 8, 8)),
        dict(source=str(text)),
    ]
    for kwargs in cases:
        with pytest.raises(HiertrainError):
            load_dataset(**kwargs)


# --------------------------------------------------------------------------- shared CIFAR-10


def test_shared_cifar10_lookup(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    npz = tmp_path / "c.npz"
    _write_npz(npz)
    monkeypatch.setenv("HIERTRAIN_CIFAR10", str(npz))
    assert shared_cifar10() == npz
    monkeypatch.setenv("HIERTRAIN_CIFAR10", str(tmp_path / "absent.npz"))
    with pytest.raises(HiertrainError, match="HIERTRAIN_CIFAR10"):
        shared_cifar10()
    monkeypatch.delenv("HIERTRAIN_CIFAR10")
    monkeypatch.setattr(data, "_SHARED_CIFAR10", tmp_path / "absent.npz")
    assert shared_cifar10() is None


@pytest.mark.skipif(
    not SHARED_CIFAR10.is_file(), reason=f"{SHARED_CIFAR10} absent (shared dev data only)"
)
def test_shared_cifar10_npz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIERTRAIN_CIFAR10", raising=False)
    assert shared_cifar10() is not None
    ds = load_dataset(str(SHARED_CIFAR10), limit=256)
    assert ds.x.shape == (256, 3, 32, 32) and ds.x.dtype == torch.float32
    assert ds.y.dtype == torch.int64 and 0 <= int(ds.y.min()) and int(ds.y.max()) <= 9
    assert 0.0 <= float(ds.x.min()) and float(ds.x.max()) <= 1.0
    assert len(set(ds.y.tolist())) == 10  # the seeded shuffle mixes the class-sorted file
    assert ds.classes == CIFAR10_CLASSES and ds.name == "CIFAR-10 (JPEG copy)"


def test_shared_copy_elsewhere_keeps_cifar10_names(tmp_path: Path) -> None:
    """CI mounts ../shared at another root (or as a copy): the names must follow."""
    npz = tmp_path / "shared" / "data" / "cifar10.npz"
    npz.parent.mkdir(parents=True)
    _write_npz(npz)
    ds = load_dataset(str(npz), limit=16)
    assert ds.name == "CIFAR-10 (JPEG copy)"
    assert ds.classes == CIFAR10_CLASSES
