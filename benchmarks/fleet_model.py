"""The fleet's model on a non-IID fleet (issue 15): per-device and averaged accuracy, with and
without ``--fleet-average``.

Each run is real processes on this machine: Debian's mosquitto on 127.0.0.1, the
``cloud-trainer`` CLI, and N ``edge-runtime train`` processes on the ExecuTorch backend (the
default), each with a label-skewed shard of one data set (``--shard i/N --shard-skew
dirichlet:0.3``: a robot sees mostly a few classes). Two runs share everything (data, shards,
seeds, epochs) but one flag:

* ``local``: every robot trains its own edge; the cloud trains the shared cloud segment on
  all of their cut activations;
* ``fleet-average``: the same, and at each epoch end the cloud averages the edges
  (sample-weighted, ``cloud-trainer --fleet-average``) and every robot starts its next epoch
  from the average (``edge-runtime train --fleet-average``).

Per run the cloud's summary (``fleet_model``) gives, per device, its own full model (its edge
and the shared cloud segment) on the global test set and on its own label distribution (the
per-class test accuracies weighted by the labels it trained on), and the averaged edge with the
cloud segment on both: the last round's average with ``--fleet-average``, a one-shot average of
the final edges without it.

Data: CIFAR-10 (``../shared/data/cifar10.npz``, a JPEG copy) when present, else, said loudly,
scikit-learn's digits. Model: the small CNN (``--model``), exported once into a cache.
Everything runs under ``nice -n 10`` with one torch thread per process: this machine has two
cores, shared with other benchmarks.

    python benchmarks/fleet_model.py --plot             # both runs -> results/fleet_model.json
    python benchmarks/fleet_model.py --resume --plot    # skip runs already in the file
    python benchmarks/fleet_model.py --quick --out /tmp/fm.json   # digits, 2 devices, smoke

Rows are written as each run finishes; ``--resume`` skips runs whose row is already there
(same settings), otherwise a run replaces its old row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: import the toolkit of this checkout
    sys.path.insert(0, str(REPO))

from benchmarks.fleet import load_rows, save_rows  # noqa: E402  (the fleet benchmark's rows)

RESULTS = REPO / "benchmarks" / "results"
RUN_TIMEOUT_S = 3600.0
CACHE = Path(tempfile.gettempdir()) / "hiertrain-fleet-model-artifacts"
DIGITS_EXPORT = ("--input-shape", "1,8,8", "--mean", "0.3", "--std", "0.37")


@dataclass(frozen=True)
class Spec:
    """One run; every field but ``averaging`` is shared by the two runs of a comparison."""

    averaging: bool
    devices: int
    skew: str
    epochs: int
    limit: int
    model: str
    batch: int
    data: str  # a path, or "digits"
    seed: int = 0

    @property
    def name(self) -> str:
        return "fleet-average" if self.averaging else "local"

    def key(self) -> tuple[Any, ...]:
        return tuple(asdict(self).values())


# --------------------------------------------------------------------------- set-up


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def pick_data(force_digits: bool) -> str:
    """CIFAR-10's shared copy, or digits with a loud warning when it is absent."""
    from toolkit.core.data.datasets import shared_cifar10

    path = None if force_digits else shared_cifar10()
    if path is None:
        if not force_digits:
            print("\n" + "!" * 78 + "\n!! CIFAR-10 not found (../shared/data/cifar10.npz or "
                  "$HIERTRAIN_CIFAR10):\n!! FALLING BACK TO scikit-learn's digits (8x8, "
                  "1,797 images). The figures are NOT CIFAR-10's.\n" + "!" * 78 + "\n",
                  file=sys.stderr, flush=True)
        return "digits"
    return str(path)


def export(model: str, batch: int, data: str, cache: Path) -> Path:
    """The model's artifacts (default lowering, as a board gets them), exported once."""
    tag = "digits" if data == "digits" else "cifar10"
    out = cache / f"{model}-{tag}-b{batch}"
    if (out / "manifest.json").exists():
        return out
    cmd = [sys.executable, "-m", "toolkit", "export", "--model", model, "--batch", str(batch),
           "--out", str(out), "--force", *(DIGITS_EXPORT if data == "digits" else ())]
    print(f"exporting {model} (batch {batch}) into {out} ...", flush=True)
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1800)
    if r.returncode != 0:
        raise SystemExit(f"toolkit export failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return out


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# --------------------------------------------------------------------------- one run


def run_one(spec: Spec, artifacts: Path, work: Path) -> dict[str, Any]:
    """Broker, cloud trainer and ``spec.devices`` edge runtimes as processes; the row."""
    from toolkit.lab.broker import MosquittoBroker
    from toolkit.lab.launch import ProcessGroup, start_cloud

    run_id = f"fm{random.getrandbits(32):08x}"
    data = [] if spec.data == "digits" else ["--data", spec.data]
    # generous bounds: this measures averaging over the whole fleet, not the straggler rule
    # (a round that still ran out of time shows in the row's rounds.history)
    cloud_average = ["--fleet-average", "--fleet-average-wait", "600"] if spec.averaging else []
    average = ["--fleet-average", "--fleet-average-wait", "900"] if spec.averaging else []
    devices = [f"robot-{i}" for i in range(spec.devices)]
    cpu0, t0 = _children_cpu_s(), time.monotonic()
    with MosquittoBroker().start(timeout=10) as broker, ProcessGroup(work, cwd=REPO) as group:
        url = broker.url
        cloud = ["cloud_trainer", "--artifacts", str(artifacts), "--broker", url,
                 "--run-dir", str(work / "cloud"), "--run-id", run_id,
                 "--devices", str(spec.devices), "--threads", "1", "--quiet",
                 "--checkpoint-every", "200", "--idle-timeout", "600", "--no-tensorboard",
                 *(["--eval-data", spec.data] if data else []), *cloud_average]
        start_cloud(group, cloud, url, run_id, timeout=300)
        for i, d in enumerate(devices):
            group.start(d, [
                "edge_runtime", "train", "--artifacts", str(artifacts), "--broker", url,
                "--device-id", d, "--run-id", run_id, "--epochs", str(spec.epochs),
                "--shard", f"{i}/{spec.devices}", "--shard-skew", spec.skew,
                "--limit", str(spec.limit), "--seed", str(spec.seed), "--threads", "1",
                "--state-dir", str(work / d), "--report", str(work / f"{d}.json"), "--quiet",
                *data, *average])
        group.wait_exit([*devices, "cloud"], RUN_TIMEOUT_S)
    wall, cpu = time.monotonic() - t0, _children_cpu_s() - cpu0
    summary = json.loads((work / "cloud" / "cloud_summary.json").read_text())
    edges = {d: json.loads((work / f"{d}.json").read_text()) for d in devices}
    fm = summary["fleet_model"]
    per_device = {}
    for d in devices:
        row, edge = fm["devices"][d], edges[d]
        per_device[d] = {
            "samples_per_epoch": edge["samples_published"] // spec.epochs,
            "label_share": row["label_share"],
            "own_full_accuracy": row["own_full_accuracy"],
            "own_full_accuracy_on_own_labels": row["own_full_accuracy_on_own_labels"],
            "own_exit_accuracy_on_own_labels": row["own_exit_accuracy_on_own_labels"],
            "average_full_accuracy_on_own_labels": row["average_full_accuracy_on_own_labels"],
            "edge_train_s": round(edge["train_s"], 1),
            "fleet_average": edge.get("fleet_average"),
        }
    avg = fm["average"] or {}
    return {
        "status": "ok", "run_id": run_id, "data_name": summary["eval_data"],
        "eval_samples": summary["eval_samples"], "wall_s": round(wall, 1),
        "cpu_s": round(cpu, 1), "batches_trained": summary["batches_trained"],
        "cloud_full_accuracy_latest_edge": summary["full_accuracy"],
        "average": avg, "rounds": fm["rounds"],
        "mean_own_full_accuracy": fm["mean_own_full_accuracy"],
        "mean_own_full_accuracy_on_own_labels": fm["mean_own_full_accuracy_on_own_labels"],
        "average_full_accuracy": avg.get("full_accuracy"),
        "average_mean_full_accuracy_on_device_labels": avg.get(
            "mean_full_accuracy_on_device_labels"),
        "per_device": per_device,
        "bytes_down": summary["bytes_down"], "dropped": summary["dropped"],
    }


# --------------------------------------------------------------------------- output


def row_key(row: dict[str, Any]) -> tuple[Any, ...]:
    return Spec(**row["spec"]).key()


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of docs/fleet.md (ok rows only)."""
    lines = ["| run | per-device full model, global test set: each (mean) | on its own labels "
             "(mean) | averaged edge, global | averaged edge on each device's labels (mean) "
             "| CPU s |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") != "ok":
            continue
        pd = r["per_device"]
        own = " / ".join(_pct(v["own_full_accuracy"]) for v in pd.values())
        kind = (r["average"] or {}).get("kind") or "-"
        lines.append(
            f"| {r['spec_name']} | {own} ({_pct(r['mean_own_full_accuracy'])}) | "
            f"{_pct(r['mean_own_full_accuracy_on_own_labels'])} | "
            f"{_pct(r['average_full_accuracy'])} ({kind}) | "
            f"{_pct(r['average_mean_full_accuracy_on_device_labels'])} | {r['cpu_s']:.0f} |")
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    """Per device: its own full model and the averaged edge, global and on its own labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        return
    devices = list(ok[0]["per_device"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    series = []
    for r in ok:
        avg_kind = (r["average"] or {}).get("kind") or "average"
        series.append((f"{r['spec_name']}: own edge", r, "own"))
        series.append((f"{r['spec_name']}: averaged edge ({avg_kind})", r, "avg"))
    width = 0.8 / len(series)
    for ax, on_own in zip(axes, (False, True), strict=True):
        for j, (label, r, which) in enumerate(series):
            vals = []
            for d in devices:
                v = r["per_device"][d]
                if which == "own":
                    vals.append(v["own_full_accuracy_on_own_labels"] if on_own
                                else v["own_full_accuracy"])
                else:
                    vals.append(v["average_full_accuracy_on_own_labels"] if on_own
                                else r["average_full_accuracy"])
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(devices))]
            ax.bar(xs, [100 * (v or 0) for v in vals], width, label=label)
        ax.set_xticks(range(len(devices)), devices)
        ax.set_title("on each device's own label distribution" if on_own
                     else "on the global test set")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("full-model accuracy (%)")
    axes[1].legend(fontsize=8, loc="lower right")
    s = ok[0]["spec"]
    fig.suptitle(f"{s['model']} on {ok[0]['data_name']}: {s['devices']} robots, "
                 f"--shard-skew {s['skew']}, {s['epochs']} epochs, ExecuTorch edges")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--devices", type=int, default=4, help="robots in the fleet")
    ap.add_argument("--skew", default="dirichlet:0.3",
                    help="--shard-skew of every robot (toolkit.core.data.skew)")
    ap.add_argument("--epochs", type=int, default=10, help="edge epochs per run")
    ap.add_argument("--limit", type=int, default=16000,
                    help="training samples shared out among the robots")
    ap.add_argument("--model", default="smallcnn", help="built-in model to export")
    ap.add_argument("--batch", type=int, default=32, help="training batch (export option)")
    ap.add_argument("--runs", default="local,fleet-average",
                    help="which runs: local, fleet-average or both, comma-separated")
    ap.add_argument("--digits", action="store_true", help="use digits even if CIFAR-10 is there")
    ap.add_argument("--artifacts", type=Path, default=None,
                    help="exported artifacts to use (default: export once into a cache)")
    ap.add_argument("--out", type=Path, default=RESULTS / "fleet_model.json", help="rows JSON")
    ap.add_argument("--resume", action="store_true",
                    help="skip runs whose row (same settings) is already in --out")
    ap.add_argument("--plot", action="store_true", help="write --out's .png")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: digits, 2 robots, 2 epochs (write it with --out /tmp/...)")
    args = ap.parse_args(argv)
    if args.quick:
        args.digits, args.devices, args.epochs, args.limit = True, 2, 2, 1200
        args.batch = 16
    if args.devices < 1 or args.epochs < 1 or args.limit < args.devices * args.batch:
        ap.error("--devices and --epochs must be >= 1 and --limit at least a batch per device")
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    if not names or any(n not in ("local", "fleet-average") for n in names):
        ap.error("--runs takes local and/or fleet-average")
    os.nice(10)  # this machine's cores are shared: every child inherits it
    os.environ["OMP_NUM_THREADS"] = "1"  # and one thread per process (--threads 1 as well)
    data = pick_data(args.digits)
    specs = [Spec(averaging=n == "fleet-average", devices=args.devices, skew=args.skew,
                  epochs=args.epochs, limit=args.limit, model=args.model, batch=args.batch,
                  data=data) for n in names]
    rows = load_rows(args.out)
    done = {row_key(r) for r in rows if r.get("status") == "ok"}
    todo = [s for s in specs if not (args.resume and s.key() in done)]
    if todo:
        artifacts = args.artifacts or export(args.model, args.batch, data, CACHE)
        machine = {"cores": os.cpu_count(), "platform": platform.platform(),
                   "python": platform.python_version(), "loadavg": list(os.getloadavg())}
        command = shlex.join(["python", "benchmarks/fleet_model.py",
                              *(sys.argv[1:] if argv is None else argv)])
        for i, spec in enumerate(todo, 1):
            head = f"[{i}/{len(todo)}] {spec.name}: {spec.devices} robots, {spec.skew}"
            print(f"{head}, {spec.epochs} epochs ...", flush=True)
            row: dict[str, Any] = {"spec": asdict(spec), "spec_name": spec.name,
                                   "command": command, "machine": machine, "time": time.time()}
            with tempfile.TemporaryDirectory(prefix="hiertrain-fleet-model-") as work:
                try:
                    row.update(run_one(spec, artifacts, Path(work)))
                except Exception as exc:  # noqa: BLE001 -- recorded, the next run goes on
                    row.update(status="failed", error=str(exc)[-3000:])
            if row["status"] == "ok":
                print(f"{head}: own full accuracy {_pct(row['mean_own_full_accuracy'])} "
                      f"(on own labels {_pct(row['mean_own_full_accuracy_on_own_labels'])}), "
                      f"averaged edge {_pct(row['average_full_accuracy'])}; "
                      f"{row['wall_s']:.0f} s, {row['cpu_s']:.0f} CPU s", flush=True)
            else:
                print(f"{head}: FAILED: {row['error'][-800:]}", flush=True)
            rows = [r for r in rows if row_key(r) != spec.key()] + [row]
            save_rows(args.out, rows)
    print(table(rows))
    if args.plot:
        plot(rows, args.out.with_suffix(".png"))
        print(f"wrote {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
