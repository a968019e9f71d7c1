"""What the edge runtime costs a board: installed size, import time, peak memory per profile.

Three kinds of rows, appended to the results file as each finishes (a rerun skips rows
already there, so an interrupted run resumes):

- ``install``: bytes on disk of the board install (``toolkit/deploy/board-requirements.txt``
  plus hiertrain), on this x86 machine (the installed distributions' files) and in the
  emulated aarch64 environment (``.ci/aarch64-env.sh``: the unpacked wheels; the CUDA
  libraries the index's aarch64 torch needs are counted apart, a CPU-only torch has none).
- ``import``: seconds to import the edge's training path and the ExecuTorch runtime in a
  fresh process (median of 3 on x86; one emulated Cortex-A72 run, which times qemu and not
  a Pi: stated in the row).
- ``train``: peak resident memory (``ru_maxrss``) of a real ``edge-runtime train`` process
  per board profile, with the profile's batch and threads and the default export (XNNPACK),
  on the small CNN (digits, 8x8) and on VGG-16 at its default split (CIFAR-shaped 3x32x32
  frames made for the purpose: memory does not depend on the pixels), against a mosquitto
  on 127.0.0.1 with no trainer (``--confirm-timeout 0``), ``BATCHES`` batches. ``fits`` is
  peak RSS <= the profile's ``budget_mb``. One aarch64 row per workload runs the edge under
  emulation (A72, rpi4's batch): qemu's own memory is in that figure.

    python benchmarks/edge_footprint.py     # -> benchmarks/results/edge_footprint.json, .md
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from packaging.requirements import Requirement

from toolkit.build.export import ExportConfig, export_artifacts
from toolkit.core.artifacts.boards import list_boards, load_board
from toolkit.core.data.datasets import digits_stats
from toolkit.lab.broker import MosquittoBroker

ROOT = Path(__file__).resolve().parents[1]
BOARD_REQ = ROOT / "toolkit/deploy/board-requirements.txt"
AARCH64_ENV = Path(os.environ.get("HT_AARCH64_ENV", "/var/cache/hiertrain/aarch64"))
BATCHES = 4
IMPORT = ("import time; t = time.perf_counter(); import edge_runtime.cli, edge_runtime.train, "
          "edge_runtime.ht_loop; from toolkit.core.et_program import _runtime; _runtime(); "
          "print(time.perf_counter() - t)")
WORKLOADS = {
    "smallcnn-digits": {"model": "smallcnn", "input_shape": (1, 8, 8), "digits": True},
    # verify=False: at batch 64 this export's gradient-parity gate fails (batch-statistics
    # BatchNorm in float32, global relative error 1.8e-3 against the 1e-4 bar; docs/export.md).
    # Memory does not depend on it; the rows say so.
    "vgg16-stage2-cifar": {"model": "vgg16", "input_shape": (3, 32, 32),
                           "mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26),
                           "verify": False},
    # the network docs/deploy.md bundles for a Pi; x86 rows only (its emulated run would take
    # most of an hour); its parity gate off too (3.3e-4 at batch 32, docs/export.md)
    "resnet18-layer1-cifar": {"model": "resnet18", "split": "layer1", "input_shape": (3, 32, 32),
                              "mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26),
                              "verify": False, "x86_only": True},
}


def board_dists() -> list[str]:
    lines = (raw.split("#")[0].strip() for raw in BOARD_REQ.read_text().splitlines())
    return [*(Requirement(line).name for line in lines if line), "hiertrain"]


def installed_bytes(dist: str) -> int:
    d = md.distribution(dist)
    total = 0
    for f in d.files or []:
        p = Path(d.locate_file(f))
        if p.is_file():
            total += p.stat().st_size
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def install_rows() -> list[dict]:
    x86 = {d: installed_bytes(d) for d in board_dists()}
    rows = [{"kind": "install", "arch": "x86_64", "mb": round(sum(x86.values()) / 2**20, 1),
             "per_dist_mb": {k: round(v / 2**20, 1) for k, v in x86.items()},
             "note": "files of the installed distributions (hiertrain: editable, source only)"}]
    # the site .ci/aarch64-env.sh builds from this version of the list
    site = AARCH64_ENV / f"site-{hashlib.sha256(BOARD_REQ.read_bytes()).hexdigest()[:12]}"
    if site.is_dir():
        rows.append({"kind": "install", "arch": "aarch64", "mb": round(dir_bytes(site) / 2**20, 1),
                     "torch_mb": round(dir_bytes(site / "torch") / 2**20, 1),
                     "cuda_libs_mb": round(dir_bytes(AARCH64_ENV / "cuda") / 2**20, 1),
                     "note": "toolkit/deploy/board-requirements.txt unpacked (.ci/aarch64-env.sh); "
                             "the index's aarch64 torch is a CUDA build and also needs "
                             "cuda_libs_mb, which a CPU-only torch does not"})
    return rows


def import_rows() -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = [float(subprocess.run([sys.executable, "-c", IMPORT], env=env, cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout) for _ in range(3)]
    rows = [{"kind": "import", "arch": "x86_64", "seconds": round(statistics.median(runs), 2),
             "runs": [round(r, 2) for r in runs]}]
    python = AARCH64_ENV / "python"
    if python.exists():
        out = subprocess.run([str(python), "-c", IMPORT], env={**env, "HT_QEMU_CPU": "cortex-a72"},
                             cwd=ROOT, check=True, capture_output=True, text=True).stdout
        rows.append({"kind": "import", "arch": "aarch64", "core": "cortex-a72",
                     "seconds": round(float(out), 2),
                     "note": "qemu user-mode emulation on this x86 machine: not a Pi's time"})
    return rows


def export_for(work: str, batch: int, root: Path) -> Path:
    out = root / f"{work}-b{batch}"
    if not (out / "manifest.json").exists():
        opts = dict(WORKLOADS[work])
        opts.pop("x86_only", None)
        if opts.pop("digits", False):
            opts["mean"], opts["std"] = digits_stats()
        export_artifacts(ExportConfig(out=out, batch=batch, force=True, **opts))
    return out


def frames(work: str, n: int, root: Path) -> Path:
    """``n`` training samples as a dataset .npz (digits: the real ones; else made up)."""
    path = root / f"{work}-{n}.npz"
    if not path.exists():
        if WORKLOADS[work].get("digits"):
            from toolkit.core.data.datasets import load_dataset

            ds = load_dataset("digits", "train", limit=n)
            x = (ds.x[:, 0].numpy() * 255).round().astype(np.uint8)
            y = ds.y.numpy()
        else:
            c, h, w = WORKLOADS[work]["input_shape"]
            rng = np.random.default_rng(0)
            x = rng.integers(0, 256, (n, h, w, c), dtype=np.uint8)
            y = rng.integers(0, 10, n)
        np.savez(path, x_train=x, y_train=y, x_test=x[:1], y_test=y[:1])
    return path


def train_row(work: str, board: str, arch: str, root: Path, broker_url: str) -> dict:
    prof = load_board(board)
    artifacts = export_for(work, prof.default_batch, root)
    data = frames(work, BATCHES * prof.default_batch, root)
    edge = ["-m", "edge_runtime", "train", "--artifacts", str(artifacts), "--broker", broker_url,
            "--device-id", "fp", "--run-id", f"fp-{work}-{board}-{arch}", "--epochs", "1",
            "--data", str(data), "--state-dir", str(root / "state"), "--quiet",
            "--threads", str(prof.threads), "--confirm-timeout", "0"]
    if arch == "aarch64":
        argv, env = [str(AARCH64_ENV / "python"), *edge], {"HT_QEMU_CPU": "cortex-a72"}
    else:
        argv, env = [sys.executable, *edge], {}
    # A wrapper interpreter per run: its RUSAGE_CHILDREN maximum is this one edge's peak RSS.
    wrapper = [sys.executable, "-c",
               "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
               "sys.exit(r)", *argv]
    log = root / f"{work}-{board}-{arch}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.run(wrapper, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                              cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=3600)
    wall = time.monotonic() - t0
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"edge for {work} on {board} ({arch}) exited {proc.returncode}:\n"
                           + text[-2000:])
    rss_mb = int(text.strip().splitlines()[-1]) / 1024
    return {"kind": "train", "workload": work, "board": board, "arch": arch,
            "batch": prof.default_batch, "threads": prof.threads, "batches": BATCHES,
            "peak_rss_mb": round(rss_mb, 1), "budget_mb": prof.budget_mb,
            "fits": rss_mb <= prof.budget_mb, "wall_s": round(wall, 1),
            **({"export": "parity gate off (verify=False)"}
               if WORKLOADS[work].get("verify") is False else {}),
            **({"note": "emulated Cortex-A72 (qemu): RSS includes the emulator's own memory"}
               if arch == "aarch64" else {})}


def table(doc: dict) -> str:
    """The results as the markdown tables docs/deploy.md quotes."""
    rows = doc["rows"]
    out = ["| board | workload | batch | threads | peak RSS MB | budget MB | fits |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["kind"] == "train":
            board = r["board"] + (" (emulated A72)" if r["arch"] == "aarch64" else "")
            out.append(f"| {board} | {r['workload']} | {r['batch']} | {r['threads']} | "
                       f"{r['peak_rss_mb']:.0f} | {r['budget_mb']} | "
                       f"{'yes' if r['fits'] else 'NO'} |")
    out += ["", "| arch | installed MB | import s |", "|---|---|---|"]
    for arch in ("x86_64", "aarch64"):
        inst = next((r for r in rows if r["kind"] == "install" and r["arch"] == arch), None)
        imp = next((r for r in rows if r["kind"] == "import" and r["arch"] == arch), None)
        if inst or imp:
            mb = f"{inst['mb']:.0f}" if inst else "-"
            if inst and "cuda_libs_mb" in inst:
                mb += f" (+{inst['cuda_libs_mb']:.0f} CUDA libraries)"
            sec = f"{imp['seconds']:.1f}" if imp else "-"
            out.append(f"| {arch} | {mb} | {sec}{' (qemu)' if arch == 'aarch64' else ''} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/edge_footprint.json")
    ap.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "ht-footprint")
    ap.add_argument("--no-aarch64", action="store_true", help="x86 rows only")
    ap.add_argument("--redo", choices=("install", "import", "train"), action="append",
                    default=[], help="measure the rows of this kind again (drops the old ones)")
    args = ap.parse_args()
    args.work_dir.mkdir(parents=True, exist_ok=True)
    doc = json.loads(args.out.read_text()) if args.out.exists() else {
        "what": __doc__.splitlines()[0], "machine": {"arch": platform.machine(),
                                                     "cpus": os.cpu_count()}, "rows": []}
    doc["rows"] = [r for r in doc["rows"] if r["kind"] not in args.redo]

    def have(**key) -> bool:
        return any(all(r.get(k) == v for k, v in key.items()) for r in doc["rows"])

    def add(rows: list[dict]) -> None:
        for r in rows:
            print(json.dumps(r), flush=True)
        doc["rows"].extend(rows)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table(doc))

    if not have(kind="install"):
        add(install_rows())
    if not have(kind="import"):
        add(import_rows())
    aarch64 = not args.no_aarch64 and (AARCH64_ENV / "python").exists()
    with MosquittoBroker().start(timeout=10) as broker:
        for work in WORKLOADS:
            for board in list_boards():
                if not have(kind="train", workload=work, board=board, arch="x86_64"):
                    add([train_row(work, board, "x86_64", args.work_dir, broker.url)])
            if (aarch64 and not WORKLOADS[work].get("x86_only")
                    and not have(kind="train", workload=work, arch="aarch64")):
                add([train_row(work, "rpi4", "aarch64", args.work_dir, broker.url)])
    args.out.with_suffix(".md").write_text(table(doc))


if __name__ == "__main__":
    main()
