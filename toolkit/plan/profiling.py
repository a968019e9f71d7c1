"""Measured compute times of a model, per named block: the runtime model's inputs.

Why per block: a model is a sequence of named blocks and a split point is one
of those names, so any split's edge and cloud times are sums of block times.
One pass over the blocks prices every split point; only the early-exit head
depends on the split (its input is the cut) and is measured once per split.

Each block is timed the way its side trains it:

* **edge** blocks (those before the last split point) as the edge runtime's
  ``torch`` backend runs them: the exporter's exact rewrites
  (``HostStatsBatchNorm2d``...), and ``--edge-norm group`` if the model uses it;
* **cloud** blocks (those after the first split point) as plain PyTorch modules.

Per block: forward; backward with the gradient of its input (every block but
the first of a segment needs it; the first cloud block needs it in split
learning, to send it back); backward without it (the first block of a segment
in the other cases); and the SGD step over its parameters. The exit head is
timed as one step (forward, cross-entropy, backward into the cut, SGD), and the
cut's int8 quantization (edge) and dequantization (cloud) separately. The whole
model's training step is measured directly for the ``cloud`` mode and as a
check on the block sums.

All figures are medians of a few repeats after one warm-up, in eager PyTorch
on this CPU with ``threads`` threads. Once ``max_seconds`` has passed, each
remaining measurement runs once without warm-up, so the total time is bounded
by roughly ``max_seconds`` plus one pass over the model.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolkit.core.errors import HiertrainError

PROFILE_SCHEMA = "hiertrain.profile"
PROFILE_VERSION = 1
RAW_BITS = 32


@dataclass(frozen=True)
class BlockTiming:
    """One block's measured seconds for one batch."""

    name: str
    side: str  # "edge" (exact rewrites, as the board trains) or "cloud" (plain modules)
    out_shape: tuple[int, ...]  # per sample
    params: int
    fwd_s: float
    bwd_s: float  # backward including the gradient with respect to the block's input
    bwd_first_s: float  # backward when the input needs no gradient (first block of a segment)
    step_s: float  # SGD step (momentum, weight decay) over the block's parameters


@dataclass(frozen=True)
class ExitTiming:
    """The split-dependent part of the edge: exit head step and the cut's codec."""

    split: str
    cut_shape: tuple[int, ...]
    params: int
    train_s: float  # exit forward + cross-entropy + backward into the cut + SGD step
    quantize_s: float  # int8 per-channel quantization of the cut batch (edge)
    dequantize_s: float  # its dequantization (cloud)


@dataclass(frozen=True)
class SplitTimes:
    """Per-batch compute seconds of one split point, in each mode, on the profiling machine."""

    split: str
    cut_shape: tuple[int, ...]
    ht_edge_s: float  # edge segment + exit head forward, backward, SGD, quantization
    ht_cloud_s: float  # dequantization + cloud segment forward, backward (no cut gradient), SGD
    split_edge_fwd_s: float  # edge segment forward + quantization
    split_edge_bwd_s: float  # edge segment backward from the cut gradient + SGD
    split_cloud_s: float  # dequantization + cloud forward, backward incl. cut gradient, SGD


@dataclass(frozen=True)
class ModelProfile:
    """Everything measured for one model, batch size, input shape and thread count."""

    model: str
    batch: int
    input_shape: tuple[int, int, int]
    num_classes: int
    threads: int
    exit_channels: int
    edge_norm: str
    splits: tuple[str, ...]
    blocks: tuple[str, ...]
    edge_blocks: dict[str, BlockTiming]
    cloud_blocks: dict[str, BlockTiming]
    exits: dict[str, ExitTiming]
    full_step_s: float  # the whole model's training step (cloud mode), measured directly
    full_flops: int  # FLOPs of that step (forward + backward, this batch)
    repeats: int
    wall_s: float
    machine: dict = field(default_factory=dict)

    @property
    def host_gflops(self) -> float:
        """Training GFLOP/s this machine sustained on the whole model."""
        return self.full_flops / self.full_step_s / 1e9

    def split_times(self, split: str | None, bits: int = 8) -> SplitTimes:
        """Sum the block times of ``split``'s edge and cloud segments for each mode.

        ``bits == 32`` (raw float32 upload) drops the quantization costs; packed
        4- and 2-bit codes are priced as int8 (packing itself is not measured).
        """
        if split not in self.exits:
            raise HiertrainError(
                f"unknown split point {split!r} for {self.model}; choose one of: "
                f"{', '.join(self.splits)}"
            )
        cut = self.blocks.index(split) + 1
        edge = [self.edge_blocks[b] for b in self.blocks[:cut]]
        cloud = [self.cloud_blocks[b] for b in self.blocks[cut:]]
        ex = self.exits[split]
        quant = 0.0 if bits == RAW_BITS else ex.quantize_s
        dequant = 0.0 if bits == RAW_BITS else ex.dequantize_s
        e_fwd = sum(b.fwd_s for b in edge)
        e_bwd = edge[0].bwd_first_s + sum(b.bwd_s for b in edge[1:])
        e_step = sum(b.step_s for b in edge)
        c_fwd = sum(b.fwd_s for b in cloud)
        c_bwd_rest = sum(b.bwd_s for b in cloud[1:])
        c_step = sum(b.step_s for b in cloud)
        return SplitTimes(
            split=split, cut_shape=ex.cut_shape,
            ht_edge_s=e_fwd + e_bwd + e_step + ex.train_s + quant,
            ht_cloud_s=dequant + c_fwd + cloud[0].bwd_first_s + c_bwd_rest + c_step,
            split_edge_fwd_s=e_fwd + quant,
            split_edge_bwd_s=e_bwd + e_step,
            split_cloud_s=dequant + c_fwd + cloud[0].bwd_s + c_bwd_rest + c_step,
        )

    def key(self) -> dict:
        return _cache_key(self.model, self.batch, self.input_shape, self.num_classes,
                          self.threads, self.exit_channels, self.edge_norm, self.machine)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["schema"], d["schema_version"] = PROFILE_SCHEMA, PROFILE_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelProfile:
        if d.get("schema") != PROFILE_SCHEMA or d.get("schema_version") != PROFILE_VERSION:
            raise ValueError("not a version 1 hiertrain profile")
        d = {k: v for k, v in d.items() if k not in ("schema", "schema_version")}

        def block(b: dict) -> BlockTiming:
            return BlockTiming(**{**b, "out_shape": tuple(b["out_shape"])})

        return cls(**{
            **d,
            "input_shape": tuple(d["input_shape"]), "splits": tuple(d["splits"]),
            "blocks": tuple(d["blocks"]),
            "edge_blocks": {k: block(v) for k, v in d["edge_blocks"].items()},
            "cloud_blocks": {k: block(v) for k, v in d["cloud_blocks"].items()},
            "exits": {k: ExitTiming(**{**v, "cut_shape": tuple(v["cut_shape"])})
                      for k, v in d["exits"].items()},
        })


def machine_info(threads: int) -> dict:
    """What identifies the measuring machine in a cached profile."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "torch": torch.__version__, "threads": threads}


def _cache_key(model: str, batch: int, input_shape, num_classes: int, threads: int,
               exit_channels: int, edge_norm: str, machine: dict) -> dict:
    return {"model": model, "batch": batch, "input_shape": list(input_shape),
            "num_classes": num_classes, "threads": threads, "exit_channels": exit_channels,
            "edge_norm": edge_norm, "cpu": machine.get("cpu"), "torch": machine.get("torch")}


class _Clock:
    """Repeats a measurement: one warm-up, then up to ``repeats`` timed runs, within a deadline."""

    def __init__(self, repeats: int, max_seconds: float) -> None:
        self.repeats = repeats
        self.deadline = time.perf_counter() + max_seconds

    def runs(self) -> tuple[int, int]:
        """(warm-up runs, timed runs) for the next measurement."""
        if time.perf_counter() > self.deadline:
            return 0, 1
        return 1, self.repeats


def _median(samples: list[float]) -> float:
    return statistics.median(samples)


def _time_block(block, x, clock: _Clock) -> tuple[float, float, float, float]:
    """(forward, backward with input gradient, backward without, SGD step) medians."""
    import torch

    params = [p for p in block.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, weight_decay=5e-4) if params else None
    with torch.no_grad():
        grad = torch.randn_like(block(x))
    fwd, bwd, bwd_first, step = [], [], [], []
    warm, timed = clock.runs()
    for i in range(warm + timed):
        for needs_input_grad, into in ((True, bwd), (False, bwd_first)):
            if not (needs_input_grad or params):
                into.append(0.0)  # nothing to differentiate: a parameter-free first block
                continue
            xi = x.detach().requires_grad_(needs_input_grad)
            for p in params:
                p.grad = None
            t0 = time.perf_counter()
            out = block(xi)
            t1 = time.perf_counter()
            out.backward(grad)
            t2 = time.perf_counter()
            if i >= warm:
                fwd.append(t1 - t0)
                into.append(t2 - t1)
        if opt is not None:
            t0 = time.perf_counter()
            opt.step()
            opt.zero_grad()
            t1 = time.perf_counter()
            if i >= warm:
                step.append(t1 - t0)
    return _median(fwd), _median(bwd), _median(bwd_first), _median(step) if step else 0.0


def _time_exit(head, cut, y, clock: _Clock) -> tuple[float, float, float]:
    """(exit head training step, quantize, dequantize) medians."""
    import torch
    import torch.nn.functional as F

    from toolkit.core.protocol.quant import DEFAULT_SCHEME, dequantize, quantize

    opt = torch.optim.SGD(head.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    train, quant, dequant = [], [], []
    warm, timed = clock.runs()
    for i in range(warm + timed):
        xi = cut.detach().requires_grad_(True)
        t0 = time.perf_counter()
        loss = F.cross_entropy(head(xi), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        t1 = time.perf_counter()
        q = quantize(cut, DEFAULT_SCHEME)
        t2 = time.perf_counter()
        dequantize(q)
        t3 = time.perf_counter()
        if i >= warm:
            train.append(t1 - t0)
            quant.append(t2 - t1)
            dequant.append(t3 - t2)
    return _median(train), _median(quant), _median(dequant)


def _time_full(model, x, y, clock: _Clock) -> float:
    import torch
    import torch.nn.functional as F

    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    samples = []
    warm, timed = clock.runs()
    for i in range(warm + timed):
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        t1 = time.perf_counter()
        if i >= warm:
            samples.append(t1 - t0)
    return _median(samples)


def _training_flops(model, x, y) -> int:
    """Forward + backward FLOPs of one training step (counted on one sample, in eval mode
    so that BatchNorm accepts a batch of one; the convolutions cost the same)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    m = copy.deepcopy(model).eval()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(m(x[:1]), y[:1]).backward()
    return int(counter.get_total_flops()) * x.shape[0]


def _edge_version(block, edge_norm: str):
    from toolkit.core.models.rewrites import make_exact, to_group_norm

    block = copy.deepcopy(block)
    if edge_norm == "group":
        to_group_norm(block)
    make_exact(block)
    return block


def profile_model(
    model: str,
    batch: int,
    input_shape: tuple[int, int, int] | None = None,
    threads: int = 1,
    repeats: int = 3,
    *,
    num_classes: int = 10,
    exit_channels: int | None = None,
    edge_norm: str | None = None,
    max_seconds: float = 120.0,
    show_progress: bool = False,
    seed: int = 0,
) -> ModelProfile:
    """Measure ``model`` at ``batch`` on this CPU with ``threads`` threads (module docstring)."""
    import torch
    from tqdm import tqdm

    from toolkit.core.entry import show_progress as on_terminal
    from toolkit.core.models import build_model, get_spec
    from toolkit.core.models.exits import ExitHeadConfig, build_exit_head
    from toolkit.core.models.rewrites import EDGE_NORMS, make_exact

    spec = get_spec(model)
    shape = tuple(input_shape or spec.input_shape)
    exit_channels = spec.exit_channels if exit_channels is None else exit_channels
    edge_norm = edge_norm or spec.edge_norm
    for name, value in (("batch size", batch), ("threads", threads), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise HiertrainError(f"{name} must be a positive integer, got {value!r}")
    if edge_norm not in EDGE_NORMS:
        raise HiertrainError(
            f"unknown edge norm {edge_norm!r}; choose one of: {', '.join(EDGE_NORMS)}")
    if not max_seconds > 0:
        raise HiertrainError(f"the profiling time bound must be positive, got {max_seconds}")

    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        torch.manual_seed(seed)
        full = build_model(model, num_classes=num_classes, input_shape=shape).train()
        if spec.kind == "graph":  # a traced model: the blocks between its split points
            from toolkit.core.models.graph_split import chain

            blocks = chain(full, list(spec.splits), model)
        else:
            blocks = list(full.named_children())
        names = [n for n, _ in blocks]
        children = dict(blocks)
        first_cut = names.index(spec.splits[0]) + 1
        last_cut = names.index(spec.splits[-1]) + 1
        gen = torch.Generator().manual_seed(seed + 1)
        x = torch.randn(batch, *shape, generator=gen)
        y = torch.randint(0, num_classes, (batch,), generator=gen)
        inputs = [x]  # inputs[i]: what block i sees
        with torch.no_grad():
            for n in names:
                inputs.append(children[n](inputs[-1]))
        jobs = ([("edge", i) for i in range(last_cut)]
                + [("cloud", i) for i in range(first_cut, len(names))])
        clock = _Clock(repeats, max_seconds)
        # The caller asks for a bar; it appears only when stdout is a terminal.
        bar = tqdm(total=len(jobs) + len(spec.splits) + 1, desc=f"profiling {model}",
                   unit="step", file=sys.stderr, leave=False,
                   disable=not (show_progress and on_terminal()))
        timings: dict[str, dict[str, BlockTiming]] = {"edge": {}, "cloud": {}}
        try:
            for side, i in jobs:
                bar.set_postfix_str(f"{side} {names[i]}")
                block = children[names[i]]
                if side == "edge":
                    block = _edge_version(block, edge_norm)
                fwd, bwd, bwd_first, step = _time_block(block, inputs[i], clock)
                timings[side][names[i]] = BlockTiming(
                    name=names[i], side=side, out_shape=tuple(inputs[i + 1].shape[1:]),
                    params=sum(p.numel() for p in block.parameters()), fwd_s=fwd, bwd_s=bwd,
                    bwd_first_s=bwd_first, step_s=step,
                )
                bar.update()
            exits = {}
            for split in spec.splits:
                bar.set_postfix_str(f"exit at {split}")
                cut = inputs[names.index(split) + 1]
                head = build_exit_head(cut.shape[1], num_classes,
                                       ExitHeadConfig(channels=exit_channels))
                make_exact(head)
                train, quant, dequant = _time_exit(head.train(), cut, y, clock)
                exits[split] = ExitTiming(
                    split=split, cut_shape=tuple(cut.shape[1:]),
                    params=sum(p.numel() for p in head.parameters()), train_s=train,
                    quantize_s=quant, dequantize_s=dequant,
                )
                bar.update()
            bar.set_postfix_str("whole model")
            full_s = _time_full(full, x, y, clock)
            flops = _training_flops(full, x, y)
            bar.update()
        finally:
            bar.close()
    except ValueError as exc:  # e.g. BatchNorm given one value per channel
        raise HiertrainError(
            f"cannot profile {model} at batch {batch} and input {shape}: {exc}; "
            "use a larger batch or input"
        ) from None
    finally:
        torch.set_num_threads(old_threads)
    return ModelProfile(
        model=model, batch=batch, input_shape=shape, num_classes=num_classes, threads=threads,
        exit_channels=exit_channels, edge_norm=edge_norm, splits=tuple(spec.splits),
        blocks=tuple(names), edge_blocks=timings["edge"], cloud_blocks=timings["cloud"],
        exits=exits, full_step_s=full_s, full_flops=flops, repeats=repeats,
        wall_s=time.perf_counter() - started, machine=machine_info(threads),
    )


# --------------------------------------------------------------------------- cache

CACHE_SCHEMA = "hiertrain.profile_cache"


def _read_cache(path: Path) -> list[dict]:
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise HiertrainError(
            f"profile cache {path} is unreadable ({exc}); delete it or pass another file"
        ) from None
    if not isinstance(data, dict) or data.get("schema") != CACHE_SCHEMA or not isinstance(
            data.get("profiles"), list):
        raise HiertrainError(
            f"{path} is not a hiertrain profile cache; delete it or pass another file")
    return data["profiles"]


def _write_cache(path: Path, entries: list[dict]) -> None:
    text = json.dumps({"schema": CACHE_SCHEMA, "profiles": entries}, indent=1) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise HiertrainError(f"cannot write profile cache {path}: {exc.strerror}") from None


def load_or_profile(
    cache: str | Path | None,
    model: str,
    batch: int,
    input_shape: tuple[int, int, int] | None = None,
    threads: int = 1,
    repeats: int = 3,
    *,
    num_classes: int = 10,
    exit_channels: int | None = None,
    edge_norm: str | None = None,
    max_seconds: float = 120.0,
    show_progress: bool = False,
    log: Callable[[str], None] = lambda _msg: None,
) -> tuple[ModelProfile, bool]:
    """A profile from ``cache`` if one matches (same model, batch, shape, threads, CPU, torch),
    else a fresh one, added to ``cache``. Returns ``(profile, came_from_cache)``."""
    from toolkit.core.models import get_spec

    spec = get_spec(model)
    shape = tuple(input_shape or spec.input_shape)
    ex = spec.exit_channels if exit_channels is None else exit_channels
    norm = edge_norm or spec.edge_norm
    path = Path(cache) if cache else None
    entries = _read_cache(path) if path else []
    if path:
        key = _cache_key(model, batch, shape, num_classes, threads, ex, norm,
                         machine_info(threads))
        for entry in entries:
            try:
                profile = ModelProfile.from_dict(entry)
            except (TypeError, ValueError, KeyError):
                continue
            if profile.key() == key:
                log(f"using the cached profile in {path}")
                return profile, True
    profile = profile_model(model, batch, shape, threads, repeats, num_classes=num_classes,
                            exit_channels=ex, edge_norm=norm, max_seconds=max_seconds,
                            show_progress=show_progress)
    if path:
        kept = []
        for entry in entries:
            try:
                if ModelProfile.from_dict(entry).key() == profile.key():
                    continue
            except (TypeError, ValueError, KeyError):
                pass
            kept.append(entry)
        _write_cache(path, [*kept, profile.to_dict()])
        log(f"saved the profile to {path}")
    return profile, False


# --------------------------------------------------------------------------- ExecuTorch edge step


def executorch_step(artifacts: str | Path, threads: int = 1, steps: int = 10, warmup: int = 2,
                    max_seconds: float = 30.0) -> dict:
    """The exported edge program's training step in the ExecuTorch runtime, timed here.

    Why a whole step and not blocks: the per-block profile above times eager modules, and
    an ExecuTorch program runs as one, so the ExecuTorch figure is the whole ``ht`` edge
    step (forward, backward, SGD on the program's parameters) of the program ``toolkit
    export`` wrote, as the edge runtime's ``executorch`` backend runs it, less the host's
    BatchNorm-statistics fold (a few element-wise ops per BN layer). The cut's
    quantization is not in it (the profile's ``exits[split].quantize_s`` is).

    Call it in a process that has not loaded an ExecuTorch program yet (:func:`measure_
    executorch_step` starts one): the runtime's thread pool is sized on first use
    (``toolkit.core.et_program.set_threads``). Returns the median and the spread of the
    timed steps.
    """
    import torch

    from toolkit.core.artifacts.manifest import load_manifest
    from toolkit.core.et_program import TrainingProgram, set_threads

    set_threads(threads)
    torch.set_num_threads(threads)
    manifest = load_manifest(Path(artifacts))
    program = TrainingProgram.from_file(manifest.path("edge_train.pte"))
    opt = manifest.data["optimizer"]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(manifest.batch_size, *manifest.input_shape, generator=gen)
    y = torch.randint(0, manifest.num_classes, (manifest.batch_size,), generator=gen)
    program.forward_backward(x, y)
    sgd = program.sgd(opt["lr"], opt.get("momentum", 0.0), opt.get("weight_decay", 0.0),
                      opt.get("nesterov", False))

    def step() -> float:
        t = time.perf_counter()
        program.forward_backward(x, y)
        sgd.step(program.named_gradients())
        return time.perf_counter() - t

    for _ in range(warmup):
        step()
    deadline = time.perf_counter() + max_seconds
    times = [step()]
    while len(times) < steps and time.perf_counter() < deadline:
        times.append(step())
    lowering = manifest.data["programs"]["edge_train"].get("lowering", {})
    return {"step_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "steps": len(times), "threads": threads, "batch": manifest.batch_size,
            "lowering": lowering.get("convolutions"), "split": manifest.data["split"]["point"]}


def measure_executorch_step(artifacts: str | Path, threads: int = 1,
                            timeout: float = 600.0) -> dict:
    """:func:`executorch_step` in a fresh Python process (its thread pool unused so far);
    HiertrainError with the child's last words when it fails."""
    import subprocess

    cmd = [sys.executable, "-m", "toolkit.plan.profiling", "--executorch-step", str(artifacts),
           "--threads", str(threads)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise HiertrainError(f"timing the ExecuTorch step of {artifacts} took over "
                             f"{timeout:.0f} s") from None
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise HiertrainError(f"timing the ExecuTorch step of {artifacts} failed: {last}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m toolkit.plan.profiling",
                                description="time an exported edge program's ExecuTorch step")
    p.add_argument("--executorch-step", required=True, metavar="ARTIFACTS")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    print(json.dumps(executorch_step(args.executorch_step, args.threads)))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
