"""Accuracy cost of GroupNorm vs BatchNorm in the VGG-16 edge segment, under hierarchical training.

What it measures
----------------
``toolkit export`` defaults VGG-16's edge segment to GroupNorm (``edge_norm="group"``) because
deep VGG stacks with batch-statistics BatchNorm (``HostStatsBatchNorm2d``) show occasional
per-tensor gradient spikes against eager PyTorch on ExecuTorch, while GroupNorm matches it
(docs/export.md). That choice is only reasonable if GroupNorm does not cost much accuracy. This
benchmark trains VGG-16 split at ``stage2`` both ways, with everything else identical, and reports
the early-exit accuracy and the full-model accuracy after every epoch.

Both runs start from the same weights (``build_segments(..., seed=0)``; swapping BatchNorm for
GroupNorm draws no random numbers, and both start with weight 1 / bias 0), see the same batches
in the same order with the same augmentation, and use the same optimiser and schedule. The
swap covers every BatchNorm of the edge step: the edge stages *and* the exit head's norm. The
cloud segment keeps real ``nn.BatchNorm2d`` in both runs.

How it trains (eager PyTorch: the same math the board's ExecuTorch program runs)
---------------------------------------------------------------------------------
Per batch, as the edge runtime and the cloud trainer do:

1. edge: ``loss, cut, exit_logits, *stats = built.step(x, y)``; SGD step on the exit's
   cross-entropy; ``step.apply_stats(stats)`` folds batch statistics into the running ones
   (no-op for GroupNorm);
2. the cut (already detached) goes through the wire codec: ``dequantize(quantize(cut))`` with
   ``DEFAULT_SCHEME`` (int8, per channel, affine);
3. cloud: SGD step on the cross-entropy of ``cloud(cut)``. No gradient flows back to the edge.

Both optimisers: SGD, peak lr 0.05 (the exporter's default), momentum 0.9, weight decay 5e-4;
the learning rate rises linearly over the first epoch, then follows a cosine to 0, per step.
The warm-up is there because the cloud does not survive lr 0.05 from step 0: with no warm-up the
VGG-16 cloud's loss jumps to 4-11 within the first ~20 steps (even on a frozen edge) and it was
still near chance (full accuracy 13-18 %) after 3 epochs, which would make the full-model column
measure the cloud's instability rather than the edge norm. Incomplete last batches are dropped
(an exported training program has a fixed batch size). Augmentation: random 32x32 crop of the
4-pixel zero-padded image and a horizontal flip, drawn *per sample* from a seeded generator
(torchvision's v2 transforms applied to a batch tensor would use one crop for the whole batch).

Evaluation after every epoch, in eval mode, on the test subset: exit accuracy (edge + exit head)
and full-model accuracy (``FullModel(step.edge, cloud)``: float cut, no quantization).

Data: CIFAR-10 from ``toolkit.core.data.datasets.shared_cifar10()`` (the shared JPEG copy: figures
are for
"CIFAR-10 (JPEG copy)"). Without it the benchmark falls back to scikit-learn's digits resized to
3x32x32, says so on stderr and records it in the results; those figures say nothing about
CIFAR-10.

Defaults (10k train / 2k test images, 4 epochs, batch 64) fit in ~20 minutes on 2 idle cores for
both norms. A 2k test set has a binomial standard error of ~1 point at 70 % accuracy, and this is
a single seed: read differences of a couple of points as "no measurable difference".

    python benchmarks/norm_ablation.py                   # defaults, writes benchmarks/results/
    python benchmarks/norm_ablation.py --epochs 1 --train-limit 640 --test-limit 256  # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from toolkit.core.data.datasets import Dataset, load_dataset, normalize, shared_cifar10
from toolkit.core.models import CIFAR_MEAN, CIFAR_STD
from toolkit.core.models.exits import ExitHeadConfig
from toolkit.core.models.segments import FullModel, build_segments
from toolkit.core.protocol.quant import DEFAULT_SCHEME, dequantize, quantize

MODEL = "vgg16"
SPLIT = "stage2"
INPUT_SHAPE = (3, 32, 32)
NUM_CLASSES = 10
NORMS = ("batch", "group")
EVAL_BATCH = 256
PAD = 4
CLOUD_LR = 0.05
WARMUP_EPOCHS = 1.0
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    """One evaluation: a norm after an epoch."""

    edge_norm: str
    epoch: int
    exit_accuracy: float
    full_accuracy: float
    train_s: float  # seconds spent training in this epoch (evaluation excluded)
    exit_train_loss: float  # mean over the epoch's batches
    cloud_train_loss: float


@dataclass
class Data:
    """Normalised train and test tensors plus a description for the results."""

    train: Dataset
    test: Dataset
    name: str
    fallback: bool


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="GroupNorm vs BatchNorm in the VGG-16 edge segment under hierarchical "
        "training (eager PyTorch).",
    )
    p.add_argument("--train-limit", type=int, default=10000, help="training images (default 10000)")
    p.add_argument("--test-limit", type=int, default=2000, help="test images (default 2000)")
    p.add_argument("--epochs", type=int, default=4, help="epochs per norm (default 4)")
    p.add_argument("--batch", type=int, default=64, help="training batch size (default 64)")
    p.add_argument("--lr", type=float, default=0.05, help="peak learning rate of the edge step")
    p.add_argument("--cloud-lr", type=float, default=CLOUD_LR,
                   help=f"peak learning rate of the cloud segment (default {CLOUD_LR})")
    p.add_argument("--warmup-epochs", type=float, default=WARMUP_EPOCHS,
                   help=f"linear warm-up before the cosine decay (default {WARMUP_EPOCHS})")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--seed", type=int, default=0, help="model init, data subset, order, augment")
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument("--norms", nargs="+", choices=NORMS, default=list(NORMS),
                   help="edge norms to run (default: both)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR,
                   help="where norm_ablation.json / .md go (default benchmarks/results)")
    args = p.parse_args(argv)
    for name in ("train_limit", "test_limit", "epochs", "batch", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.lr <= 0 or args.cloud_lr <= 0 or args.warmup_epochs < 0:
        p.error("--lr and --cloud-lr must be > 0 and --warmup-epochs >= 0")
    if args.train_limit < args.batch:
        p.error("--train-limit must be at least one --batch")
    return args


def load_data(train_limit: int, test_limit: int, seed: int) -> Data:
    """CIFAR-10 (shared JPEG copy) if present, else digits at 3x32x32 with a loud warning."""
    path = shared_cifar10()
    if path is not None:
        train = load_dataset(path, "train", input_shape=INPUT_SHAPE, limit=train_limit, seed=seed)
        test = load_dataset(path, "test", input_shape=INPUT_SHAPE, limit=test_limit, seed=seed)
        mean, std = CIFAR_MEAN, CIFAR_STD
        fallback = False
        name = train.name
    else:
        print(
            "\n" + "!" * 78 + "\n"
            "!! WARNING: no CIFAR-10 copy found (datasets.shared_cifar10() is None).\n"
            "!! FALLING BACK TO sklearn DIGITS resized to 3x32x32. These figures say NOTHING\n"
            "!! about CIFAR-10; set $HIERTRAIN_CIFAR10 to a cifar10.npz for real results.\n"
            + "!" * 78 + "\n",
            file=sys.stderr, flush=True,
        )
        train = load_dataset("digits", "train", input_shape=INPUT_SHAPE, limit=train_limit,
                             seed=seed)
        test = load_dataset("digits", "test", input_shape=INPUT_SHAPE, limit=test_limit,
                            seed=seed)
        mean = tuple(train.x.mean(dim=(0, 2, 3)).tolist())
        std = tuple(train.x.std(dim=(0, 2, 3), correction=0).clamp_min(1e-6).tolist())
        fallback = True
        name = "digits (FALLBACK: CIFAR-10 copy not found; not CIFAR-10 figures)"
    if len(train.classes) != NUM_CLASSES:
        raise SystemExit(f"expected {NUM_CLASSES} classes, {train.name} has {len(train.classes)}")
    for ds in (train, test):
        ds.x = normalize(ds.x, mean, std)
    return Data(train=train, test=test, name=name, fallback=fallback)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate for ``step`` (0-based): linear warm-up, then cosine
    to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(total - warmup,
                                                                                     1)))


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (zero padding ``PAD``) and horizontal flip of an N x C x H x W."""
    n, c, h, w = x.shape
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    dy = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * PAD + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :]
    crop = padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                  rows, cols]
    flip = torch.rand(n, generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], crop.flip(3), crop)


def train_batches(
    ds: Dataset, batch: int, epoch: int, seed: int, aug: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled full batches; order and augmentation depend only on (seed, epoch), not the norm."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    order = torch.randperm(len(ds), generator=gen)
    for i in range(len(ds) // batch):
        idx = order[i * batch:(i + 1) * batch]
        x = ds.x[idx]
        yield (augment(x, gen) if aug else x), ds.y[idx]


@torch.no_grad()
def evaluate(exit_model: nn.Module, full: nn.Module, ds: Dataset) -> tuple[float, float]:
    """(exit accuracy, full-model accuracy) of eval-mode models on ``ds``."""
    exit_model.eval()
    full.eval()
    exit_ok = full_ok = 0
    for i in range(0, len(ds), EVAL_BATCH):
        x, y = ds.x[i:i + EVAL_BATCH], ds.y[i:i + EVAL_BATCH]
        _, exit_logits = exit_model(x)
        exit_ok += int((exit_logits.argmax(1) == y).sum())
        full_ok += int((full(x).argmax(1) == y).sum())
    return exit_ok / len(ds), full_ok / len(ds)


def run_norm(norm: str, data: Data, args: argparse.Namespace) -> list[Row]:
    """Hierarchically train VGG-16 (split ``stage2``) with ``edge_norm=norm``; one row per epoch."""
    built = build_segments(
        MODEL, SPLIT, num_classes=NUM_CLASSES, input_shape=INPUT_SHAPE,
        exit_cfg=ExitHeadConfig(channels=64), seed=args.seed, edge_norm=norm,
    )
    step, cloud = built.step, built.cloud
    exit_model = built.infer_module()
    full = FullModel(step.edge, cloud)

    def sgd(module: nn.Module, lr: float) -> torch.optim.SGD:
        return torch.optim.SGD(module.parameters(), lr=lr, momentum=args.momentum,
                               weight_decay=args.weight_decay)

    opt_edge, opt_cloud = sgd(step, args.lr), sgd(cloud, args.cloud_lr)
    steps_per_epoch = len(data.train) // args.batch
    total = steps_per_epoch * args.epochs
    warmup = round(args.warmup_epochs * steps_per_epoch)
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, warmup, total))
             for o in (opt_edge, opt_cloud)]

    rows: list[Row] = []
    for epoch in range(1, args.epochs + 1):
        step.train()
        cloud.train()
        exit_sum = cloud_sum = 0.0
        t0 = time.perf_counter()
        bar = tqdm(
            train_batches(data.train, args.batch, epoch, args.seed, not args.no_augment),
            total=steps_per_epoch, desc=f"{norm:5s} epoch {epoch}/{args.epochs}",
            mininterval=5.0, dynamic_ncols=True,
        )
        for i, (x, y) in enumerate(bar, 1):
            # edge: exit loss only; cut and logits come out detached
            opt_edge.zero_grad(set_to_none=True)
            outs = step(x, y)
            outs[0].backward()
            opt_edge.step()
            step.apply_stats([t.detach() for t in outs[3:]])
            # the wire: int8 per-channel affine, per batch
            cut = dequantize(quantize(outs[1], DEFAULT_SCHEME))
            # cloud
            opt_cloud.zero_grad(set_to_none=True)
            cloud_loss = F.cross_entropy(cloud(cut), y)
            cloud_loss.backward()
            opt_cloud.step()
            for s in sched:
                s.step()
            exit_sum += outs[0].item()
            cloud_sum += cloud_loss.item()
            bar.set_postfix(exit_loss=f"{exit_sum / i:.3f}", cloud_loss=f"{cloud_sum / i:.3f}",
                            refresh=False)
        bar.close()
        train_s = time.perf_counter() - t0
        exit_acc, full_acc = evaluate(exit_model, full, data.test)
        row = Row(norm, epoch, round(exit_acc, 4), round(full_acc, 4), round(train_s, 1),
                  round(exit_sum / steps_per_epoch, 4), round(cloud_sum / steps_per_epoch, 4))
        rows.append(row)
        print(f"[{norm}] epoch {epoch}: exit {exit_acc:.2%}  full {full_acc:.2%}  "
              f"({train_s:.0f} s training)", flush=True)
        if not all(math.isfinite(v) for v in (row.exit_train_loss, row.cloud_train_loss)):
            raise SystemExit(f"[{norm}] training diverged (non-finite loss)")
    return rows


def stderr_pp(acc: float, n: int) -> float:
    """Binomial standard error of an accuracy on ``n`` samples, in percentage points."""
    return 100 * math.sqrt(max(acc * (1 - acc), 0.0) / n)


def markdown(results: dict) -> str:
    final = results["final"]
    lines = [
        "# Edge norm ablation: VGG-16 split at stage2, hierarchical training",
        "",
        f"Data: **{results['data']}**, {results['train_samples']} train / "
        f"{results['test_samples']} test images, {results['epochs']} epochs, batch "
        f"{results['batch']}, seed {results['seed']}. Edge and exit trained on the exit loss, "
        "cloud on the int8-quantized cut (no gradient to the edge); SGD, peak lr "
        f"{results['lr']} edge / {results['cloud_lr']} cloud ({results['lr_schedule']}), "
        f"momentum {results['momentum']}, weight decay "
        f"{results['weight_decay']}. Eager PyTorch, eval-mode accuracy on the test subset. "
        "`group` replaces every BatchNorm of the edge step (edge stages and exit head) by "
        "GroupNorm; the cloud keeps BatchNorm in both runs. Training time is wall-clock on a "
        "shared 2-core machine (other jobs were running), not a speed comparison.",
        "",
        "| edge norm | exit accuracy | full accuracy | training time |",
        "|---|---|---|---|",
    ]
    for norm, f in final.items():
        lines.append(f"| {norm} | {f['exit_accuracy']:.2%} | {f['full_accuracy']:.2%} | "
                     f"{f['train_s']:.0f} s |")
    if "delta_full_accuracy" in results:
        n = results["test_samples"]
        se = max(stderr_pp(f["full_accuracy"], n) for f in final.values())
        lines += [
            f"| **group - batch** | **{100 * results['delta_exit_accuracy']:+.2f} pp** | "
            f"**{100 * results['delta_full_accuracy']:+.2f} pp** | |",
            "",
            f"Single seed; the binomial standard error of one accuracy on {n} test images is "
            f"about {se:.1f} pp, so a difference needs to be several points to mean anything.",
        ]
    lines += ["", "Per epoch:", "", "| edge norm | epoch | exit | full | train s |",
              "|---|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['edge_norm']} | {r['epoch']} | {r['exit_accuracy']:.2%} | "
                     f"{r['full_accuracy']:.2%} | {r['train_s']:.0f} |")
    lines += ["", f"Command: `{results['command']}`", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", *(sys.argv if argv is None else ["norm_ablation", *argv])])
    data = load_data(args.train_limit, args.test_limit, args.seed)
    print(f"data: {data.name}: {len(data.train)} train / {len(data.test)} test; "
          f"{MODEL} split {SPLIT}; norms {', '.join(args.norms)}", flush=True)

    rows: list[Row] = []
    for norm in args.norms:
        rows += run_norm(norm, data, args)

    final: dict[str, dict] = {}
    for norm in args.norms:
        mine = [r for r in rows if r.edge_norm == norm]
        last = mine[-1]
        final[norm] = {"exit_accuracy": last.exit_accuracy, "full_accuracy": last.full_accuracy,
                       "train_s": round(sum(r.train_s for r in mine), 1)}
    results: dict = {
        "data": data.name,
        "data_fallback": data.fallback,
        "train_samples": len(data.train),
        "test_samples": len(data.test),
        "epochs": args.epochs,
        "batch": args.batch,
        "model": MODEL,
        "split": SPLIT,
        "exit_head": ExitHeadConfig(channels=64).to_dict(),
        "seed": args.seed,
        "lr": args.lr,
        "cloud_lr": args.cloud_lr,
        "lr_schedule": f"linear warm-up {args.warmup_epochs:g} epoch(s), then cosine per step "
                       "to 0; edge and cloud",
        "momentum": args.momentum,
        "weight_decay": args.weight_decay,
        "augment": None if args.no_augment else "random crop (pad 4) + horizontal flip",
        "cut_quantization": DEFAULT_SCHEME.scheme_id,
        "threads": args.threads,
        "torch": torch.__version__,
        "rows": [asdict(r) for r in rows],
        "final": final,
    }
    if "batch" in final and "group" in final:
        results["delta_full_accuracy"] = round(
            final["group"]["full_accuracy"] - final["batch"]["full_accuracy"], 4)
        results["delta_exit_accuracy"] = round(
            final["group"]["exit_accuracy"] - final["batch"]["exit_accuracy"], 4)
    results["command"] = command

    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "norm_ablation.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (args.out_dir / "norm_ablation.md").write_text(md)
    print("\n" + md)
    if data.fallback:
        print("WARNING: these figures are on the DIGITS FALLBACK, not CIFAR-10.", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
