"""Label-skewed shards: a non-IID fleet made from one data set (``--shard I/N --shard-skew``).

Real robots see different data without any help: one works in a kitchen, another in a
warehouse. To try the fleet's model (``--fleet-average``, docs/fleet.md) on such a fleet
before there is one, or to reproduce a result, ``--shard-skew`` splits one labelled data set
into ``N`` shards whose label mixes differ, the two ways the federated-learning literature
does:

* ``dirichlet:ALPHA`` -- for every class, the shares of the ``N`` devices are drawn from a
  symmetric Dirichlet(``ALPHA``) (Hsu et al., 2019): ``0.1`` gives most devices two or three
  classes, ``1`` a visible skew, ``100`` nearly IID. Every sample goes to exactly one device.
* ``classes:K`` -- device ``i`` holds the ``K`` classes ``i*K .. i*K+K-1`` (modulo the number
  of classes); a class held by several devices is split evenly among them, and the samples of
  a class no device holds are used by none (McMahan et al., 2017's "pathological" split).

An optional ``:SEED`` (default 0) picks another draw. The partition is a pure function of the
labels, ``N``, the spec and its seed, so every device computes the same one on its own and the
shards are disjoint and, for ``dirichlet``, cover the data set, as long as every device loads
the same data (same ``--data``, ``--limit`` and ``--seed``, as for ``--shard``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from toolkit.core.data.datasets import Dataset
from toolkit.core.errors import HiertrainError

SKEW_KINDS = ("dirichlet", "classes")
MIN_SHARE = 0.1
"""A Dirichlet draw is redone (next seed, bounded) while a device would get less than this
fraction of an equal share: a device with almost no data trains nothing and only adds noise."""
MAX_REDRAWS = 100


@dataclass(frozen=True)
class LabelSkew:
    """A parsed ``--shard-skew`` spec."""

    kind: str
    value: float  # alpha, or classes per device
    seed: int = 0

    @classmethod
    def parse(cls, text: str) -> LabelSkew:
        """``dirichlet:ALPHA[:SEED]`` or ``classes:K[:SEED]``; one-line HiertrainError."""
        parts = str(text).split(":")
        usage = ("use dirichlet:ALPHA (e.g. dirichlet:0.3) or classes:K (e.g. classes:2), "
                 "optionally :SEED")
        if len(parts) not in (2, 3) or parts[0] not in SKEW_KINDS:
            raise HiertrainError(f"bad --shard-skew {text!r}: {usage}")
        try:
            value = float(parts[1])
            seed = int(parts[2]) if len(parts) == 3 else 0
        except ValueError:
            raise HiertrainError(f"bad --shard-skew {text!r}: {usage}") from None
        if parts[0] == "dirichlet" and not (value > 0 and np.isfinite(value)):
            raise HiertrainError(f"bad --shard-skew {text!r}: ALPHA must be a number > 0")
        if parts[0] == "classes" and not (value >= 1 and value == int(value)):
            raise HiertrainError(f"bad --shard-skew {text!r}: K must be a whole number >= 1")
        if seed < 0:
            raise HiertrainError(f"bad --shard-skew {text!r}: SEED must be >= 0")
        return cls(parts[0], value, seed)

    def spec(self) -> str:
        value = f"{self.value:g}" if self.kind == "dirichlet" else str(int(self.value))
        return f"{self.kind}:{value}" + (f":{self.seed}" if self.seed else "")

    def partition(self, labels: np.ndarray, count: int, num_classes: int) -> list[np.ndarray]:
        """Sorted sample indices of each of the ``count`` devices."""
        if count < 1:
            raise HiertrainError(f"shard count must be >= 1, got {count}")
        if self.kind == "classes":
            return _by_classes(labels, count, num_classes, int(self.value), self.seed)
        return _dirichlet(labels, count, num_classes, self.value, self.seed)


def _by_class(labels: np.ndarray, num_classes: int, rng: np.random.Generator
              ) -> list[np.ndarray]:
    """Each class's indices in a seeded random order (a source may be sorted within a class)."""
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def _dirichlet(labels: np.ndarray, count: int, num_classes: int, alpha: float, seed: int
               ) -> list[np.ndarray]:
    floor = MIN_SHARE * len(labels) / count
    for attempt in range(MAX_REDRAWS):
        rng = np.random.default_rng([seed, attempt])
        parts: list[list[np.ndarray]] = [[] for _ in range(count)]
        for idx in _by_class(labels, num_classes, rng):
            shares = rng.dirichlet(np.full(count, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for device, chunk in enumerate(np.split(idx, cuts)):
                parts[device].append(chunk)
        out = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in out) >= floor:
            return out
    raise HiertrainError(f"--shard-skew dirichlet:{alpha:g} left a device with almost no data "
                         f"in {MAX_REDRAWS} draws of {len(labels)} samples over {count} devices; "
                         "use a larger ALPHA, more data or fewer devices")


def _by_classes(labels: np.ndarray, count: int, num_classes: int, k: int, seed: int
                ) -> list[np.ndarray]:
    if k > num_classes:
        raise HiertrainError(f"--shard-skew classes:{k} asks for more classes per device than "
                             f"the {num_classes} there are")
    held = [[(i * k + j) % num_classes for j in range(k)] for i in range(count)]
    holders: dict[int, list[int]] = {}
    for device, classes in enumerate(held):
        for c in classes:
            holders.setdefault(c, []).append(device)
    parts: list[list[np.ndarray]] = [[] for _ in range(count)]
    rng = np.random.default_rng(seed)
    for c, idx in enumerate(_by_class(labels, num_classes, rng)):
        devices = holders.get(c, [])
        for device, chunk in zip(devices, np.array_split(idx, len(devices)), strict=True):
            parts[device].append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.zeros(0, dtype=np.int64) for p in parts]


def skewed_shard(ds: Dataset, index: int, count: int, skew: LabelSkew) -> Dataset:
    """Device ``index``'s shard of ``ds`` under ``skew`` (see the module docstring)."""
    if not 0 <= index < count:
        raise HiertrainError(
            f"shard index {index} is out of range for {count} shards (0..{count - 1})")
    labels = ds.y.numpy()
    num_classes = max(len(ds.classes), int(labels.max()) + 1 if len(labels) else 0)
    idx = skew.partition(labels, count, num_classes)[index]
    if len(idx) == 0:
        raise HiertrainError(f"shard {index} of {count} of {ds.name} under --shard-skew "
                             f"{skew.spec()} is empty; use other K, fewer devices or more data")
    take = torch.from_numpy(idx.astype(np.int64))
    return Dataset(x=ds.x.index_select(0, take), y=ds.y.index_select(0, take),
                   classes=list(ds.classes), name=f"{ds.name}[{index}/{count} {skew.spec()}]")
