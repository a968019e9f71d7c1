"""Data sources turned into tensors: the one loader for the edge, the cloud and the demo.

The edge runtime trains on its local shard, the cloud trainer evaluates on a
held-out split and the demo does both; if each of them read data its own way
they would disagree about scaling, channel order or which samples are held
out, and an accuracy figure would silently mean something else. So every
consumer goes through :func:`load_dataset`, which always returns the same
thing: a :class:`Dataset` of float32 ``N x C x H x W`` images in ``[0, 1]``
(not yet normalised: normalisation belongs to the model/export, see
:func:`normalize`) and int64 labels.

Accepted sources (nothing is ever downloaded: the machines that run this have
no network access to dataset hosts, and a loader that quietly tries would hang
or fail far from the cause):

* ``None`` or ``"digits"``: scikit-learn's bundled 8x8 digits, always present,
  so the demo and the tests work on a fresh machine.
* a ``.npz`` file with ``x_train, y_train, x_test, y_test`` (uint8 ``N x H x W
  x C`` or ``N x H x W``), the format of the shared CIFAR-10 copy
  (:func:`shared_cifar10`).
* a ``cifar-10-batches-py`` folder (the standard pickled batches), read with a
  restricted unpickler because a pickle can run arbitrary code.
* an ImageFolder tree ``root/<class>/*.png|jpg``, optionally split into
  ``root/train`` and ``root/test``.

The train/test partition of sources that have none (digits, ImageFolder
without ``test/``) always uses :data:`SPLIT_SEED`, never the caller's
``seed``: an edge device and the cloud trainer may run with different seeds,
and a partition that moved with the seed would leak test images into training.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.core.errors import HiertrainError
from toolkit.core.optional import require

SPLITS = ("train", "test")
"""Split names :func:`load_dataset` accepts."""

SPLIT_SEED = 0
"""Seed of every train/test partition this module makes (see the module docstring)."""

TEST_FRACTION = 0.2
"""Share of samples held out as "test" when a source has no test split of its own."""

CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]
"""The standard CIFAR-10 label order (label i is ``CIFAR10_CLASSES[i]``)."""

CIFAR10_ENV = "HIERTRAIN_CIFAR10"
"""Environment variable naming a CIFAR-10 ``.npz`` (overrides the shared copy)."""

_SHARED_CIFAR10 = Path(__file__).resolve().parents[4] / "shared/data/cifar10.npz"
_SHARED_CIFAR10_NAME = "CIFAR-10 (JPEG copy)"

_ACCEPTED = (
    "accepted: 'digits', a .npz file with x_train/y_train/x_test/y_test, "
    "a cifar-10-batches-py folder (data_batch_1..5, test_batch, batches.meta), "
    "or an ImageFolder tree root/<class>/*.png|jpg (optionally under root/train and root/test)"
)

_RESIZE_CHUNK = 4096  # images per interpolate call: bounds the peak memory of a resize


@dataclass
class Dataset:
    """Images and labels ready for a model.

    ``x`` is float32 ``N x C x H x W`` with values in ``[0, 1]`` (before
    :func:`normalize`), ``y`` is int64 ``N`` with values indexing ``classes``.
    """

    x: torch.Tensor
    y: torch.Tensor
    classes: list[str]
    name: str

    def __post_init__(self) -> None:
        """Catch a malformed dataset where it is built, not deep inside a training step."""
        if self.x.dim() != 4 or self.y.dim() != 1 or len(self.x) != len(self.y):
            raise ValueError(
                f"Dataset {self.name!r}: x must be N x C x H x W and y N, got "
                f"{tuple(self.x.shape)} and {tuple(self.y.shape)}"
            )

    def __len__(self) -> int:
        """Number of samples."""
        return len(self.y)


# --------------------------------------------------------------------------- public API


def load_dataset(
    source: str | os.PathLike[str] | None,
    split: str = "train",
    *,
    input_shape: tuple[int, int, int] | None = None,
    limit: int | None = None,
    seed: int = 0,
) -> Dataset:
    """Load ``split`` of ``source`` as a :class:`Dataset` (see the module docstring).

    ``input_shape`` (``C, H, W``, the model's input) adapts the images: H x W
    are resized (bilinear, antialiased), one gray channel is repeated to three;
    any other channel mismatch is an error, since inventing or dropping colour
    channels would train a different problem than the user thinks. ``limit``
    keeps the first ``limit`` samples after a shuffle seeded by ``seed`` (the
    raw order of a source is often sorted by class, so a plain prefix would
    contain one class only).
    """
    if split not in SPLITS:
        raise HiertrainError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if input_shape is not None:
        input_shape = _check_shape(input_shape)
    if limit is not None and limit < 1:
        raise HiertrainError(f"limit must be a positive number of samples, got {limit}")
    if seed < 0:
        raise HiertrainError(f"seed must be >= 0, got {seed}")

    if source is None or str(source) == "digits":
        ds = _load_digits(split, limit, seed)
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise HiertrainError(f"dataset {str(source)!r} does not exist; {_ACCEPTED}")
        if path.is_file():
            if path.suffix.lower() != ".npz":
                raise HiertrainError(f"dataset file {path} is not a .npz file; {_ACCEPTED}")
            ds = _load_npz(path, split, limit, seed)
        elif (path / "cifar-10-batches-py").is_dir():
            ds = _load_cifar_batches(path / "cifar-10-batches-py", split, limit, seed)
        elif (path / "data_batch_1").exists() or (path / "test_batch").exists():
            ds = _load_cifar_batches(path, split, limit, seed)
        else:
            ds = _load_image_folder(path, split, input_shape, limit, seed)
    return _adapt(ds, input_shape)


def normalize(
    x: torch.Tensor, mean: Sequence[float] | torch.Tensor, std: Sequence[float] | torch.Tensor
) -> torch.Tensor:
    """Return ``(x - mean) / std`` per channel, for ``N x C x H x W`` or ``C x H x W``.

    Kept out of :func:`load_dataset` because where normalisation happens is a
    model decision (the export can bake it into the edge program), while the
    loader's contract is simply "values in [0, 1]".
    """
    channels = x.shape[-3] if x.dim() >= 3 else -1
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).flatten()
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).flatten()
    if x.dim() not in (3, 4) or m.numel() != channels or s.numel() != channels:
        raise HiertrainError(
            f"normalize got {m.numel()} means and {s.numel()} stds for images of shape "
            f"{tuple(x.shape)}; give one mean and one std per channel"
        )
    if bool((s <= 0).any()):
        raise HiertrainError(f"normalize std must be > 0 for every channel, got {s.tolist()}")
    return (x - m.view(-1, 1, 1)) / s.view(-1, 1, 1)


def shard(ds: Dataset, index: int, count: int) -> Dataset:
    """Shard ``index`` of ``count``: the samples ``index::count``.

    Strided rather than contiguous so that each edge device gets a similar
    class mix even if ``ds`` is sorted by class; disjoint and together covering
    ``ds``, and a pure function of its arguments, so devices agree on who holds
    what without talking to each other.
    """
    if count < 1:
        raise HiertrainError(f"shard count must be >= 1, got {count}")
    if not 0 <= index < count:
        raise HiertrainError(
            f"shard index {index} is out of range for {count} shards (0..{count - 1})"
        )
    if index >= len(ds):
        raise HiertrainError(
            f"shard {index} of {count} of {ds.name} is empty ({len(ds)} samples); "
            "use fewer devices or more data"
        )
    return Dataset(
        x=ds.x[index::count], y=ds.y[index::count], classes=list(ds.classes),
        name=f"{ds.name}[{index}::{count}]",
    )


def batches(
    ds: Dataset, batch_size: int, *, epoch: int, seed: int, drop_last: bool = True
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` mini-batches of one epoch, in an order fixed by ``(seed, epoch)``.

    The order depends on nothing but ``seed`` and ``epoch`` (no global RNG), so
    a run is reproducible, and a resumed run restarts an epoch in the same
    order (skip the batches already done with ``itertools.islice``).

    ``drop_last`` is True by default because an exported ExecuTorch edge
    program has a static batch size: a smaller last batch would not fit it.
    A dataset smaller than one batch is then an error rather than a silent
    epoch without a step.
    """
    for idx in batch_rows(ds, batch_size, epoch=epoch, seed=seed, drop_last=drop_last):
        yield ds.x.index_select(0, idx), ds.y.index_select(0, idx)


def batch_rows(
    ds: Dataset, batch_size: int, *, epoch: int, seed: int, drop_last: bool = True
) -> Iterator[torch.Tensor]:
    """The rows of each of :func:`batches`' batches, in its order."""
    if batch_size < 1:
        raise HiertrainError(f"batch size must be >= 1, got {batch_size}")
    if seed < 0 or epoch < 0:
        raise HiertrainError(f"seed and epoch must be >= 0, got seed={seed} epoch={epoch}")
    n = len(ds)
    if drop_last and n < batch_size:
        raise HiertrainError(
            f"{ds.name} has {n} samples, fewer than one batch of {batch_size}; "
            "use a smaller batch, fewer devices or more data"
        )
    order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start : start + batch_size]


def digits_stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the digits train split (for export normalisation).

    Computed from the data rather than hard-coded, so they cannot drift from
    what :func:`load_dataset` returns.
    """
    x = _load_digits("train", None, 0).x
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), correction=0)
    return tuple(mean.tolist()), tuple(std.tolist())


def _is_shared_cifar10(path: Path) -> bool:
    """Whether ``path`` is the developers' shared CIFAR-10 copy.

    By location as well as by inode: CI mounts the shared data at a different
    root than a developer's checkout, sometimes as a copy, and the copy must
    still get its class names and its "(JPEG copy)" label.
    """
    if _SHARED_CIFAR10.is_file() and path.samefile(_SHARED_CIFAR10):
        return True
    return path.resolve().parts[-3:] == ("shared", "data", "cifar10.npz")


def shared_cifar10() -> Path | None:
    """Path of a local CIFAR-10 ``.npz``, or None when there is none.

    ``$HIERTRAIN_CIFAR10`` wins when set (and must then exist: a typo should not
    quietly fall back to other data); otherwise the developers' shared copy at
    ``../shared/data/cifar10.npz`` beside the repository. That copy went through
    JPEG once: report figures on it as "CIFAR-10 (JPEG copy)" (its
    :attr:`Dataset.name`). A user's machine has neither, so callers must say
    clearly when they fall back to digits.
    """
    env = os.environ.get(CIFAR10_ENV)
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise HiertrainError(f"${CIFAR10_ENV} is {env!r}, which is not a file; fix or unset it")
        return path
    return _SHARED_CIFAR10 if _SHARED_CIFAR10.is_file() else None


# --------------------------------------------------------------------------- helpers


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """Validate a model input shape ``(C, H, W)``."""
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise HiertrainError(f"input_shape must be three positive ints (C, H, W), got {shape!r}")
    c, h, w = shape
    return c, h, w


def _pick(n: int, limit: int | None, seed: int) -> np.ndarray | None:
    """Indices kept by ``limit`` (None: keep all in the source's order)."""
    if limit is None:
        return None
    return np.random.default_rng(seed).permutation(n)[:limit]


def _holdout(labels: np.ndarray, split: str) -> np.ndarray:
    """Sorted indices of ``split`` in a fixed stratified 80/20 partition of ``labels``.

    Stratified so that both sides have every class; falls back to a plain
    seeded split when some class is too small to be stratified.
    """
    train_test_split = require("sklearn.model_selection", "cloud",
                               "splitting a data set without train/ and test/ into a hold-out"
                               ).train_test_split

    idx = np.arange(len(labels))
    if len(idx) < 2:
        train, test = idx, idx[:0]
    else:
        try:
            train, test = train_test_split(
                idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=labels
            )
        except ValueError:
            train, test = train_test_split(idx, test_size=TEST_FRACTION, random_state=SPLIT_SEED)
    return np.sort(train if split == "train" else test)


def _from_uint8(x: np.ndarray, y: np.ndarray, classes: list[str], name: str) -> Dataset:
    """Build a Dataset from uint8 ``N x C x H x W`` images and integer labels."""
    return Dataset(
        x=torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0),
        y=torch.from_numpy(np.asarray(y, dtype=np.int64)),
        classes=classes,
        name=name,
    )


def _require_samples(n: int, name: str, split: str) -> None:
    if n == 0:
        raise HiertrainError(f"{name} has no {split} samples; give it at least one image per class")


def _adapt(ds: Dataset, input_shape: tuple[int, int, int] | None) -> Dataset:
    """Fit ``ds`` to the model's input shape (see :func:`load_dataset`)."""
    if input_shape is None:
        return ds
    c, h, w = input_shape
    x = ds.x
    have = x.shape[1]
    if have != c:
        if have == 1 and c == 3:
            x = x.repeat(1, 3, 1, 1)
        else:
            s = "" if have == 1 else "s"
            raise HiertrainError(
                f"{ds.name} has {have} channel{s}, the model expects {c}; "
                f"use a model with {have} input channel{s} or a dataset with {c}"
            )
    if tuple(x.shape[2:]) != (h, w):
        x = torch.cat([
            F.interpolate(chunk, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
            for chunk in x.split(_RESIZE_CHUNK)
        ]).clamp_(0.0, 1.0)
    return Dataset(x=x.contiguous(), y=ds.y, classes=ds.classes, name=ds.name)


# --------------------------------------------------------------------------- digits


def _digits_csv() -> Path | None:
    """The file scikit-learn's ``load_digits`` reads, found without importing scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            return path
    return None


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as (images 0..16, labels); cached, it is read on every load.

    Importing scikit-learn costs 3 s of every edge and cloud start-up here (scipy, its
    validation machinery) to read one bundled 1797 x 65 CSV, so the CSV is read directly;
    ``load_digits`` stays the fallback should scikit-learn move it. A test holds the two
    to the same arrays."""
    path = _digits_csv()
    if path is None:
        try:
            from sklearn.datasets import load_digits
        except ImportError:
            raise HiertrainError(
                "the digits dataset comes with scikit-learn, which is not installed here (a "
                "board install leaves it out); pass --data with your own .npz or image folder, "
                "or pip install scikit-learn"
            ) from None

        d = load_digits()
        return d.images.astype(np.float32), d.target.astype(np.int64)
    data = np.loadtxt(path, delimiter=",", dtype=np.float32)
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def _load_digits(split: str, limit: int | None, seed: int) -> Dataset:
    images, labels = _digits_arrays()
    idx = _holdout(labels, split)
    pick = _pick(len(idx), limit, seed)
    if pick is not None:
        idx = idx[pick]
    return Dataset(
        x=torch.from_numpy((images[idx] / 16.0).astype(np.float32)).unsqueeze(1),
        y=torch.from_numpy(labels[idx]),
        classes=[str(i) for i in range(10)],
        name="digits",
    )


# --------------------------------------------------------------------------- .npz


def _load_npz(path: Path, split: str, limit: int | None, seed: int) -> Dataset:
    """Load a split of a ``.npz`` (uint8 HWC images), e.g. the shared CIFAR-10 copy."""
    is_shared = _is_shared_cifar10(path)
    name = _SHARED_CIFAR10_NAME if is_shared else path.stem
    try:
        # allow_pickle=False: a .npz can hold pickled object arrays, i.e. code.
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in f.files]
            if missing:
                raise HiertrainError(
                    f"{path} lacks {', '.join(missing)}; a dataset .npz needs x_train, y_train, "
                    "x_test and y_test"
                )
            x, y = f[f"x_{split}"], f[f"y_{split}"]
            names = [str(c) for c in f["classes"]] if "classes" in f.files else None
            y_max = max(int(f["y_train"].max(initial=0)), int(f["y_test"].max(initial=0)))
    except HiertrainError:
        raise
    except Exception as e:  # a corrupt zip, object arrays, ... : all the user's file
        raise HiertrainError(f"cannot read {path} as a dataset .npz ({e})") from e

    if x.ndim == 3:
        x = x[..., None]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise HiertrainError(
            f"{path}: x_{split} must be uint8 N x H x W x C with C 1 or 3, got "
            f"{x.dtype} {x.shape}; convert the images to uint8 HWC"
        )
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise HiertrainError(
            f"{path}: y_{split} must be {len(x)} integer labels, got {y.dtype} {y.shape}"
        )
    _require_samples(len(x), str(path), split)
    if int(y.min()) < 0:
        raise HiertrainError(f"{path}: y_{split} has negative labels; labels must be 0..K-1")

    if names is None:
        names = list(CIFAR10_CLASSES) if is_shared else [str(i) for i in range(y_max + 1)]
    if len(names) <= y_max:
        raise HiertrainError(f"{path}: labels go up to {y_max} but only {len(names)} classes given")
    pick = _pick(len(x), limit, seed)
    if pick is not None:
        x, y = x[pick], y[pick]
    return _from_uint8(x.transpose(0, 3, 1, 2), y, names, name)


# --------------------------------------------------------------------------- cifar-10-batches-py


def _numpy_global(*candidates: str) -> Callable[..., Any]:
    """The first of ``module:name`` candidates this numpy has (numpy 2 renamed core to _core)."""
    import importlib

    for candidate in candidates:
        module, name = candidate.split(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {candidates} in numpy {np.__version__}")


@functools.cache
def _pickle_allowlist() -> dict[tuple[str, str], Any]:
    """Every global a CIFAR-10 batch pickle may name, mapped to the object it gets.

    Dicts, lists, str, ints and (protocol >= 3) bytes need no global at all.
    The rest is what numpy arrays and scalars pickle to, under both numpy 1
    (``numpy.core``) and numpy 2 (``numpy._core``) names, plus ``_codecs.encode``,
    which is how a protocol-2 pickle spells bytes. Each only builds data from
    data. Names map straight to objects, so an old ``numpy.core`` name does
    not import the deprecated module.
    """
    reconstruct = _numpy_global(
        "numpy._core.multiarray:_reconstruct", "numpy.core.multiarray:_reconstruct"
    )
    scalar = _numpy_global("numpy._core.multiarray:scalar", "numpy.core.multiarray:scalar")
    frombuffer = _numpy_global("numpy._core.numeric:_frombuffer", "numpy.core.numeric:_frombuffer")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _codecs_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        allowed[(f"{core}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{core}.multiarray", "scalar")] = scalar
        allowed[(f"{core}.numeric", "_frombuffer")] = frombuffer
    return allowed


def _codecs_encode(obj: object, encoding: object = "utf-8", errors: object = "strict") -> bytes:
    """``_codecs.encode`` narrowed to what protocol 2 uses it for: ``(str, "latin1") -> bytes``.

    The real function accepts any codec name; narrowing it keeps the allowlist
    free of anything but "turn this text into those bytes".
    """
    if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise pickle.UnpicklingError("_codecs.encode used other than for latin1 bytes")
    return obj.encode("latin-1")


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :func:`_pickle_allowlist` globals.

    Pickle can call any importable callable while loading (``os.system`` is
    one ``__reduce__`` away), and a downloaded CIFAR folder is a file from
    somewhere else. Every way a pickle names a callable (GLOBAL, STACK_GLOBAL,
    INST, OBJ, EXT*) goes through :meth:`find_class`, so refusing there
    refuses them all; persistent ids are refused by the base class.
    """

    def __init__(self, file: BinaryIO, origin: Path) -> None:
        super().__init__(file, encoding="latin1")  # latin1: numpy's advice for Python 2 pickles
        self._origin = origin

    def find_class(self, module: str, name: str) -> Any:
        """Resolve an allowed global or refuse the file."""
        try:
            return _pickle_allowlist()[(module, name)]
        except KeyError:
            raise HiertrainError(
                f"{self._origin} refers to {module}.{name}, which a CIFAR-10 batch never does; "
                "refusing to load it (re-download the dataset from its official source)"
            ) from None


def _unpickle(path: Path) -> dict[str, Any]:
    """Load one CIFAR-10 pickle as a dict with str keys, refusing anything but data."""
    try:
        with path.open("rb") as f:
            obj = _RestrictedUnpickler(f, path).load()
    except HiertrainError:
        raise
    except Exception as e:  # truncated, corrupt, wrong argument types...: the user's file
        raise HiertrainError(f"{path} is not a readable CIFAR-10 pickle ({e})") from e
    if not isinstance(obj, dict):
        raise HiertrainError(f"{path} holds a {type(obj).__name__}, not a CIFAR-10 dict")
    return {k.decode("latin1") if isinstance(k, bytes) else str(k): v for k, v in obj.items()}


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One ``data_batch_*`` / ``test_batch``: (uint8 N x 3 x 32 x 32, labels)."""
    d = _unpickle(path)
    data, labels = d.get("data"), d.get("labels")
    if (
        not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2
        or data.shape[1] != 3 * 32 * 32 or not isinstance(labels, (list, np.ndarray))
    ):
        raise HiertrainError(
            f"{path} is not a CIFAR-10 batch (needs 'data': uint8 N x 3072 and 'labels')"
        )
    y = np.asarray(labels)
    if y.shape != (len(data),) or not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
        raise HiertrainError(f"{path}: 'labels' must be {len(data)} non-negative integers")
    return data.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _load_cifar_batches(root: Path, split: str, limit: int | None, seed: int) -> Dataset:
    """Load the standard python-pickle CIFAR-10 folder (row = 1024 R, 1024 G, 1024 B)."""
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise HiertrainError(
            f"{root} lacks {', '.join(missing)}; a cifar-10-batches-py folder needs "
            "data_batch_1..5 and test_batch (re-extract the archive)"
        )
    parts = [_read_batch(root / f) for f in files]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    _require_samples(len(x), str(root), split)

    classes = list(CIFAR10_CLASSES)
    if (root / "batches.meta").is_file():
        names = _unpickle(root / "batches.meta").get("label_names")
        if not isinstance(names, list) or not all(isinstance(n, (str, bytes)) for n in names):
            raise HiertrainError(f"{root / 'batches.meta'} has no list of 'label_names'")
        classes = [n.decode("utf-8") if isinstance(n, bytes) else n for n in names]
    if int(y.max()) >= len(classes):
        raise HiertrainError(
            f"{root}: labels go up to {int(y.max())} but only {len(classes)} classes"
        )
    pick = _pick(len(x), limit, seed)
    if pick is not None:
        x, y = x[pick], y[pick]
    return _from_uint8(x, y, classes, "cifar10")


# --------------------------------------------------------------------------- ImageFolder


@dataclass
class FolderIndex:
    """The samples of one split of an ImageFolder tree, found without decoding an image.

    ``paths[i]`` has label ``targets[i]``; the rows are those :func:`load_dataset` would load,
    in the same order (hold-out, then ``limit``), so an in-memory load and a stream
    (``toolkit.core.data.stream``) of one folder agree sample for sample.
    """

    tree: Path
    paths: list[str]
    targets: np.ndarray
    classes: list[str]
    mode: str  # PIL mode the images are converted to: "L" (1 channel) or "RGB"


def is_image_folder(source: str | os.PathLike[str] | None) -> bool:
    """Whether :func:`load_dataset` would read ``source`` as an ImageFolder tree."""
    if source is None or str(source) == "digits":
        return False
    path = Path(source).expanduser()
    return (path.is_dir() and not (path / "cifar-10-batches-py").is_dir()
            and not (path / "data_batch_1").exists() and not (path / "test_batch").exists())


def image_folder_index(
    root: Path, split: str, channels: int = 3, limit: int | None = None, seed: int = 0
) -> FolderIndex:
    """Index ``split`` of an ImageFolder tree: ``root/train`` + ``root/test`` if present,
    else an 80/20 hold-out (:data:`SPLIT_SEED`), then ``limit`` samples picked with ``seed``."""
    require("torchvision", "images", "reading an image folder")
    from torchvision.datasets import ImageFolder

    if split not in SPLITS:
        raise HiertrainError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if not root.is_dir():
        raise HiertrainError(f"dataset {str(root)!r} is not a directory; {_ACCEPTED}")
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_test and not has_train:
        raise HiertrainError(f"{root} has test/ but no train/; add {root}/train/<class>/ images")
    tree = root / split if has_train and has_test else (root / "train" if has_train else root)
    if not any(p.is_dir() for p in tree.iterdir()):
        raise HiertrainError(f"{root} is not a dataset folder layout; {_ACCEPTED}")
    if channels not in (1, 3):
        raise HiertrainError(
            f"the model expects {channels} input channels; image folders give 1 (gray) or 3 (RGB)"
        )
    try:  # the loader is never called here: only the listing is used
        folder = ImageFolder(str(tree), loader=lambda p: p)
    except FileNotFoundError as e:  # no class folders / no image files
        raise HiertrainError(f"{tree} has no usable images ({e}); {_ACCEPTED}") from e

    targets = np.asarray(folder.targets, dtype=np.int64)
    idx = np.arange(len(targets)) if has_train and has_test else _holdout(targets, split)
    _require_samples(len(idx), str(root), split)
    pick = _pick(len(idx), limit, seed)
    if pick is not None:
        idx = idx[pick]
    return FolderIndex(tree=tree, paths=[folder.samples[i][0] for i in idx.tolist()],
                       targets=targets[idx], classes=list(folder.classes),
                       mode="L" if channels == 1 else "RGB")


def _load_image_folder(
    root: Path, split: str, input_shape: tuple[int, int, int] | None, limit: int | None, seed: int
) -> Dataset:
    """Load an ImageFolder tree whole (:func:`image_folder_index` picks the samples).

    ``input_shape`` is applied while decoding (PIL resize, "L" for one channel)
    so that images of mixed sizes and modes can be stacked at all.
    """
    from PIL import Image
    from torchvision import transforms

    index = image_folder_index(root, split, input_shape[0] if input_shape else 3, limit, seed)
    steps: list[Any] = []
    if input_shape is not None:
        steps.append(transforms.Resize(input_shape[1:], antialias=True))
    steps.append(transforms.ToTensor())
    transform = transforms.Compose(steps)

    images: list[torch.Tensor] = []
    for path in index.paths:
        try:
            with Image.open(path) as im:
                images.append(transform(im.convert(index.mode)))
        except Exception as e:  # undecodable image: name the file
            raise HiertrainError(f"cannot read image {path} ({e})") from e
    sizes = {tuple(t.shape[1:]) for t in images}
    if len(sizes) > 1:
        raise HiertrainError(
            f"images in {index.tree} have different sizes ({len(sizes)} kinds, e.g. "
            f"{sorted(sizes)[:2]}); pass input_shape to resize them all"
        )
    x = torch.stack(images).to(torch.float32)
    return Dataset(x=x, y=torch.from_numpy(index.targets), classes=index.classes, name=root.name)


__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_ENV",
    "SPLITS",
    "SPLIT_SEED",
    "TEST_FRACTION",
    "Dataset",
    "FolderIndex",
    "batches",
    "digits_stats",
    "image_folder_index",
    "is_image_folder",
    "load_dataset",
    "normalize",
    "shard",
    "shared_cifar10",
]
