"""Peak memory of ``edge-runtime train --data DIR`` streaming a 224-px image folder.

The issue (17): a folder loaded whole as float32 needs ``N x 3 x 224 x 224 x 4`` bytes,
12 GB for 20,000 images; streamed (``toolkit.core.data.stream``), the edge should hold
the index and a few batches, whatever N. This runs the real thing and measures it:

1. Builds, once, an ImageFolder of ``--images`` JPEGs at ``--size`` px under ``--work-dir``
   (CIFAR-10 (JPEG copy) from ``/work/shared/data/cifar10.npz`` upscaled, bilinear; digits
   when that file is absent: the row says which). Interrupted builds continue where they
   stopped; a finished folder is reused.
2. Exports the small CNN for ``3 x size x size`` with the default settings (XNNPACK, the
   rpi4 profile's batch of 32), once.
3. Runs ``edge-runtime train --data DIR --max-batches B`` (ExecuTorch backend, the default
   ``--workers``: cores - 1) against a mosquitto on 127.0.0.1 with no trainer
   (``--confirm-timeout 0``), and samples every ``--interval`` s the resident memory of the
   edge process plus its DataLoader workers (psutil): ``peak_rss_mb`` sums their RSS (pages
   the forked workers share with the trainer count twice: an upper bound), ``peak_pss_mb``
   sums their PSS (shared pages split between the processes: the machine's real cost).
   The full index is built, so the folder's size counts, but only B batches are decoded.

A ``data-only`` row per folder runs the data path alone (the index and the DataLoader
workers decoding ``B`` batches, no model, no broker): what streaming itself costs, since at
224 px the exported program's own buffers dominate the edge's figure.

Two rows per folder size (``--images``, repeatable: the default measures 2,000 and 20,000
images, which shows whether memory grows with the folder), appended to
``benchmarks/results/stream_memory.json`` as each finishes, next to what the in-memory
float32 load would need (computed, never attempted). A rerun skips the rows already there
(``--redo`` measures them again).

    python benchmarks/stream_memory.py    # ~10 min on 2 cores, most of it the folder build
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from toolkit.build.export import ExportConfig, export_artifacts
from toolkit.core.data.datasets import CIFAR10_CLASSES, load_dataset, shared_cifar10
from toolkit.lab.broker import EmbeddedBroker, MosquittoBroker, find_mosquitto

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks/results/stream_memory.json"
CIFAR_MEAN = (0.491, 0.482, 0.447)  # the JPEG copy's train statistics (its README)
CIFAR_STD = (0.247, 0.243, 0.262)
BATCH = 32  # the rpi4 profile's, the export default
JPEG_QUALITY = 90


def source_images() -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """uint8 N x H x W x 3 images, labels, class names and a name for the row."""
    npz = shared_cifar10()
    if npz is not None:
        with np.load(npz) as f:
            return f["x_train"], f["y_train"].astype(np.int64), list(CIFAR10_CLASSES), \
                "CIFAR-10 (JPEG copy), upscaled"
    print("no CIFAR-10 copy found: building the folder from scikit-learn's digits", flush=True)
    ds = load_dataset("digits", "train")
    x = (ds.x[:, 0].numpy() * 255).round().astype(np.uint8)
    return np.repeat(x[..., None], 3, axis=3), ds.y.numpy(), [str(i) for i in range(10)], \
        "digits, upscaled"


def build_folder(root: Path, n: int, size: int) -> dict:
    """``root/<class>/<i>.jpg``, ``n`` images at ``size`` px; resumable, cached."""
    done = root / "complete.json"
    if done.exists():
        return json.loads(done.read_text())
    x, y, classes, origin = source_images()
    order = np.random.default_rng(0).permutation(len(x))  # a class mix, not a sorted prefix
    t0 = time.monotonic()
    for i in range(n):
        k = int(order[i % len(order)])
        path = root / classes[int(y[k])] / f"{i:06d}.jpg"
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".part")
        Image.fromarray(x[k]).resize((size, size), Image.BILINEAR).save(
            tmp, "JPEG", quality=JPEG_QUALITY)
        os.replace(tmp, path)  # an interrupted build never leaves half a JPEG
        if i % 2000 == 0:
            print(f"  {i}/{n} images ({time.monotonic() - t0:.0f} s)", flush=True)
    info = {"images": n, "size": size, "origin": origin, "jpeg_quality": JPEG_QUALITY,
            "bytes": sum(p.stat().st_size for p in root.rglob("*.jpg"))}
    done.write_text(json.dumps(info) + "\n")
    return info


def export_for(root: Path, size: int) -> Path:
    out = root / f"smallcnn-{size}-b{BATCH}"
    if not (out / "manifest.json").exists():
        export_artifacts(ExportConfig(model="smallcnn", out=out, input_shape=(3, size, size),
                                      mean=CIFAR_MEAN, std=CIFAR_STD, batch=BATCH, force=True))
    return out


class Sampler:
    """Peak RSS and PSS of a process tree, sampled until the root exits."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak_rss = self.peak_pss = self.peak_root_rss = 0
        self.max_children = self.samples = 0

    def sample(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        rss = pss = 0
        for p in procs:
            try:
                info = p.memory_full_info()  # rss and pss (Linux: /proc/<pid>/smaps_rollup)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            if p.pid == self.root.pid:
                self.peak_root_rss = max(self.peak_root_rss, info.rss)
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.max_children = max(self.max_children, len(procs) - 1)
        self.samples += 1


def run_edge(folder: Path, artifacts: Path, url: str, work: Path, batches: int,
             interval: float, timeout: float, extra: list[str]) -> dict:
    state = work / "state"
    report = work / f"edge-{folder.name}.json"
    argv = [sys.executable, "-m", "edge_runtime", "train", "--artifacts", str(artifacts),
            "--broker", url, "--device-id", "bench", "--run-id", f"mem-{folder.name}",
            "--epochs", "1", "--data", str(folder), "--max-batches", str(batches),
            "--state-dir", str(state), "--report", str(report), "--confirm-timeout", "0",
            "--quiet", *extra]
    log = work / f"edge-{folder.name}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                                stdout=f, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid)
        while proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                proc.kill()
                proc.wait()
                raise RuntimeError(f"edge did not finish in {timeout:.0f} s; see {log}")
            sampler.sample()
            time.sleep(interval)
    wall = time.monotonic() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"edge exited {proc.returncode}:\n{log.read_text()[-2000:]}")
    rep = json.loads(report.read_text())
    mb = 1 << 20
    return {"peak_rss_mb": round(sampler.peak_rss / mb, 1),
            "peak_pss_mb": round(sampler.peak_pss / mb, 1),
            "peak_trainer_rss_mb": round(sampler.peak_root_rss / mb, 1),
            "worker_processes": sampler.max_children, "rss_samples": sampler.samples,
            "batches": rep["batches_published"], "samples_trained": rep["samples_published"],
            "setup_s": rep["setup_s"], "train_wall_s": round(rep["wall_s"], 1),
            "wall_s": round(wall, 1), "data": rep["data"], "backend": rep["backend"],
            "command": shlex.join(["edge-runtime", *argv[3:]])}


DATA_ONLY = """
import sys, time
from toolkit.core.data.stream import FolderStream
stream = FolderStream(sys.argv[1], input_shape=(3, SIZE, SIZE), mean=MEAN, std=STD)
t = time.monotonic()
for i, (x, y) in enumerate(stream.batches(BATCH, epoch=0, seed=0)):
    if i + 1 == BATCHES:
        break
print(f"{i + 1} batches in {time.monotonic() - t:.1f} s, workers {stream.workers}")
"""


def run_data_only(folder: Path, size: int, batches: int, interval: float, timeout: float
                  ) -> dict:
    """The data path alone (index + DataLoader workers, no model): what streaming costs."""
    code = (DATA_ONLY.replace("SIZE", str(size)).replace("MEAN", repr(CIFAR_MEAN))
            .replace("STD", repr(CIFAR_STD)).replace("BATCHES", str(batches))
            .replace("BATCH", str(BATCH)))
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(proc.pid)
    while proc.poll() is None:
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise RuntimeError(f"the data-only run did not finish in {timeout:.0f} s")
        sampler.sample()
        time.sleep(interval)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode != 0:
        raise RuntimeError(f"the data-only run exited {proc.returncode}:\n{out[-2000:]}")
    mb = 1 << 20
    return {"peak_rss_mb": round(sampler.peak_rss / mb, 1),
            "peak_pss_mb": round(sampler.peak_pss / mb, 1),
            "peak_trainer_rss_mb": round(sampler.peak_root_rss / mb, 1),
            "worker_processes": sampler.max_children, "batches": batches,
            "wall_s": round(time.monotonic() - t0, 1), "output": out.strip()[-200:],
            "command": "FolderStream(...).batches(...) alone, see DATA_ONLY in this script"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", type=Path,
                    default=Path(tempfile.gettempdir()) / "ht-stream-memory",
                    help="where the image folders, the export and the logs are kept")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--images", type=int, action="append", default=None,
                    help="folder size(s) to measure (repeatable); unset: 2000 and 20000")
    ap.add_argument("--size", type=int, default=224, help="image side in pixels")
    ap.add_argument("--batches", type=int, default=40, help="batches each edge run trains")
    ap.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed per edge run")
    ap.add_argument("--edge-arg", action="append", default=[], metavar="ARG",
                    help="extra edge-runtime train argument, e.g. --edge-arg=--workers=0")
    ap.add_argument("--redo", action="store_true", help="measure rows already there again")
    args = ap.parse_args()
    sizes = args.images or [2000, 20000]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {
        "what": __doc__.splitlines()[0], "rows": []}

    def key(r: dict) -> tuple:
        return (r.get("kind", "edge"), r["images"], r["size"], r["batches_asked"],
                tuple(r["edge_args"]))

    artifacts = export_for(args.work_dir, args.size)
    broker = MosquittoBroker() if find_mosquitto() else EmbeddedBroker()
    with broker.start(timeout=10) as b:
        for n, kind in [(n, kind) for n in sizes for kind in ("edge", "data-only")]:
            row_key = (kind, n, args.size, args.batches, tuple(args.edge_arg))
            if not args.redo and any(key(r) == row_key for r in doc["rows"]):
                print(f"{kind}, {n} images: measured already (--redo to measure again)")
                continue
            folder = args.work_dir / f"frames-{n}-{args.size}px"
            info = build_folder(folder, n, args.size)
            measured = (run_edge(folder, artifacts, b.url, args.work_dir, args.batches,
                                 args.interval, args.timeout, args.edge_arg)
                        if kind == "edge" else
                        run_data_only(folder, args.size, args.batches, args.interval,
                                      args.timeout))
            row = {"kind": kind, "images": n, "size": args.size, "batches_asked": args.batches,
                   "edge_args": args.edge_arg, "batch": BATCH, "origin": info["origin"],
                   "folder_mb": round(info["bytes"] / (1 << 20), 1),
                   "float32_in_memory_mb": round(n * 3 * args.size ** 2 * 4 / (1 << 20)),
                   **measured, "broker": type(broker).__name__,
                   "machine": {"arch": platform.machine(), "cpus": os.cpu_count(),
                               "ram_mb": round(psutil.virtual_memory().total / (1 << 20))},
                   "benchmark_command": shlex.join(["python", "benchmarks/stream_memory.py",
                                                    *sys.argv[1:]]),
                   "unix_time": round(time.time())}
            print(json.dumps(row), flush=True)
            doc["rows"] = [r for r in doc["rows"] if key(r) != row_key] + [row]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    main()
