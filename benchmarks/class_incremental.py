"""New classes during a run: class-incremental online learning on CIFAR-10, 5 increments of 2.

The classes arrive in five increments, (0, 1), (2, 3), ..., (8, 9); the run never restarts
and the program never changes. smallcnn split at block1 is exported once (default
lowering) with 10 classes, the most the run will ever see: the head is provisioned ahead,
and the classes not seen yet are masked (``toolkit.core.classes``), so a class never
trained on is never predicted. The edge runs its exported ExecuTorch training program
(``edge_runtime.backends.ExecuTorchBackend``); the cloud segment trains in-process on the
codec's decoded bytes with the manifest's optimizer, as ``benchmarks/privacy.py``'s
``train_ht`` does (no broker: the bytes are the same, the timing of a link is not measured).

Three methods, the same number of SGD steps per increment (``epochs`` passes of a batch of
64 over an increment's images):

``joint``
    every class from the start: each increment's steps are drawn from all five increments'
    images. The upper bound (it is not class-incremental at all).
``naive``
    fine-tuning on each increment's images only, in sequence: the lower bound.
``replay``
    each batch is half the increment's new images, half drawn from a reservoir replay
    buffer (``toolkit.core.data.live.ReplayBuffer``, the live source's, ``--replay``
    frames) of every image trained so far; a new image enters the buffer after its first
    batch, as in ``edge-runtime train --live``.

After each increment: accuracy of the full model and of the edge's exit on the CIFAR-10
test images of every class seen so far (logits masked to those classes), and per class
group (the accuracy matrix). Average accuracy is the accuracy on everything seen so far;
the forgetting of a group is its best accuracy after an earlier increment minus its
accuracy now, averaged over the groups before the current one.

Rows go to ``benchmarks/results/class_incremental.json`` as each (method, increment)
finishes; a rerun skips the rows there with the same settings, continuing a method from the
checkpoint its last finished increment left in ``benchmarks/work/class_incremental``, or
beside a results file given with ``--out`` (the edge's SGD momentum restarts there:
ExecuTorch does not expose it).

    python benchmarks/class_incremental.py            # about 12 minutes on a busy core
    python benchmarks/class_incremental.py --quick    # a smoke run into ..._quick.json
    python benchmarks/class_incremental.py --table    # the docs' table from the results

Outputs: the JSON (settings, the command, the rows, a summary) and
``class_incremental.png`` (accuracy on the classes seen so far against the increment, one
line per method, full model and exit).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cloud_trainer.optim import make_optimizer
from edge_runtime.backends import ExecuTorchBackend
from toolkit.build.export import ExportConfig, export_artifacts
from toolkit.core.artifacts.manifest import Manifest, load_manifest
from toolkit.core.classes import SeenClasses
from toolkit.core.data.datasets import Dataset, batches, load_dataset, normalize, shared_cifar10
from toolkit.core.data.live import ReplayBuffer
from toolkit.core.models.segments import load_segments
from toolkit.core.privacy import cut_transform
from toolkit.core.protocol.codec import BatchMeta, parse_codec
from toolkit.core.protocol.quant import QuantScheme

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "work" / "class_incremental"
INCREMENTS = ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
METHODS = ("joint", "naive", "replay")
HEADS = ("full", "exit")


def log(msg: str) -> None:
    print(f"[cil {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Settings:
    """What a row depends on: a row of other settings is not kept."""

    per_class: int = 2500  # training images per class (an increment: 2 classes)
    epochs: int = 5  # passes of an increment's images (steps = epochs * images / batch)
    replay: int = 2000  # replay buffer capacity (images)
    replay_share: float = 0.5
    test_per_class: int = 1000  # CIFAR-10 has 1000 test images per class
    seed: int = 0
    model: str = "smallcnn"
    split: str = "block1"
    codec: str = "int8"


# ------------------------------------------------------------------ results file
class Results:
    """Rows keyed by ``method/increment``, appended atomically as they finish."""

    def __init__(self, path: Path, settings: Settings, command: str) -> None:
        self.path, self.settings = path, asdict(settings)
        self.data: dict[str, Any] = {"settings": self.settings, "command": command, "rows": []}
        if path.exists():
            old = json.loads(path.read_text())
            if old.get("settings") == self.settings:
                self.data["rows"] = old.get("rows", [])

    def has(self, method: str, k: int) -> bool:
        return any(r["method"] == method and r["increment"] == k for r in self.data["rows"])

    def rows(self, method: str | None = None) -> list[dict]:
        rows = [r for r in self.data["rows"] if method is None or r["method"] == method]
        return sorted(rows, key=lambda r: (METHODS.index(r["method"]), r["increment"]))

    def drop(self, method: str) -> None:
        self.data["rows"] = [r for r in self.data["rows"] if r["method"] != method]

    def add(self, row: dict) -> None:
        self.data["rows"].append(row)
        self.save()

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


# ------------------------------------------------------------------ data
def cifar(s: Settings, manifest: Manifest) -> tuple[list[Dataset], Dataset, str]:
    """Each increment's training images and the test images, normalised as the manifest says."""
    src = shared_cifar10()
    if src is None:
        sys.exit("benchmarks/class_incremental.py needs the CIFAR-10 copy "
                 "(../shared/data/cifar10.npz or $HIERTRAIN_CIFAR10)")
    norm = manifest.data["model"]["normalization"]

    def per_class(ds: Dataset, n: int, classes: tuple[int, ...]) -> Dataset:
        perm = torch.from_numpy(np.random.default_rng(s.seed).permutation(len(ds)))
        idx = torch.cat([perm[ds.y[perm] == c][:n] for c in classes])
        return Dataset(x=normalize(ds.x[idx], norm["mean"], norm["std"]), y=ds.y[idx].clone(),
                       classes=ds.classes, name=ds.name)

    train = load_dataset(src, "train")
    incs = [per_class(train, s.per_class, c) for c in INCREMENTS]
    del train
    test = per_class(load_dataset(src, "test"), s.test_per_class, tuple(range(10)))
    return incs, test, f"{incs[0].name} ({src})"


def concat(parts: list[Dataset]) -> Dataset:
    return Dataset(x=torch.cat([p.x for p in parts]), y=torch.cat([p.y for p in parts]),
                   classes=parts[0].classes, name=parts[0].name)


# ------------------------------------------------------------------ the hierarchy
class Hierarchy:
    """The board's ExecuTorch program and the cloud's step, joined by the codec's bytes.

    Each side learns the seen classes as the runtimes do: the edge from its training
    labels, the cloud from the labels of the batches it decodes.
    """

    def __init__(self, manifest: Manifest, s: Settings) -> None:
        self.manifest = manifest
        self.backend = ExecuTorchBackend(manifest)
        self.cloud = load_segments(manifest).cloud.train()
        self.opt = make_optimizer(self.cloud.parameters(), manifest)
        self.codec = parse_codec(manifest.codec_name)
        self.scheme = QuantScheme.from_dict(manifest.data["quantization"])
        self.protect = cut_transform(manifest.privacy)
        self.edge_seen = SeenClasses(manifest.num_classes)
        self.cloud_seen = SeenClasses(manifest.num_classes)
        self.replay = ReplayBuffer(s.replay, np.random.default_rng([s.seed, 7]))
        self.seq = 0

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """One hierarchical step; (edge loss, cloud loss)."""
        self.edge_seen.update(y)
        res = self.backend.step(x, y)
        msg = self.codec.encode(self.protect(res.cut), y, BatchMeta("cil", "edge", self.seq, 0,
                                                                    self.seq), base=self.scheme)
        b = self.codec.decode(msg)
        self.cloud_seen.update(b.labels)
        loss = F.cross_entropy(self.cloud(b.tensor), b.labels)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.seq += 1
        return res.loss, loss.item()

    @torch.no_grad()
    def logits(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Full-model and exit logits in eval mode (the edge's trained weights, eager)."""
        step = load_segments(self.manifest).step
        step.load_state_dict(self.backend.state_dict())
        step.eval()
        self.cloud.eval()
        out: dict[str, list[torch.Tensor]] = {"full": [], "exit": []}
        try:
            for xb in x.split(500):
                cut = step.edge(xb)
                out["full"].append(self.cloud(cut))
                out["exit"].append(step.exit(cut))
        finally:
            self.cloud.train()
        return {k: torch.cat(v) for k, v in out.items()}

    def state(self) -> dict[str, Any]:
        return {"edge": self.backend.state_dict(), "cloud": self.cloud.state_dict(),
                "opt": self.opt.state_dict(), "edge_seen": self.edge_seen.sorted(),
                "cloud_seen": self.cloud_seen.sorted(), "replay": self.replay.items,
                "offered": self.replay.offered, "peak": self.replay.peak,
                "rng": self.replay.rng.bit_generator.state, "seq": self.seq}

    def load(self, st: dict[str, Any]) -> None:
        self.backend.load_state_dict(st["edge"])
        self.cloud.load_state_dict(st["cloud"])
        self.opt.load_state_dict(st["opt"])
        self.edge_seen.update(st["edge_seen"])
        self.cloud_seen.update(st["cloud_seen"])
        self.replay.items, self.replay.offered = list(st["replay"]), st["offered"]
        self.replay.peak = st["peak"]
        self.replay.rng.bit_generator.state = st["rng"]
        self.seq = st["seq"]


def stream(method: str, k: int, incs: list[Dataset], everything: Dataset, h: Hierarchy,
           s: Settings, bs: int, steps: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Increment ``k``'s ``steps`` batches for ``method``."""
    if method == "joint":  # one endless shuffled stream of everything, increment k's slice
        n = len(everything)
        per_epoch = n // bs
        first = k * steps
        for j in range(first, first + steps):
            epoch, i = divmod(j, per_epoch)  # batches()'s order, without producing batches 0..i-1
            idx = torch.from_numpy(np.random.default_rng([s.seed, epoch]).permutation(n))
            idx = idx[i * bs:(i + 1) * bs]
            yield everything.x[idx], everything.y[idx]
        return
    ds = incs[k]
    if method == "naive":
        epochs = (batches(ds, bs, epoch=e, seed=s.seed) for e in itertools.count())
        yield from itertools.islice(itertools.chain.from_iterable(epochs), steps)
        return
    # replay: fresh images in order (each offered to the buffer once, after its first batch)
    n = len(ds)
    order = [torch.from_numpy(np.random.default_rng([s.seed, k, e]).permutation(n))
             for e in range(2 * s.epochs + 1)]
    flat = torch.cat(order)
    pos = 0
    for _ in range(steps):
        n_replay = min(int(bs * s.replay_share), len(h.replay))
        idx = flat[pos:pos + bs - n_replay]
        first_pass = [int(i) for i, p in zip(idx, range(pos, pos + len(idx)), strict=True)
                      if p < n]
        pos += len(idx)
        old = h.replay.draw(n_replay) if n_replay else []
        x = torch.cat([ds.x[idx], *[t[None] for t, _ in old]])
        y = torch.cat([ds.y[idx], torch.tensor([lab for _, lab in old], dtype=torch.int64)])
        for i in first_pass:  # after the draw: a batch never holds an image twice
            h.replay.offer((ds.x[i], int(ds.y[i])))
        yield x, y


# ------------------------------------------------------------------ metrics
def group_accuracy(logits: torch.Tensor, test: Dataset, k: int) -> tuple[float, list[float]]:
    """Accuracy on the test images of increments 0..k, logits masked to their classes;
    (overall, per group)."""
    seen = SeenClasses(10, [c for g in INCREMENTS[:k + 1] for c in g])
    keep = seen.covers(test.y)
    pred = seen.apply(logits[keep]).argmax(1)
    y = test.y[keep]
    ok = pred == y
    groups = [float(ok[torch.isin(y, torch.tensor(g))].float().mean()) for g in INCREMENTS[:k + 1]]
    return float(ok.float().mean()), groups


def forgetting(matrix: list[list[float]]) -> float | None:
    """Mean over groups j < k of (best accuracy on j before increment k) - (accuracy now)."""
    k = len(matrix) - 1
    if k == 0:
        return None
    return float(np.mean([max(matrix[i][j] for i in range(j, k)) - matrix[k][j]
                          for j in range(k)]))


# ------------------------------------------------------------------ a method
def run_method(method: str, manifest: Manifest, incs: list[Dataset], everything: Dataset,
               test: Dataset, s: Settings, res: Results) -> None:
    done = [k for k in range(len(INCREMENTS)) if res.has(method, k)]
    if len(done) == len(INCREMENTS):
        return
    # beside a results file elsewhere (--out: a test's temporary directory), else in WORK
    where = res.path.resolve().parent
    ckpt = (WORK if where == RESULTS else where) / f"{res.path.stem}-{method}.pt"
    h = Hierarchy(manifest, s)
    start = 0
    if done:
        st = torch.load(ckpt, weights_only=False) if ckpt.exists() else None
        if st is not None and st["settings"] == asdict(s) and st["increment"] == max(done):
            h.load(st["state"])
            start = max(done) + 1
            log(f"{method}: resuming after increment {max(done)}")
        else:
            res.drop(method)
    bs = manifest.batch_size
    rows = res.rows(method)
    matrix = {h_: [r[f"{h_}_groups"] for r in rows] for h_ in HEADS}
    for k in range(start, len(INCREMENTS)):
        steps = s.epochs * len(incs[k]) // bs
        t0 = time.monotonic()
        edge_loss = cloud_loss = 0.0
        classes_in_batches: set[int] = set()
        for x, y in stream(method, k, incs, everything, h, s, bs, steps):
            el, cl = h.step(x, y)
            edge_loss += el
            cloud_loss += cl
            classes_in_batches.update(y.tolist())
        train_s = time.monotonic() - t0
        logits = h.logits(test.x)
        row: dict[str, Any] = {"method": method, "increment": k,
                               "new_classes": list(INCREMENTS[k]),
                               "edge_seen_classes": h.edge_seen.sorted(),
                               "cloud_seen_classes": h.cloud_seen.sorted(),
                               "classes_in_last_increment_batches": sorted(classes_in_batches),
                               "steps": steps, "train_s": round(train_s, 1),
                               "edge_loss": round(edge_loss / steps, 4),
                               "cloud_loss": round(cloud_loss / steps, 4)}
        for head in HEADS:
            acc, groups = group_accuracy(logits[head], test, k)
            matrix[head].append(groups)
            f = forgetting(matrix[head])
            row.update({f"{head}_accuracy": round(acc, 4),
                        f"{head}_groups": [round(g, 4) for g in groups],
                        f"{head}_forgetting": None if f is None else round(f, 4)})
        if method == "replay":
            row["replay_buffer"] = {"size": len(h.replay), "offered": h.replay.offered,
                                    "classes": np.bincount([lab for _, lab in h.replay.items],
                                                           minlength=10).tolist()}
        torch.save({"settings": asdict(s), "increment": k, "state": h.state()}, ckpt)
        res.add(row)
        log(f"{method} increment {k} {INCREMENTS[k]}: full {row['full_accuracy']:.3f} "
            f"exit {row['exit_accuracy']:.3f} forgetting full {row['full_forgetting']} "
            f"({train_s:.0f} s)")


# ------------------------------------------------------------------ outputs
def summary(res: Results) -> dict[str, Any]:
    """Per method: accuracy after each increment, average accuracy, final forgetting."""
    out: dict[str, Any] = {}
    for method in METHODS:
        rows = res.rows(method)
        if len(rows) != len(INCREMENTS):
            continue
        out[method] = {}
        for head in HEADS:
            accs = [r[f"{head}_accuracy"] for r in rows]
            out[method][head] = {
                "accuracy_after_increment": accs,
                "average_incremental_accuracy": round(float(np.mean(accs)), 4),
                "final_accuracy": accs[-1],
                "final_forgetting": rows[-1][f"{head}_forgetting"],
                "final_groups": rows[-1][f"{head}_groups"],
            }
    return out


def table(data: dict[str, Any]) -> str:
    """The docs' markdown table, from the results file."""
    lines = ["| method | head | after 1 | after 2 | after 3 | after 4 | after 5 | average "
             "| forgetting |", "|---|---|---|---|---|---|---|---|---|"]
    for method, heads in data.get("summary", {}).items():
        for head, m in heads.items():
            accs = " | ".join(f"{a:.3f}" for a in m["accuracy_after_increment"])
            lines.append(f"| {method} | {head} | {accs} | "
                         f"{m['average_incremental_accuracy']:.3f} | "
                         f"{m['final_forgetting']:.3f} |")
    return "\n".join(lines)


def plot(res: Results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, head in zip(axes, HEADS, strict=True):
        for method in METHODS:
            rows = res.rows(method)
            if rows:
                ax.plot([r["increment"] + 1 for r in rows], [r[f"{head}_accuracy"] for r in rows],
                        "o-", label=method)
        ax.set_title(f"{'full model' if head == 'full' else 'edge exit'}")
        ax.set_xlabel("increment (2 new classes each)")
        ax.set_xticks(range(1, len(INCREMENTS) + 1))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy on the classes seen so far")
    axes[0].legend()
    fig.suptitle("Class-incremental CIFAR-10 (JPEG copy), smallcnn split at block1, "
                 "ExecuTorch edge", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def export(s: Settings) -> Path:
    out = WORK / f"{s.model}-{s.split}-10cls"
    if not (out / "manifest.json").exists():
        log(f"export {s.model} split at {s.split}, 10 classes")
        export_artifacts(ExportConfig(model=s.model, out=out, split=s.split, batch=64,
                                      board="rpi4", num_classes=10, codec=s.codec, force=True))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-class", type=int, default=Settings.per_class)
    p.add_argument("--epochs", type=int, default=Settings.epochs)
    p.add_argument("--replay", type=int, default=Settings.replay)
    p.add_argument("--test-per-class", type=int, default=Settings.test_per_class)
    p.add_argument("--methods", default=",".join(METHODS))
    # one thread: on shared cores a threaded tiny step waits for its other thread (here an
    # increment took 184 s with 2 threads, 34 s with 1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny sizes, class_incremental_quick.json")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--table", action="store_true", help="print the table of the results file")
    args = p.parse_args(argv)
    if args.quick:
        args.per_class, args.epochs, args.replay, args.test_per_class = 96, 2, 128, 50
    out = args.out or RESULTS / ("class_incremental_quick.json" if args.quick
                                 else "class_incremental.json")
    if args.table:
        print(table(json.loads(out.read_text())))
        return 0
    torch.set_num_threads(args.threads)
    s = Settings(per_class=args.per_class, epochs=args.epochs, replay=args.replay,
                 test_per_class=args.test_per_class)
    command = "python benchmarks/class_incremental.py " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    WORK.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    res = Results(out, s, command.strip())
    manifest = load_manifest(export(s))
    incs, test, data_name = cifar(s, manifest)
    res.data["data"] = data_name
    res.data["lowering"] = manifest.data["programs"]["edge_train"]["lowering"]["convolutions"]
    everything = concat(incs)
    for method in args.methods.split(","):
        if method not in METHODS:
            sys.exit(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        log(f"method {method}")
        run_method(method, manifest, incs, everything, test, s, res)
    res.data["summary"] = summary(res)
    res.save()
    plot(res, out.with_suffix(".png"))
    print(table(res.data))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
