"""A live source for online learning: a directory of frames that keeps growing.

A camera (or anything) drops frames into a directory; ``edge-runtime train --data DIR
--live`` trains on them as they come, for as long as they come. Each batch holds the
oldest frames not trained yet (a new frame is trained exactly once as "new") topped up
with frames drawn from a bounded replay buffer, so the edge keeps revisiting the past
without holding it all; the run ends when no new frame came for ``idle_timeout`` seconds
(or at ``--max-batches``).

* **Frames**: image files directly in the directory (``.png``, ``.jpg``, ...), found by
  polling every ``poll_s``. Names starting with ``.`` and ``*.part``/``*.tmp`` are skipped,
  so a writer should write a temporary name and rename it (atomic): a half-written frame
  would otherwise be read. Frames found in one poll are taken in name order.
* **Labels**: a sidecar next to the frames, ``labels.csv`` (``file,label`` lines) or
  ``labels.jsonl`` (``{"file": ..., "label": ...}`` lines), read as it grows (a frame
  whose label has not arrived yet waits for it); or a callback ``package.module:function``
  called with the frame's path, returning an int label or None (not labelled yet).
* **Replay**: reservoir sampling (Vitter's algorithm R) over every frame trained, at most
  ``replay`` frames, kept decoded as uint8 at the model's input size (3 x 224 x 224: 150 kB
  each); each batch is ``replay_share`` replayed frames once the buffer has that many.

Frames are decoded as a streamed folder's are (``toolkit.core.data.stream``): PIL,
the model's channels, PIL resize, then the optional augmentation, ``[0, 1]`` and the
manifest's mean and std.
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from toolkit.core.data.source import Batch
from toolkit.core.data.stream import Decode
from toolkit.core.errors import HiertrainError

log = logging.getLogger("toolkit.data")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")
SIDECARS = ("labels.csv", "labels.jsonl")


@dataclass(frozen=True)
class LiveConfig:
    """How a live directory is followed (validated once, in :func:`check`)."""

    labels: str | None = None  # sidecar path, "package.module:function", or None: the default
    replay: int = 512  # replay buffer capacity in frames (0: no replay)
    replay_share: float = 0.5  # share of each batch drawn from the buffer once it is full enough
    idle_timeout: float = 60.0  # seconds without a new frame that end the run
    poll_s: float = 0.2

    def check(self) -> LiveConfig:
        if self.replay < 0:
            raise HiertrainError(f"--replay must be >= 0 frames, got {self.replay}")
        if not 0 <= self.replay_share < 1:
            raise HiertrainError(f"the replay share must be in [0, 1), got {self.replay_share}")
        if not self.idle_timeout > 0:
            raise HiertrainError(f"--idle-timeout must be > 0 seconds, got {self.idle_timeout}")
        return self


class ReplayBuffer:
    """At most ``capacity`` items, a uniform sample of every item offered (reservoir)."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self.capacity, self.rng = capacity, rng
        self.items: list[tuple[torch.Tensor, int]] = []
        self.offered = 0
        self.peak = 0

    def __len__(self) -> int:
        return len(self.items)

    def offer(self, item: tuple[torch.Tensor, int]) -> None:
        self.offered += 1
        if self.capacity == 0:
            return
        if len(self.items) < self.capacity:
            self.items.append(item)
        else:
            j = int(self.rng.integers(self.offered))
            if j < self.capacity:
                self.items[j] = item
        self.peak = max(self.peak, len(self.items))

    def draw(self, k: int) -> list[tuple[torch.Tensor, int]]:
        """``k`` distinct items, uniformly."""
        picks = self.rng.choice(len(self.items), size=k, replace=False)
        return [self.items[int(i)] for i in picks]


class SidecarLabels:
    """Labels from ``labels.csv`` / ``labels.jsonl``, read incrementally as the file grows."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.labels = path, 0, {}

    def __call__(self, frame: Path) -> int | None:
        if frame.name not in self.labels:
            self._read_more()
        return self.labels.get(frame.name)

    def _read_more(self) -> None:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        end = chunk.rfind(b"\n") + 1  # a line still being written waits for its newline
        if end == 0:
            return
        self.offset += end
        text = chunk[:end].decode("utf-8")
        if self.path.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
            pairs = [(r.get("file"), r.get("label")) for r in rows]
        else:
            pairs = [tuple(r[:2]) for r in csv.reader(io.StringIO(text)) if len(r) >= 2]
        for name, label in pairs:
            if name in (None, "file") or label in (None, "label"):
                continue  # a header
            try:
                self.labels[Path(str(name)).name] = int(label)
            except ValueError:
                raise HiertrainError(f"{self.path}: label {label!r} of {name!r} is not an "
                                     "integer; write class indices 0..K-1") from None


def label_source(directory: Path, spec: str | None) -> Callable[[Path], int | None]:
    """The labeller ``spec`` names (see the module docstring)."""
    if spec and ":" in spec and not Path(spec).exists():
        module, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise HiertrainError(f"--labels {spec}: cannot import it ({exc}); give "
                                 "package.module:function on the PYTHONPATH or a sidecar file"
                                 ) from None
        return lambda frame: (None if (v := fn(str(frame))) is None else int(v))
    if spec:
        return SidecarLabels(Path(spec).expanduser())
    found = [directory / s for s in SIDECARS if (directory / s).exists()]
    return SidecarLabels(found[0] if found else directory / SIDECARS[0])


class LiveFolder:
    """A growing directory as :class:`~toolkit.core.data.source.TrainingData` of one
    open-ended epoch (see the module docstring)."""

    def __init__(self, directory: str | Path, decode: Decode, cfg: LiveConfig,
                 *, num_classes: int, seed: int = 0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from torchvision.transforms import v2

        self.dir = Path(directory).expanduser()
        if not self.dir.is_dir():
            raise HiertrainError(f"--live needs a directory of frames; {self.dir} is not one")
        self.cfg, self.decode, self.clock = cfg.check(), decode, clock
        self.num_classes = num_classes
        self.name, self.classes = self.dir.name, []
        self.labels = label_source(self.dir, cfg.labels)
        self.replay = ReplayBuffer(cfg.replay, np.random.default_rng([seed, 7]))
        self.seen: set[str] = set()
        self.waiting: list[Path] = []  # found, not trained yet (oldest first)
        self.trained_new = self.replayed = self.batches_made = 0
        self.last_frame: str | None = None
        self._resize = v2.Compose([v2.Resize(decode.size, antialias=True), v2.PILToTensor()])
        finish: list[Any] = [*decode.augment.transforms(decode.size),
                             v2.ToDtype(torch.float32, scale=True)]
        if decode.mean is not None:
            finish.append(v2.Normalize(list(decode.mean), list(decode.std or ())))
        self._finish = v2.Compose(finish)

    def __len__(self) -> int:
        """Frames found so far (unknown ahead: the loops show no total)."""
        return len(self.seen)

    def batches(self, batch_size: int, *, epoch: int, seed: int, start: int = 0
                ) -> Iterator[Batch]:
        if start:
            raise HiertrainError("a live source cannot resume mid-stream; drop --resume")
        torch.manual_seed(seed)  # augmentation draws (the frames themselves are not replayable)
        return self._iterate(batch_size)

    def _iterate(self, batch_size: int) -> Iterator[Batch]:
        while True:
            n_replay = min(int(batch_size * self.cfg.replay_share), len(self.replay))
            fresh = self._wait_for(batch_size - n_replay)
            if fresh is None:
                return
            items = [*fresh, *self.replay.draw(n_replay)]
            for item in fresh:  # offered after the draw: a batch never holds a frame twice
                self.replay.offer(item)
            self.trained_new += len(fresh)
            self.replayed += n_replay
            self.batches_made += 1
            x = torch.stack([self._finish(img) for img, _ in items])
            yield x, torch.tensor([label for _, label in items], dtype=torch.int64)

    def _wait_for(self, k: int) -> list[tuple[torch.Tensor, int]] | None:
        """The ``k`` oldest untrained labelled frames, decoded; None after ``idle_timeout``
        without a new one."""
        last_new = self.clock()
        ready: list[tuple[torch.Tensor, int]] = []
        while True:
            if self._scan():
                last_new = self.clock()
            still: list[Path] = []
            for frame in self.waiting:
                label = self.labels(frame) if len(ready) < k else None
                if label is None:
                    still.append(frame)
                    continue
                if not 0 <= label < self.num_classes:
                    raise HiertrainError(f"frame {frame.name} has label {label}; the artifacts "
                                         f"were exported for labels 0..{self.num_classes - 1}")
                ready.append((self._load(frame), label))
                self.last_frame = frame.name
            self.waiting = still
            if len(ready) >= k:
                return ready
            if self.clock() - last_new > self.cfg.idle_timeout:
                log.info("no new frame in %s for %.0f s: the live source ends", self.dir,
                         self.cfg.idle_timeout)
                return None
            time.sleep(self.cfg.poll_s)

    def _scan(self) -> int:
        new = sorted(p for p in self.dir.iterdir()
                     if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
                     and p.name not in self.seen and p.is_file())
        self.seen.update(p.name for p in new)
        self.waiting.extend(new)
        return len(new)

    def _load(self, frame: Path) -> torch.Tensor:
        from PIL import Image

        try:
            with Image.open(frame) as im:
                return self._resize(im.convert(self.decode.mode))
        except Exception as e:  # noqa: BLE001 -- a bad frame: name it
            raise HiertrainError(f"cannot read frame {frame} ({e}); write frames under a "
                                 "temporary name and rename them when complete") from e

    def describe(self) -> dict[str, Any]:
        return {"kind": "live folder", "name": self.name, "root": str(self.dir),
                "frames_found": len(self.seen), "frames_trained": self.trained_new,
                "replayed": self.replayed, "replay_capacity": self.cfg.replay,
                "replay_peak": self.replay.peak, "last_frame": self.last_frame,
                "batches": self.batches_made, "augment": self.decode.augment.names,
                "workers": 0}


__all__ = ["LiveConfig", "LiveFolder", "ReplayBuffer", "SidecarLabels", "label_source"]
