"""``toolkit bench``: hierarchical training against the usual edge-cloud baselines on a slow link.

Each row of the result is one real run: a broker, a cloud trainer and one edge
runtime as separate processes on this machine, the edge's sending side shaped
to the link's uplink rate and the cloud's sending side to its downlink rate
(each process shapes only what it sends: ``--link-kbps`` of ``edge_runtime``
and of ``cloud_trainer``). Nothing is computed from a formula except the
``predicted_s`` column, the runtime model's (``toolkit.plan.runtime_model``)
estimate set beside the measurement.

Two schedules, because the slow-link runs cannot also be long enough to train
to a useful accuracy on a 2-core machine:

* **runtime**: every (model, mode, link), one epoch over ``samples`` training
  samples, fewer at the slowest links so that the slowest mode's link time
  stays under ``max_link_s`` (every mode at one link sees the same samples, so
  the comparison at that link is exact), ``repeats`` times: each repeat runs
  every point once before the next repeat starts, so that a slow spell of the
  machine spreads over the points instead of landing on one;
* **accuracy**: every (model, mode) and every extra codec for ``ht``, on an
  unshaped link, ``accuracy_samples`` x ``accuracy_epochs``, once: the
  accuracy comparison on the same schedule (its figures do not depend on
  timing).

As shipped: the ``ht`` edge runs the backend a user gets by default, the
ExecuTorch program that ``toolkit export`` writes with its default lowering
(``--edge-backend torch`` runs eager PyTorch instead, the same math). Split
learning's edge runs eager PyTorch whatever the option says: the exported
program differentiates the exit head's loss and has no input for the cloud's
gradient (``edge_runtime/split_learning.py``). The ``cloud`` mode's edge trains
nothing. Every row records the backend its edge ran.

Threads: the edge stands for the board and gets one thread (torch's and
ExecuTorch's thread pool both); the cloud stands for the server and gets the
cores that are left (``cloud_threads``; on this 2-core machine, one). Asking
for more than that is refused: the two processes would time-share cores and
the timings would measure the contention.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.core.errors import HiertrainError
from toolkit.lab.launch import ProcessGroup, start_cloud

MODES: tuple[str, ...] = ("ht", "split", "cloud")
EDGE_BACKENDS: tuple[str, ...] = ("executorch", "torch")
DEFAULT_SPLITS: dict[str, str] = {"vgg16": "stage2", "resnet18": "layer3", "smallcnn": "block1"}
PLAN = "plan"
"""``--splits model=plan``: the split ``toolkit plan`` recommends for each link."""
EDGE_THREADS = 1
BOARD = "jetson-orin-nano"  # the exports' board profile (memory budget), and the planner's
RUN_TIMEOUT_S = 3600.0

# Sepehri et al. (arXiv 2303.02384), training-runtime reduction of HT-EE against
# the usual edge-cloud (split) training on a low bit-rate link.
PAPER_REDUCTION = {
    ("vgg16", "CIFAR-10"): 0.29, ("resnet18", "CIFAR-10"): 0.61,
    ("vgg16", "Tiny ImageNet"): 0.25, ("resnet18", "Tiny ImageNet"): 0.81,
}


@dataclass(frozen=True, order=True)
class LinkRate:
    """One shaped link: uplink (edge to cloud) and downlink (cloud to edge) in Mbit/s."""

    up_mbps: float
    down_mbps: float

    @property
    def label(self) -> str:
        """``2/20``: how the options, the tables and the plots spell it."""
        return f"{self.up_mbps:g}/{self.down_mbps:g}"

    @property
    def slug(self) -> str:
        """``2M-20M``: the link in a run's name (a directory name)."""
        return f"{self.up_mbps:g}M-{self.down_mbps:g}M"


def parse_links(text: str) -> tuple[LinkRate, ...]:
    """``0.5/0.5,2/20,10`` -> links; ``UP/DOWN`` in Mbit/s, a lone number is symmetric.

    Duplicates are dropped (the first kept); a bad entry is a one-line HiertrainError.
    """
    links: list[LinkRate] = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = item.split("/")
        try:
            if len(parts) > 2:
                raise ValueError
            up, down = (float(parts[0]), float(parts[-1]))
        except ValueError:
            raise HiertrainError(f"bad link {item!r} in {text!r}: expected UP/DOWN in Mbit/s "
                                 "(e.g. 2/20) or one rate for both ways") from None
        if not (up > 0 and down > 0) or math.isinf(up) or math.isinf(down):
            raise HiertrainError(f"bad link {item!r}: rates must be finite and > 0 Mbit/s")
        link = LinkRate(up, down)
        if link not in links:
            links.append(link)
    if not links:
        raise HiertrainError(f"no link in {text!r}; expected e.g. 0.5/0.5,2/20")
    return tuple(links)


def usable_cores() -> int:
    """Cores this process may run on (its affinity), which a container may cut below the
    machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass(frozen=True)
class BenchConfig:
    out: Path = Path("benchmarks/results")
    work_dir: Path | None = None
    models: tuple[str, ...] = ("vgg16", "resnet18")
    splits: dict[str, str] = field(default_factory=dict)
    """Split per model; ``plan``: ``toolkit plan``'s recommendation for each link."""
    modes: tuple[str, ...] = MODES
    links: tuple[LinkRate, ...] = (LinkRate(0.5, 0.5), LinkRate(2.0, 2.0), LinkRate(10.0, 10.0),
                                   LinkRate(50.0, 50.0))
    latency_ms: float = 20.0
    codec: str = "int8"
    extra_codecs: tuple[str, ...] = ()
    batch: int = 32
    samples: int = 512
    max_link_s: float = 150.0
    accuracy_samples: int = 4096
    accuracy_epochs: int = 2
    eval_limit: int = 1000
    lr: float = 0.01
    data: str | None = None
    input_shape: tuple[int, int, int] | None = None
    """Model input C,H,W; set: the data is resized to it and stored as uint8 frames."""
    broker: str = "auto"
    schedules: tuple[str, ...] = ("runtime", "accuracy")
    edge_backend: str = "executorch"
    """The ``ht`` edge's engine: the exported ExecuTorch program (as shipped) or eager torch."""
    lowering: str | None = None
    """Convolution lowering of the export; None: ``toolkit export``'s default (xnnpack,
    parity-gated) for the ExecuTorch edge, the quick ``portable`` one when no edge runs it."""
    cloud_threads: int | None = None
    """The cloud trainer's torch threads; None: the cores left after the edge's one."""
    cloud_device: str = "auto"
    repeats: int = 3
    report_only: bool = False
    """Run nothing: re-derive predictions, tables and plots from ``out/lowbitrate.json``."""
    resume: bool = False
    """Skip runs already in ``out/lowbitrate.json`` (by their ``run`` name, repeat included)."""
    split_grad_bits: tuple[int, ...] = (32,)
    """Split learning's gradient codes: 32 (float32, classic) and/or 8 (a stronger baseline)."""

    def check(self) -> None:
        from toolkit.core.models import get_spec

        for m in self.models:
            get_spec(m)  # one-line HiertrainError naming the choices
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise HiertrainError(f"unknown mode(s) {', '.join(bad)}; use {', '.join(MODES)}")
        if not self.links or any(not (ln.up_mbps > 0 and ln.down_mbps > 0)
                                 for ln in self.links):
            raise HiertrainError("link rates must be > 0 Mbit/s")
        if self.latency_ms < 0:
            raise HiertrainError("link latency must be >= 0 ms")
        if self.batch < 1 or self.samples < self.batch or self.accuracy_samples < self.batch:
            raise HiertrainError("samples must be at least one batch")
        bad = [s for s in self.schedules if s not in ("runtime", "accuracy")]
        if bad:
            raise HiertrainError(f"unknown schedule(s) {', '.join(bad)}; use runtime, accuracy")
        if not self.split_grad_bits or any(b not in (8, 32) for b in self.split_grad_bits):
            raise HiertrainError("split gradient bits must be 32 and/or 8")
        if self.broker not in ("auto", "mosquitto", "embedded"):
            raise HiertrainError("broker must be auto, mosquitto or embedded")
        if self.edge_backend not in EDGE_BACKENDS:
            raise HiertrainError(f"unknown edge backend {self.edge_backend!r}; use "
                                 f"{', '.join(EDGE_BACKENDS)}")
        if self.lowering not in (None, "xnnpack", "matmul", "portable"):
            raise HiertrainError(f"unknown lowering {self.lowering!r}; use xnnpack, matmul or "
                                 "portable")
        if self.edge_backend == "executorch" and self.lowering == "portable" and "ht" in \
                self.modes:
            print("bench: note: the portable lowering runs ExecuTorch's reference kernels, "
                  "~100x slower than the default (benchmarks/results/et_speed.json)",
                  file=sys.stderr)
        if isinstance(self.repeats, bool) or not isinstance(self.repeats, int) \
                or self.repeats < 1:
            raise HiertrainError(f"repeats must be a positive integer, got {self.repeats!r}")
        if self.input_shape is not None and (len(self.input_shape) != 3
                                             or any(v < 1 for v in self.input_shape)):
            raise HiertrainError(f"input shape must be C,H,W, got {self.input_shape!r}")
        self.resolved_cloud_threads()

    def resolved_cloud_threads(self) -> int:
        """``cloud_threads``, or the cores left after the edge's; refuses oversubscription."""
        cores = usable_cores()
        if self.cloud_threads is None:
            return max(1, cores - EDGE_THREADS)
        if isinstance(self.cloud_threads, bool) or self.cloud_threads < 1:
            raise HiertrainError(f"cloud threads must be a positive integer, got "
                                 f"{self.cloud_threads!r}")
        if self.cloud_threads + EDGE_THREADS > max(cores, EDGE_THREADS + 1):
            raise HiertrainError(
                f"--cloud-threads {self.cloud_threads} and the edge's {EDGE_THREADS} thread "
                f"need {self.cloud_threads + EDGE_THREADS} cores, this process may use "
                f"{cores}: the edge and the cloud would time-share cores and the timings "
                f"measure that; use --cloud-threads {max(1, cores - EDGE_THREADS)} or fewer")
        return self.cloud_threads


@dataclass(frozen=True)
class RunSpec:
    model: str
    split: str
    mode: str
    schedule: str
    link: LinkRate | None  # None: unshaped
    latency_ms: float
    codec: str
    samples: int
    epochs: int
    grad_bits: int = 32  # split only: float32 gradients (classic) or int8
    repeat: int = 1
    edge_backend: str = "torch"  # what this mode's edge runs: executorch, torch or none
    shape: tuple[int, int, int] = (3, 32, 32)
    split_source: str = "default"

    @property
    def name(self) -> str:
        link = "inf" if self.link is None else self.link.slug
        g = "-g8" if self.mode == "split" and self.grad_bits == 8 else ""
        model = self.model.replace(":", "_")
        size = "x".join(map(str, self.shape[1:]))
        return (f"{self.schedule}-{model}-{size}-{self.split}-{self.mode}{g}-{link}-"
                f"{self.codec.replace('+', '_')}-{self.edge_backend}-r{self.repeat}")

    @property
    def key(self) -> str:
        """Mode as the tables name it: split learning with int8 gradients is ``split_g8``."""
        return "split_g8" if self.mode == "split" and self.grad_bits == 8 else self.mode


def mode_backend(mode: str, edge_backend: str) -> str:
    """The engine a mode's edge actually runs (module docstring)."""
    return {"ht": edge_backend, "split": "torch", "cloud": "none"}[mode]


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DataSource:
    source: str | None  # what --data the edge and the cloud get
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str


def _data_source(cfg: BenchConfig, work: Path) -> DataSource:
    """CIFAR-10 when there is a copy, else digits upscaled, said loudly; resized to uint8
    frames when ``cfg.input_shape`` is set (:func:`_frames`)."""
    from toolkit.core.data.datasets import digits_stats, load_dataset, shared_cifar10
    from toolkit.core.models import CIFAR_MEAN, CIFAR_STD

    source = cfg.data or (str(p) if (p := shared_cifar10()) else None)
    if source in (None, "digits"):
        if source is None:
            print("bench: no CIFAR-10 copy ($HIERTRAIN_CIFAR10 or ../shared/data/cifar10.npz);"
                  " FALLING BACK to scikit-learn digits upscaled to 32x32: figures are not "
                  "comparable with the paper's", file=sys.stderr)
        mean, std = digits_stats()
        base = DataSource("digits", (1, 32, 32), mean, std,
                          "scikit-learn digits (8x8 upscaled to 32x32)")
    else:
        ds = load_dataset(source, "test", limit=8, input_shape=(3, 32, 32))
        base = DataSource(source, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, ds.name)
    if cfg.input_shape is None or tuple(cfg.input_shape) == base.shape:
        return base
    return _frames(cfg, base, tuple(cfg.input_shape), work)


def _frames(cfg: BenchConfig, base: DataSource, shape: tuple[int, int, int], work: Path
            ) -> DataSource:
    """``base``'s images resized to ``shape`` and stored as uint8 frames in an ``.npz``.

    Why not let the loader resize: a resized image is off the ``u / 255`` grid, so the
    ``cloud`` mode would upload it as float32, four bytes a pixel where a camera's frame
    has one (``toolkit.core.protocol.images``). Rounded to uint8 the frames travel as a
    camera's would. Their content is the source's, upscaled: the runtime does not depend
    on it (the int8 codec and the image upload are fixed-size), the accuracy would.
    """
    import numpy as np
    import torch

    from toolkit.core.data.datasets import load_dataset

    c, h, w = shape
    train_n = max(cfg.samples, cfg.accuracy_samples if "accuracy" in cfg.schedules else 0)
    src = base.source or "digits"
    tag = Path(src).stem if src != "digits" else "digits"
    path = work / f"frames-{tag}-{c}x{h}x{w}-{train_n}-{cfg.eval_limit}.npz"
    if not path.is_file():
        print(f"bench: writing {c}x{h}x{w} uint8 frames from {src} to {path}",
              file=sys.stderr)
        arrays = {}
        for split, n in (("train", train_n), ("test", cfg.eval_limit)):
            ds = load_dataset(src, split, input_shape=shape, limit=n)
            frames = (ds.x * 255).round_().clamp_(0, 255).to(torch.uint8)
            arrays[f"x_{split}"] = frames.permute(0, 2, 3, 1).contiguous().numpy()
            arrays[f"y_{split}"] = ds.y.numpy()
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    with np.load(path) as f:
        x = f["x_train"].astype(np.float64) / 255.0
    mean = tuple(round(float(v), 4) for v in x.mean(axis=(0, 1, 2)))
    std = tuple(round(max(float(v), 1e-3), 4) for v in x.std(axis=(0, 1, 2)))
    origin = "scikit-learn digits (8x8)" if src == "digits" else base.name
    return DataSource(str(path), shape, mean, std,
                      f"{origin} resized to {c}x{h}x{w} uint8 frames (made for this run: "
                      "the runtime does not depend on the content)")


# ----------------------------------------------------------------------------- sizes


def _cut_bytes(model: str, split: str, shape: tuple[int, int, int]) -> tuple[int, int]:
    """(int8, float32) payload bytes per sample at the cut."""
    from toolkit.plan.stats import split_stats

    s = split_stats(model, split, input_shape=shape)
    return s.cut_int8_bytes, s.cut_float32_bytes


def runtime_samples(cfg: BenchConfig, link: LinkRate, up_bytes: int, down_bytes: int,
                    image_bytes: int = 0) -> int:
    """Samples for the runtime schedule on ``link``: the slowest mode's link time bounded.

    Per sample, split learning sends ``up_bytes`` up and ``down_bytes`` down (the
    most of the activation modes) and the ``cloud`` mode ``image_bytes`` up (more
    than split learning for camera-sized frames); every mode on this link trains on
    the same count, rounded down to whole batches and never below two.
    """
    split_s = up_bytes * 8 / (link.up_mbps * 1e6) + down_bytes * 8 / (link.down_mbps * 1e6)
    per_sample_s = max(split_s, image_bytes * 8 / (link.up_mbps * 1e6))
    fit = int(cfg.max_link_s / per_sample_s) if per_sample_s > 0 else cfg.samples
    n = min(cfg.samples, fit) // cfg.batch * cfg.batch
    return max(n, 2 * cfg.batch)


# ----------------------------------------------------------------------------- one run


def _link_args(spec: RunSpec, side: str) -> list[str]:
    """The shaping of what ``side`` sends: the edge the uplink, the cloud the downlink."""
    if spec.link is None:
        return []
    mbps = spec.link.up_mbps if side == "edge" else spec.link.down_mbps
    return ["--link-kbps", f"{mbps * 1000:g}", "--link-latency-ms", f"{spec.latency_ms:g}"]


def run_one(spec: RunSpec, artifacts: Path, url: str, work: Path, source: str | None,
            cfg: BenchConfig) -> dict[str, Any]:
    """One real run: cloud trainer + one edge runtime as processes; returns their two summaries."""
    run_dir = work / spec.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    run_id = f"b{int(time.time() * 1000) % 10**10}"
    data = ["--data", source] if source else []
    backend = {"executorch": ["--backend", "executorch"], "torch": ["--backend", "torch"],
               "none": []}[spec.edge_backend]
    with ProcessGroup(run_dir) as group:
        cloud = ["cloud_trainer", "--artifacts", str(artifacts), "--broker", url,
                 "--run-dir", str(run_dir / "cloud"), "--run-id", run_id, "--devices", "1",
                 "--threads", str(cfg.resolved_cloud_threads()), "--device", cfg.cloud_device,
                 "--quiet", "--mode", spec.mode,
                 "--eval-limit", str(cfg.eval_limit), "--checkpoint-every", "1000000",
                 # A slow link can be silent for minutes while the edge uploads its
                 # weights at the end; the run's own deadline bounds it instead.
                 "--idle-timeout", f"{RUN_TIMEOUT_S:g}",
                 *_link_args(spec, "cloud")]
        if spec.mode == "split":
            cloud += ["--grad-bits", str(spec.grad_bits)]
        if source:
            cloud += ["--eval-data", source]
        start_cloud(group, cloud, url, run_id, timeout=180)
        group.start("edge", [
            "edge_runtime", "train", "--artifacts", str(artifacts), "--broker", url,
            "--device-id", "edge-0", "--run-id", run_id, "--epochs", str(spec.epochs),
            *backend, "--limit", str(spec.samples), "--mode", spec.mode,
            "--codec", spec.codec, "--report", str(run_dir / "edge.json"),
            "--threads", str(EDGE_THREADS), "--state-dir", str(run_dir), "--quiet", *data,
            *_link_args(spec, "edge")])
        group.wait_exit(["edge", "cloud"], RUN_TIMEOUT_S)
    edge = json.loads((run_dir / "edge.json").read_text())
    cloud_summary = json.loads((run_dir / "cloud" / "cloud_summary.json").read_text())
    return {"edge": edge, "cloud": cloud_summary}


def _row(spec: RunSpec, res: dict[str, Any], data_name: str, float32_bytes: int,
         cfg: BenchConfig, lowering: str | None) -> dict[str, Any]:
    edge, cloud = res["edge"], res["cloud"]
    # Training time: from the edge's first batch to the last training step on
    # either side (the cloud's last batch; split learning's last edge step comes
    # after it), stamped with the wall clock of this one machine. Process
    # start-up, the one-off upload of the trained edge weights and the final
    # evaluation are not training.
    start = edge["started_unix"]
    end = max(edge["last_batch_unix"] or 0.0, cloud["last_batch_unix"] or 0.0)
    samples = edge["samples_published"]
    # Training traffic: what the edge sent for training (activations, or images)
    # and what the cloud sent back (split learning's gradients). The one-off
    # upload of the edge weights at the end, and status messages, are in
    # bytes_up_total.
    up = edge["act_bytes_sent"]
    down = cloud["bytes_down"]
    ran = edge.get("backend") or "none"
    if ran != spec.edge_backend:
        raise HiertrainError(f"{spec.name}: the edge ran {ran}, the bench asked for "
                             f"{spec.edge_backend}")
    return {
        "run": spec.name, "model": spec.model, "split": spec.split, "mode": spec.mode,
        "grad_codec": ({32: "float32", 8: "int8"}[spec.grad_bits] if spec.mode == "split"
                       else None),
        "schedule": spec.schedule, "repeat": spec.repeat,
        "link": spec.link.label if spec.link else None,
        "link_up_mbps": spec.link.up_mbps if spec.link else None,
        "link_down_mbps": spec.link.down_mbps if spec.link else None,
        "latency_ms": spec.latency_ms if spec.link is not None else 0.0,
        "codec": spec.codec if spec.mode != "cloud" else "uint8-images",
        "samples": samples, "epochs": spec.epochs, "wall_s": round(end - start, 3),
        "bytes_up": up, "bytes_down": down, "bytes_up_total": edge["bytes_up"],
        "bytes_per_sample_up": round(up / max(samples, 1), 1),
        "float32_cut_bytes_per_sample": float32_bytes,
        "full_accuracy": cloud["full_accuracy"],
        "exit_accuracy": cloud.get("exit_accuracy") if spec.mode == "ht" else None,
        "batches_trained": cloud["batches_trained"],
        "edge_train_s": edge.get("train_s"), "data": data_name,
        "input_shape": list(spec.shape), "split_source": spec.split_source,
        "edge_backend": ran, "edge_lowering": lowering if ran == "executorch" else None,
        "edge_threads": EDGE_THREADS, "cloud_threads": cfg.resolved_cloud_threads(),
        "cloud_device": (cloud.get("compute") or {}).get("device", cfg.cloud_device),
    }


# ----------------------------------------------------------------------------- the sweep


SplitChooser = Callable[[str, "LinkRate | None"], tuple[str, str]]
"""``(model, link) -> (split, where it came from)``."""


def static_splits(cfg: BenchConfig) -> SplitChooser:
    """``--splits``, else the bench's defaults, else the model's default split."""
    def choose(model: str, link: LinkRate | None) -> tuple[str, str]:
        split = cfg.splits.get(model)
        if split == PLAN:
            raise HiertrainError(f"--splits {model}={PLAN} needs the planner (run_bench)")
        if split:
            return split, "--splits"
        if model in DEFAULT_SPLITS:
            return DEFAULT_SPLITS[model], "bench default"
        from toolkit.core.models import get_spec

        return get_spec(model).default_split, "model default"
    return choose


def plan_runs(cfg: BenchConfig, shape: tuple[int, int, int],
              choose: SplitChooser | None = None) -> list[RunSpec]:
    """Every run of the sweep, in the order they run.

    Runtime runs come first, repeat by repeat, slowest links first within a
    repeat: those are bound by the link, not by the CPU, so they are the least
    disturbed by anything else running on the machine. The compute-bound
    fast-link runs follow, then the accuracy runs, whose figures do not depend
    on timing at all.
    """
    choose = choose or static_splits(cfg)
    runtime: list[RunSpec] = []
    accuracy: list[RunSpec] = []
    image_bytes = math.prod(shape)
    for model in cfg.models:
        if "runtime" in cfg.schedules:
            for link in cfg.links:
                split, where = choose(model, link)
                int8, f32 = _cut_bytes(model, split, shape)
                down = f32 if 32 in cfg.split_grad_bits else int8
                n = runtime_samples(cfg, link, int8 if "split" in cfg.modes else 0,
                                    down if "split" in cfg.modes else 0,
                                    image_bytes if "cloud" in cfg.modes else 0)
                for mode in cfg.modes:
                    for g in (cfg.split_grad_bits if mode == "split" else (32,)):
                        for rep in range(1, cfg.repeats + 1):
                            runtime.append(RunSpec(
                                model, split, mode, "runtime", link, cfg.latency_ms, cfg.codec,
                                n, 1, g, rep, mode_backend(mode, cfg.edge_backend), shape,
                                where))
        if "accuracy" in cfg.schedules:
            split, where = choose(model, None)
            for mode in cfg.modes:
                accuracy.append(RunSpec(model, split, mode, "accuracy", None, 0.0, cfg.codec,
                                        cfg.accuracy_samples, cfg.accuracy_epochs, 32, 1,
                                        mode_backend(mode, cfg.edge_backend), shape, where))
            if "ht" in cfg.modes:
                for codec in cfg.extra_codecs:
                    accuracy.append(RunSpec(model, split, "ht", "accuracy", None, 0.0, codec,
                                            cfg.accuracy_samples, cfg.accuracy_epochs, 32, 1,
                                            cfg.edge_backend, shape, where))
    # stable: the modes' order kept within a point
    runtime.sort(key=lambda r: (r.repeat, r.link, cfg.models.index(r.model)))
    return runtime + accuracy


def planner_splits(cfg: BenchConfig, shape: tuple[int, int, int], work: Path) -> SplitChooser:
    """:func:`static_splits`, with ``--splits model=plan`` asking ``toolkit plan`` per link.

    The planner prices every split of the model on this link with this machine's
    profile (edge speed 1: the edge runs here), the bench's board profile and
    batch, and recommends the fitting split with the shortest ``ht`` epoch. The
    unshaped accuracy runs take its choice for the fastest listed link.
    """
    static = static_splits(cfg)
    memo: dict[tuple[str, LinkRate], tuple[str, str]] = {}

    def choose(model: str, link: LinkRate | None) -> tuple[str, str]:
        if cfg.splits.get(model) != PLAN:
            return static(model, link)
        link = link or max(cfg.links)
        if (model, link) not in memo:
            from toolkit.plan.planner import PlanConfig, make_plan

            bits = _codec_bits(cfg.codec)
            plan = make_plan(PlanConfig(
                model=model, board=BOARD, link_kbps=link.up_mbps * 1000,
                link_down_kbps=link.down_mbps * 1000, link_latency_ms=cfg.latency_ms,
                batch=cfg.batch, samples=cfg.samples, bits=bits if bits in (2, 4, 8, 32) else 8,
                input_shape=shape, threads=EDGE_THREADS, profile_cache=work / "profiles.json",
                edge_speed=1.0), log=lambda m: print(f"bench: plan: {m}", file=sys.stderr))
            rec = plan["recommendation"]
            if rec["split"] is None:
                raise HiertrainError(f"toolkit plan found no split of {model} that fits "
                                     f"{BOARD}: {'; '.join(rec['notes'])}")
            memo[model, link] = (rec["split"], (
                f"toolkit plan at {link.label} Mbit/s: ht epoch {rec['epoch_s']:.1f} s "
                f"predicted, fastest mode {rec['fastest_mode']}"))
            print(f"bench: {memo[model, link][1]}: split {rec['split']}", file=sys.stderr)
        return memo[model, link]
    return choose


def _export(model: str, split: str, data: DataSource, cfg: BenchConfig, work: Path
            ) -> tuple[Path, str]:
    """The run's artifacts (exported once per model, split, shape and lowering) and the
    lowering its training program got (``xnnpack`` may fall back to ``matmul``)."""
    from toolkit.build.export import ExportConfig, OptimizerConfig, export_artifacts

    needs_program = cfg.edge_backend == "executorch" and "ht" in cfg.modes
    # No edge runs the .pte with --edge-backend torch: the portable lowering (and no
    # parity gate) saves the XNNPACK pass's minute without changing a figure.
    lowering = cfg.lowering or ("xnnpack" if needs_program else "portable")
    c, h, w = data.shape
    out = work / "artifacts" / f"{model.replace(':', '_')}-{split}-{c}x{h}x{w}-{lowering}"
    if not (out / "manifest.json").is_file():
        print(f"bench: exporting {model} at {split} ({c}x{h}x{w}, {lowering} lowering)",
              file=sys.stderr, flush=True)
        export_artifacts(ExportConfig(
            model=model, split=split, out=out, input_shape=data.shape, mean=data.mean,
            std=data.std, batch=cfg.batch, board=BOARD, force=True, verify=needs_program,
            optimizer=OptimizerConfig(lr=cfg.lr, momentum=0.9, weight_decay=5e-4),
            lowering=lowering,
        ))
    manifest = json.loads((out / "manifest.json").read_text())
    got = manifest["programs"]["edge_train"].get("lowering", {}).get("convolutions", lowering)
    return out, got


def _et_step(artifacts: Path, work: Path) -> dict | None:
    """The exported program's ExecuTorch step on one thread (``toolkit.plan.profiling.
    executorch_step``), measured once per artifacts and kept in ``work/et_steps.json``."""
    from toolkit.plan.profiling import measure_executorch_step

    path = work / "et_steps.json"
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if artifacts.name not in cache:
        try:
            cache[artifacts.name] = measure_executorch_step(artifacts, EDGE_THREADS)
        except HiertrainError as exc:
            print(f"bench: no ExecuTorch step profile: {exc}", file=sys.stderr)
            return None
        print(f"bench: ExecuTorch step of {artifacts.name}: "
              f"{cache[artifacts.name]['step_s'] * 1000:.0f} ms ({EDGE_THREADS} thread)",
              file=sys.stderr)
        path.write_text(json.dumps(cache, indent=1) + "\n")
    return cache[artifacts.name]


def run_bench(cfg: BenchConfig) -> list[dict[str, Any]]:
    cfg.check()
    work = Path(cfg.work_dir) if cfg.work_dir else cfg.out / "lowbitrate-runs"
    work.mkdir(parents=True, exist_ok=True)
    cfg.out.mkdir(parents=True, exist_ok=True)
    results = cfg.out / "lowbitrate.json"
    if cfg.report_only:
        return _report_only(cfg, results, work)
    data = _data_source(cfg, work)
    runs = plan_runs(cfg, data.shape, planner_splits(cfg, data.shape, work))
    print(f"bench: {len(runs)} runs on {data.name}; edge {cfg.edge_backend} "
          f"({EDGE_THREADS} thread), cloud {cfg.resolved_cloud_threads()} thread(s) on "
          f"{cfg.cloud_device}; work dir {work}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    if cfg.resume and results.is_file():
        rows = [r for r in json.loads(results.read_text()) if "run" in r]
        print(f"bench: resuming, {len(rows)} runs already measured", file=sys.stderr)
    done = {r["run"] for r in rows}
    failed: list[str] = []
    profiles = _Profiles(work, cfg.batch)
    from toolkit.lab.broker import local_broker

    with local_broker(cfg.broker) as broker:
        for i, spec in enumerate(runs, 1):
            if spec.name in done:
                continue
            artifacts, lowering = _export(spec.model, spec.split, data, cfg, work)
            _, f32 = _cut_bytes(spec.model, spec.split, data.shape)
            et = (_et_step(artifacts, work) if spec.edge_backend == "executorch" else None)
            t = time.monotonic()
            print(f"[{i}/{len(runs)}] {spec.name}: {spec.samples} samples x {spec.epochs} "
                  "epoch(s) ...", file=sys.stderr, flush=True)
            try:
                res = run_one(spec, artifacts, broker.url, work, data.source, cfg)
                took = time.monotonic() - t  # the run, start-up to exit (no profiling)
                row = _row(spec, res, data.name, f32, cfg, lowering)
            except HiertrainError as exc:  # keep going: one bad run must not lose the sweep
                failed.append(spec.name)
                print(f"    FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            row["et_step_s"] = round(et["step_s"], 5) if et else None
            row.update(_predict(row, profiles))
            rows.append(row)
            print(f"    {row['wall_s']:.1f} s training (predicted {row['predicted_s']}), "
                  f"{row['bytes_per_sample_up']:.0f} B/sample up, {row['bytes_down']} B down, "
                  f"full acc {row['full_accuracy']:.3f} ({took:.0f} s with start-up)",
                  file=sys.stderr, flush=True)
            write_results(rows, results)  # nothing lost if a later run fails
    write_report(rows, cfg.out)
    if failed:
        raise HiertrainError(f"{len(failed)} run(s) failed (logs under {work}): "
                             f"{', '.join(failed)}; rerun with --resume to retry only those")
    return rows


def _report_only(cfg: BenchConfig, results: Path, work: Path) -> list[dict[str, Any]]:
    """Predictions, tables and plots again from the rows alone (each row says what ran)."""
    if not results.is_file():
        raise HiertrainError(f"--report-only needs {results}; run the benchmark first")
    rows = json.loads(results.read_text())
    profiles = _Profiles(work, cfg.batch)
    for row in rows:
        if "run" in row:
            row.update(_predict(row, profiles))
    write_results(rows, results)
    write_report(rows, cfg.out)
    return rows


# ----------------------------------------------------------------------------- prediction


def _codec_bits(codec: str) -> int:
    """Code width of a codec name (``int4+deflate`` -> 4; ``float32`` -> 32)."""
    head = codec.split("+")[0]
    return 32 if head == "float32" else int(head.removeprefix("int"))


def row_link(row: dict[str, Any]) -> LinkRate | None:
    """A row's link; rows from before separate up/down rates had one ``link_mbps``."""
    up = row.get("link_up_mbps", row.get("link_mbps"))
    if up is None:
        return None
    return LinkRate(up, row.get("link_down_mbps") or up)


class _Profiles:
    """Compute profiles (``toolkit.plan.profiling``) by model, input shape and threads,
    cached in ``work/profiles.json`` (the planner's cache too)."""

    def __init__(self, work: Path, batch: int) -> None:
        self.work, self.batch = work, batch
        self._got: dict[tuple, Any] = {}

    def get(self, model: str, shape: tuple[int, ...], threads: int):
        key = (model, tuple(shape), threads)
        if key not in self._got:
            from toolkit.plan.profiling import load_or_profile

            self._got[key], cached = load_or_profile(
                self.work / "profiles.json", model, self.batch, tuple(shape), threads=threads,
                show_progress=True)
            print(f"bench: {'cached' if cached else 'measured'} compute profile of {model} "
                  f"({'x'.join(map(str, shape))}, {threads} thread(s))", file=sys.stderr)
        return self._got[key]


def _predict(row: dict[str, Any], profiles: _Profiles) -> dict[str, Any]:
    """The runtime model's estimate for this run (``toolkit.plan.runtime_model``) and what
    priced its edge.

    The link is priced with its own uplink and downlink rates. Edge compute: the
    eager profile measured on this machine with the edge's one thread, except for
    an ExecuTorch edge with a measured step (``et_step_s``), whose ``ht`` edge step
    is that step plus the profile's cut quantization. Cloud compute: the profile
    at the cloud's thread count. Unshaped runs have no link to price.
    """
    from toolkit.plan.runtime_model import Link, predict

    link = row_link(row)
    if link is None or row.get("schedule") != "runtime":
        return {"predicted_s": None, "predicted_edge": None}
    shape = tuple(row.get("input_shape") or _legacy_shape(row))
    eager = profiles.get(row["model"], shape, EDGE_THREADS)
    threads = row.get("cloud_threads") or 1
    server = eager if threads == EDGE_THREADS else profiles.get(row["model"], shape, threads)
    mode, split = row["mode"], row["split"]
    bits = _codec_bits(row["codec"]) if mode != "cloud" else 8
    bits = bits if bits in (2, 4, 8, 32) else 8
    grad_bits = 8 if row.get("grad_codec") == "int8" else 32
    edge_speed, cloud_speed = 1.0, 1.0
    backend = row.get("edge_backend", "torch")
    note = {"executorch": "eager profile (no ExecuTorch step measured)", "torch": "eager profile",
            "none": "no edge compute"}.get(backend, "eager profile")
    if mode == "cloud":
        cloud_speed = eager.full_step_s / server.full_step_s
    else:
        t1, tn = eager.split_times(split, bits), server.split_times(split, bits)
        cloud_speed = (t1.ht_cloud_s / tn.ht_cloud_s if mode == "ht"
                       else t1.split_cloud_s / tn.split_cloud_s)
        if mode == "ht" and backend == "executorch" and row.get("et_step_s"):
            et_edge_s = row["et_step_s"] + eager.exits[split].quantize_s
            edge_speed = t1.ht_edge_s / et_edge_s
            note = (f"ExecuTorch step measured ({row['et_step_s'] * 1000:.0f} ms + "
                    f"{eager.exits[split].quantize_s * 1000:.1f} ms quantization; eager "
                    f"profile {t1.ht_edge_s * 1000:.0f} ms)")
    p = predict(mode, eager, split,
                Link(link.up_mbps * 1000, row.get("latency_ms") or 0.0,
                     down_kbps=link.down_mbps * 1000),
                row["samples"], bits, edge_speed=edge_speed, cloud_speed=cloud_speed,
                grad_bits=grad_bits)
    return {"predicted_s": round(p.epoch_s, 3), "predicted_edge": note}


def _legacy_shape(row: dict[str, Any]) -> tuple[int, int, int]:
    """Rows written before ``input_shape`` was recorded: CIFAR-10 or upscaled digits."""
    return (1, 32, 32) if "digits" in row.get("data", "") else (3, 32, 32)


# ----------------------------------------------------------------------------- aggregation


POINT_FIELDS: tuple[str, ...] = (
    "schedule", "model", "input_shape", "split", "mode", "grad_codec", "link", "link_up_mbps",
    "link_down_mbps", "latency_ms", "codec", "edge_backend", "samples", "epochs")


def _point_key(row: dict[str, Any]) -> tuple:
    link = row_link(row)
    return (row["schedule"], row["model"], tuple(row.get("input_shape") or ()), row["split"],
            row["mode"], row.get("grad_codec"), link, row.get("codec"),
            row.get("edge_backend"), row["samples"], row.get("epochs"))


def _spread(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 3),
            "std": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0,
            "min": round(min(values), 3), "max": round(max(values), 3)}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per point (every field but the repeat): its repeats' mean, std, min, max."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if "run" in r:
            groups.setdefault(_point_key(r), []).append(r)
    out = []
    for rs in groups.values():
        first = rs[0]
        link = row_link(first)
        entry: dict[str, Any] = {k: first.get(k) for k in POINT_FIELDS}
        entry.update({"link": link.label if link else None,
                      "link_up_mbps": link.up_mbps if link else None,
                      "link_down_mbps": link.down_mbps if link else None,
                      "repeats": len(rs), "runs": sorted(r["run"] for r in rs)})
        wall = _spread([r["wall_s"] for r in rs])
        entry.update({f"wall_s_{k}": v for k, v in wall.items()})
        preds = [r["predicted_s"] for r in rs if r.get("predicted_s") is not None]
        entry["predicted_s"] = round(statistics.fmean(preds), 3) if preds else None
        entry["bytes_per_sample_up"] = first.get("bytes_per_sample_up")
        entry["full_accuracy_mean"] = round(statistics.fmean(r["full_accuracy"] for r in rs), 4)
        out.append(entry)
    out.sort(key=lambda e: (e["schedule"] != "runtime", e["model"], e["input_shape"] or [],
                            (e["link_up_mbps"] or math.inf, e["link_down_mbps"] or math.inf),
                            MODES.index(e["mode"]), e["grad_codec"] or ""))
    return out


def _mode_key(p: dict[str, Any]) -> str:
    return "split_g8" if p["mode"] == "split" and p.get("grad_codec") == "int8" else p["mode"]


def reductions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, input, link): HT's runtime reduction against split and cloud on the same
    samples, from the means over repeats, with each mode's spread."""
    by: dict[tuple, dict[str, dict]] = {}
    for p in aggregate(rows):
        if p["schedule"] == "runtime":
            key = (p["model"], tuple(p["input_shape"] or ()), p["link_up_mbps"],
                   p["link_down_mbps"])
            by.setdefault(key, {})[_mode_key(p)] = p
    out = []
    for (model, shape, up, down), modes in by.items():
        ht = modes.get("ht")
        if ht is None:
            continue
        entry = {"model": model, "input_shape": list(shape), "link": f"{up:g}/{down:g}",
                 "link_up_mbps": up, "link_down_mbps": down, "samples": ht["samples"],
                 "split": ht["split"], "repeats": ht["repeats"], "ht_s": ht["wall_s_mean"],
                 "ht_s_std": ht["wall_s_std"]}
        for base in ("split", "split_g8", "cloud"):
            b = modes.get(base)
            entry[f"{base}_s"] = b["wall_s_mean"] if b else None
            entry[f"{base}_s_std"] = b["wall_s_std"] if b else None
            entry[f"reduction_vs_{base}"] = (
                round(1 - ht["wall_s_mean"] / b["wall_s_mean"], 3)
                if b and b["wall_s_mean"] > 0 else None)
        out.append(entry)
    return out


# ----------------------------------------------------------------------------- output


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(path)
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        if rows:
            names = list(dict.fromkeys(k for r in rows for k in r))
            w = csv.DictWriter(f, fieldnames=names)
            w.writeheader()
            w.writerows(rows)


def write_report(rows: list[dict[str, Any]], out: Path) -> None:
    """Plots, the per-point aggregates and the markdown tables, all from the rows."""
    red = reductions(rows)
    points = aggregate(rows)
    (out / "lowbitrate_reductions.json").write_text(json.dumps(red, indent=2) + "\n")
    (out / "lowbitrate_points.json").write_text(json.dumps(points, indent=2) + "\n")
    _plot(points, out)
    (out / "lowbitrate.md").write_text(markdown_table(rows, red, points))


def _sec(v: float | None, std: float | None = None) -> str:
    if v is None:
        return "-"
    if std is None or std == 0:
        return f"{v:.1f}"
    return f"{v:.1f} ± {std:.2f}" if std < 0.1 else f"{v:.1f} ± {std:.1f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.0f} %"


def _shape_label(shape: list | tuple | None) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def markdown_table(rows: list[dict[str, Any]], red: list[dict[str, Any]],
                   points: list[dict[str, Any]] | None = None) -> str:
    points = aggregate(rows) if points is None else points
    data = sorted({r["data"] for r in rows})
    backends = sorted({r.get("edge_backend", "torch") for r in rows if r["mode"] == "ht"})
    lines = [f"Data: {', '.join(data)}. Each figure is measured (every run is a row of "
             "lowbitrate.json beside this table); times are means over the repeats ± their "
             "standard deviation. "
             f"HT edge backend: {', '.join(backends) or '-'}.", "",
             "| model | input | link up/down Mbit/s | split | samples | repeats | HT s | split s | "
             "split (int8 grad) s | cloud s | HT vs split | HT vs split (int8 grad) | "
             "HT vs cloud | paper (CIFAR-10, vs split) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in red:
        paper = PAPER_REDUCTION.get((e["model"], "CIFAR-10"))
        lines.append(
            f"| {e['model']} | {_shape_label(e['input_shape'])} | {e['link']} | {e['split']} | "
            f"{e['samples']} | {e['repeats']} | {_sec(e['ht_s'], e['ht_s_std'])} | "
            f"{_sec(e['split_s'], e['split_s_std'])} | "
            f"{_sec(e['split_g8_s'], e['split_g8_s_std'])} | "
            f"{_sec(e['cloud_s'], e['cloud_s_std'])} | {_pct(e['reduction_vs_split'])} | "
            f"{_pct(e['reduction_vs_split_g8'])} | {_pct(e['reduction_vs_cloud'])} | "
            f"{_pct(paper)} |")
    rt = [p for p in points if p["schedule"] == "runtime"]
    if rt:
        lines += ["", "Every runtime point: the spread of its repeats and the runtime model's "
                  "prediction.", "",
                  "| model | input | link up/down | mode | edge backend | samples | n | mean s | "
                  "std s | min s | max s | predicted s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for p in rt:
            pred = "-" if p["predicted_s"] is None else f"{p['predicted_s']:.1f}"
            lines.append(
                f"| {p['model']} | {_shape_label(p['input_shape'])} | {p['link']} | "
                f"{_mode_key(p)} | {p['edge_backend'] or '-'} | {p['samples']} | "
                f"{p['repeats']} | {p['wall_s_mean']:.1f} | {p['wall_s_std']:.2f} | "
                f"{p['wall_s_min']:.1f} | {p['wall_s_max']:.1f} | {pred} |")
    acc = [r for r in rows if r["schedule"] == "accuracy"]
    if acc:
        lines += ["", "| model | mode | codec | samples x epochs | B/sample up | float32 cut B | "
                  "full acc | exit acc |", "|---|---|---|---|---|---|---|---|"]
        for r in acc:
            ex = "-" if r["exit_accuracy"] is None else f"{r['exit_accuracy']:.3f}"
            lines.append(f"| {r['model']} | {r['mode']} | {r['codec']} | "
                         f"{r['samples'] // max(r['epochs'], 1)} x {r['epochs']} | "
                         f"{r['bytes_per_sample_up']:.0f} | "
                         f"{r['float32_cut_bytes_per_sample']} | {r['full_accuracy']:.3f} | {ex} |")
    return "\n".join(lines) + "\n"


_CURVES = (("ht", None, "ht"), ("split", "float32", "split"),
           ("split", "int8", "split (int8 grad)"), ("cloud", None, "cloud"))


def _plot(points: list[dict[str, Any]], out: Path) -> None:
    """Per (model, input): training time per sample against the link, one curve per mode,
    the bars spanning the repeats' min to max; links on a categorical axis (up/down)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rt = [p for p in points if p["schedule"] == "runtime"]
    panels = sorted({(p["model"], _shape_label(p["input_shape"])) for p in rt})
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
        for ax, (model, shape) in zip(axes[0], panels, strict=True):
            mine = [p for p in rt if p["model"] == model
                    and _shape_label(p["input_shape"]) == shape]
            links = sorted({(p["link_up_mbps"], p["link_down_mbps"]) for p in mine})
            xs = {ln: i for i, ln in enumerate(links)}
            for mode, grad, label in _CURVES:
                pts = sorted((xs[(p["link_up_mbps"], p["link_down_mbps"])], p)
                             for p in mine if p["mode"] == mode and p.get("grad_codec") == grad)
                if not pts:
                    continue
                x = [i for i, _ in pts]
                ms = [1000 / p["samples"] for _, p in pts]
                y = [p["wall_s_mean"] * k for (_, p), k in zip(pts, ms, strict=True)]
                lo = [yy - p["wall_s_min"] * k for yy, (_, p), k in zip(y, pts, ms, strict=True)]
                hi = [p["wall_s_max"] * k - yy for yy, (_, p), k in zip(y, pts, ms, strict=True)]
                backend = pts[0][1].get("edge_backend")
                name = f"{label} ({backend})" if mode == "ht" and backend else label
                ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=name)
            ax.set_xticks(range(len(links)), [f"{u:g}/{d:g}" for u, d in links])
            ax.set(yscale="log", xlabel="link up/down (Mbit/s)",
                   ylabel="training time per sample (ms)", title=f"{model} ({shape})")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "lowbitrate_runtime.png", dpi=120)
        plt.close(fig)
    acc = [p for p in points if p["schedule"] == "accuracy"]
    if acc:
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in acc:
            x = max(p["bytes_per_sample_up"], 1.0)
            ax.scatter(x, p["full_accuracy_mean"])
            ax.annotate(f"{p['model']} {p['mode']} {p['codec']}", (x, p["full_accuracy_mean"]),
                        fontsize=7)
        ax.set(xscale="log", xlabel="bytes per sample up (measured)",
               ylabel="full-model accuracy (held-out)")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "lowbitrate_accuracy.png", dpi=120)
        plt.close(fig)
