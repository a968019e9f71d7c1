"""Soak: many random faults during real training runs, checked against the seq ledger.

Each round is one real run (cloud trainer and edge runtime as processes, mosquitto with
persistence, the edge through a TCP proxy paced like a slow uplink: ``toolkit/lab/faults.py``)
during which, every few seconds, one random fault is injected and repaired: SIGKILL and
restart of the broker, of the cloud trainer or of the edge (``--resume``), or the edge's
link cut for a few seconds. After the run the cloud's checkpointed ledger must hold every
seq the edge produced exactly once, and the full accuracy is compared with an
undisturbed run of the same configuration (own broker, same pacing, run alongside the
first round).

    python benchmarks/faults_soak.py            # -> benchmarks/results/faults_soak.json
    python benchmarks/faults_soak.py --rounds 1 --epochs 2   # a short look
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from toolkit.build.export import ExportConfig, export_artifacts
from toolkit.lab.faults import Broker, FaultError, Run

ROOT = Path(__file__).resolve().parents[1]

FAULTS = ("broker", "cloud", "edge", "link")
RATE = 30_000  # proxy bytes/s: ~7 batches/s of 16 digits (int8 cut, ~4.3 kB per batch)


def _export(tmp: Path) -> Path:
    out = tmp / "art"
    export_artifacts(ExportConfig(model="smallcnn", out=out, input_shape=(1, 8, 8),
                                  mean=(0.3,), std=(0.37,), batch=16, board="rpi4",
                                  verify=False))
    return out


def _inject(run: Run, fault: str, rng: random.Random) -> bool:
    """One fault and its repair; False when it no longer applies (that side finished)."""
    if fault == "edge":
        if not run.running("edge"):
            return False
        run.crash_edge(rng.uniform(0.5, 3.0))
    elif fault == "cloud":
        if not run.running("cloud"):
            return False
        run.crash_cloud(rng.uniform(0.5, 3.0))
    elif fault == "broker":
        run.crash_broker(rng.uniform(0.5, 4.0))
    else:
        run.drop_link(rng.uniform(1.0, 6.0))
    return True


def _round(work: Path, artifacts: Path, index: int, epochs: int, rng: random.Random,
           gap: tuple[float, float], log: list[dict[str, Any]]) -> dict[str, Any]:
    broker = Broker(work / f"db-{index}")
    run = Run(work / f"round-{index}", artifacts, broker, epochs=epochs, rate=RATE,
              run=f"soak{index}")
    t0 = time.monotonic()
    try:
        run.start_cloud()
        run.start_edge()
        run.wait_until(lambda: run.edge_seq() >= 5, 180, "the edge's first checkpoint")
        while True:
            time.sleep(rng.uniform(*gap))
            if "cloud" in run.group.procs and not run.running("cloud"):
                break  # the cloud finished: the run is over
            fault = rng.choice(FAULTS)
            at = {"t": round(time.monotonic() - t0, 1), "fault": fault,
                  "edge_seq": run.edge_seq(), "cloud_trained": run.cloud_trained()}
            if _inject(run, fault, rng):
                log.append({"round": index, **at})
                print(f"round {index} t={at['t']:6.1f}s {fault:6s} edge seq {at['edge_seq']:4d}"
                      f" cloud ckpt {at['cloud_trained']:4d}", flush=True)
            if "edge" in run.group.procs and run.group.returncode("edge") not in (None, 0):
                raise FaultError(f"the edge failed:\n{run.group.tail('edge')}")
        res = run.finish(300)
    finally:
        run.close()
        broker.stop()
    return _row(res, run, epochs, time.monotonic() - t0)


def _row(res: dict[str, Any], run: Run, epochs: int, wall: float) -> dict[str, Any]:
    cloud, edge, ledger = res["cloud"], res["edge"], res["ledger"]
    produced = edge["batches_published"]
    trained = ledger["trained"] or {"low": 0, "above": []}
    return {
        "epochs": epochs,
        "faults": dict(run.kills),
        "batches_produced": produced,
        "batches_trained": ledger["batches_trained"],
        "ledger": trained,
        "every_seq_trained_once": (trained == {"low": produced, "above": []}
                                   and ledger["batches_trained"] == produced),
        "duplicates_dropped": ledger["duplicates"],
        "complete": cloud["complete"],
        "full_accuracy": cloud["full_accuracy"],
        "exit_accuracy": edge["exit_accuracy"],
        "edge_restarts": run.edge_starts - 1,
        "edge_last_process": {k: edge["delivery"][k] for k in (
            "resumed", "confirmed", "resent", "rewinds", "replayed_not_resent",
            "spool_full_waits", "spool_peak_bytes", "spool_bytes_max", "spool_pending")},
        "wall_s": round(wall, 1),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=4, help="epochs of 89 batches per round")
    ap.add_argument("--gap", type=float, nargs=2, default=(4.0, 10.0), metavar=("MIN", "MAX"),
                    help="seconds between faults, uniform (default 4 10)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/faults_soak.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="faults-soak-") as tmp_s:
        tmp = Path(tmp_s)
        artifacts = _export(tmp)
        ref_broker = Broker(tmp / "ref-db")
        ref = Run(tmp / "ref", artifacts, ref_broker, epochs=args.epochs, rate=RATE, run="ref")
        ref.start_cloud()
        ref.start_edge()
        log: list[dict[str, Any]] = []
        rounds = []
        try:
            for i in range(args.rounds):
                rounds.append(_round(tmp, artifacts, i, args.epochs, rng, tuple(args.gap), log))
                r = rounds[-1]
                print(f"round {i}: {r['faults']}, {r['batches_produced']} produced, "
                      f"{r['batches_trained']} trained, {r['duplicates_dropped']} duplicates "
                      f"dropped, once each: {r['every_seq_trained_once']}, accuracy "
                      f"{r['full_accuracy']:.3f}", flush=True)
            base = _row(ref.finish(300), ref, args.epochs, 0.0)
        finally:
            ref.close()
            ref_broker.stop()
    accs = [r["full_accuracy"] for r in rounds]
    totals = {f: sum(r["faults"][f] for r in rounds) for f in FAULTS}
    result = {
        "what": "random SIGKILL+restart of mosquitto / cloud trainer / edge (--resume) and "
                "link cuts during real runs; ledger and accuracy vs an undisturbed run",
        "config": {"model": "smallcnn", "data": "sklearn digits 8x8, 1437 train / 360 test",
                   "batch": 16, "epochs_per_round": args.epochs, "rounds": args.rounds,
                   "fault_gap_s": list(args.gap), "proxy_bytes_per_s": RATE,
                   "edge_spool_mb": 0.1, "checkpoint_every": 10, "seed": args.seed,
                   "backend": "torch", "broker": "mosquitto (persistence on)"},
        "faults_total": totals,
        "cycles": sum(totals.values()),
        "batches_produced": sum(r["batches_produced"] for r in rounds),
        "batches_trained": sum(r["batches_trained"] for r in rounds),
        "duplicates_dropped": sum(r["duplicates_dropped"] for r in rounds),
        "every_round_trained_each_seq_once": all(r["every_seq_trained_once"] for r in rounds),
        "undisturbed_full_accuracy": base["full_accuracy"],
        "faulted_full_accuracy": {"min": min(accs), "max": max(accs),
                                  "mean": sum(accs) / len(accs)},
        "max_abs_accuracy_gap": max(abs(a - base["full_accuracy"]) for a in accs),
        "rounds": rounds,
        "undisturbed": base,
        "fault_log": log,
        "wall_s": round(time.monotonic() - t0, 1),
        "machine": {"python": platform.python_version(), "platform": platform.platform(),
                    "note": "2 cores shared with other jobs"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['cycles']} faults {totals}; every seq trained once: "
          f"{result['every_round_trained_each_seq_once']}; accuracy {min(accs):.3f}.."
          f"{max(accs):.3f} vs undisturbed {base['full_accuracy']:.3f}; wrote {out}")
    return 0 if result["every_round_trained_each_seq_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
