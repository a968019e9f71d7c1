"""Time to accuracy on slow uplinks: wall time each mode needs to reach a target test accuracy.

Two measured inputs, combined, nothing else assumed:

1. **Epochs to target**, from the convergence runs (``benchmarks/convergence.py``,
   ``results/convergence.json``): per mode, the test-accuracy curve averaged over seeds,
   and the first point where it reaches the target, ``--target`` (default 0.95) times
   end-to-end training's final accuracy (its mean over seeds).
2. **Time per epoch on the shaped link**, from ``toolkit bench`` runtime runs of the same
   model, split, batch and modes (ht on the exported ExecuTorch program) at uplinks of 0.5,
   2 and 10 Mbit/s with faster downlinks (0.5/5, 2/20, 10/50), three repeats each: the
   mean seconds per sample of ``--samples`` samples, times the convergence setting's
   training images per epoch. That extrapolation (a run of 1,024 samples standing for an
   epoch of 20,000) is the one shortcut here: a run's per-sample time is flat after its
   first batches, and an epoch at 0.5 Mbit/s would take 15-25 minutes per mode and repeat.

    python benchmarks/time_to_accuracy.py             # runs the bench (resumes), then reports
    python benchmarks/time_to_accuracy.py --report-only

Writes ``results/time_to_accuracy.json``, ``.md`` and ``.png`` (accuracy against wall time,
one panel per link); the bench's own rows are in ``results/tta/``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.convergence import COLORS, DEFAULT_HEAD, MODES, RESULTS, Setting  # noqa: E402

LINKS = "0.5/5,2/20,10/50"
LABELS = {"ht": "HT", "split": "split learning", "cloud": "end-to-end (images uploaded)"}
BENCH_OUT = RESULTS / "tta"


def bench_argv(setting: Setting, samples: int, repeats: int) -> list[str]:
    return ["bench", "--models", setting.model, "--splits", f"{setting.model}={setting.split}",
            "--links", LINKS, "--modes", ",".join(MODES), "--split-grad-bits", "32",
            "--schedules", "runtime", "--repeats", str(repeats), "--samples", str(samples),
            "--max-link-s", "100000", "--batch", str(setting.batch), "--lr", str(setting.lr),
            "--latency-ms", "20", "--eval-limit", "200", "--out", str(BENCH_OUT), "--resume"]


def epoch_seconds(rows: list[dict[str, Any]], per_epoch: int) -> dict[tuple[str, str], dict]:
    """(mode, link label) -> mean/std seconds per epoch, from the per-sample runtime."""
    out: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r.get("schedule") == "runtime" and r.get("grad_codec") in (None, "float32"):
            out.setdefault((r["mode"], r["link"]), []).append(r["wall_s"] / r["samples"]
                                                              * per_epoch)
    return {k: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else None,
                "repeats": len(v)} for k, v in out.items()}


def mode_runs(runs: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """A mode's convergence runs; HT's are those with the exit head ``toolkit export``
    makes by default (the ``DEFAULT_HEAD`` variant once it has runs), the head the bench's
    HT runs train."""
    if mode == "ht" and any(r.get("variant") == DEFAULT_HEAD for r in runs):
        return [r for r in runs if r.get("variant") == DEFAULT_HEAD]
    return [r for r in runs if r["mode"] == mode and not r.get("variant")]


def mean_curve(runs: list[dict[str, Any]], mode: str) -> list[tuple[float, float]]:
    """(epochs trained, mean accuracy over seeds) at each epoch's evaluation."""
    per_seed = [r["curve"] for r in mode_runs(runs, mode)]
    if not per_seed:
        return []
    n = min(len(c) for c in per_seed)
    return [(statistics.fmean(c[i]["epochs_trained"] for c in per_seed),
             statistics.fmean(c[i]["full_accuracy"] for c in per_seed)) for i in range(n)]


def epochs_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """The first evaluation at or above ``target`` (in epochs trained); None if never."""
    return next((e for e, a in curve if a >= target), None)


def report(conv: dict[str, Any], rows: list[dict[str, Any]], target_frac: float) -> dict:
    setting = conv["setting"]
    per_epoch = setting["samples"] // setting["batch"] * setting["batch"]
    runs = conv["runs"]
    e2e = [r["full_accuracy"] for r in runs if r["mode"] == "cloud"]
    if not e2e:
        raise SystemExit("no end-to-end (cloud) run in convergence.json yet")
    target = target_frac * statistics.fmean(e2e)
    secs = epoch_seconds(rows, per_epoch)
    ht_runs = mode_runs(runs, "ht")
    links = sorted({k[1] for k in secs}, key=lambda s: float(s.split("/")[0]))
    table = []
    for link in links:
        for mode in MODES:
            curve = mean_curve(runs, mode)
            ep = epochs_to(curve, target)
            s = secs.get((mode, link))
            table.append({"link": link, "mode": mode, "epochs_to_target": ep,
                          "epoch_s": s, "seeds": len(mode_runs(runs, mode)),
                          "time_to_target_s": None if ep is None or s is None
                          else round(ep * s["mean"], 1)})
    return {"target": target, "target_fraction": target_frac,
            "end_to_end_final_mean": statistics.fmean(e2e), "samples_per_epoch": per_epoch,
            "links": links, "rows": table,
            "ht_exit_head": (ht_runs[0].get("variant") if ht_runs else None)
            or "global pooling (exit_pool=1)",
            "curves": {m: mean_curve(runs, m) for m in MODES},
            "command": "python benchmarks/time_to_accuracy.py"}


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"Target: {doc['target'] * 100:.2f} % test accuracy ({doc['target_fraction']:.0%} "
             f"of end-to-end training's final {doc['end_to_end_final_mean'] * 100:.2f} %); "
             f"an epoch is {doc['samples_per_epoch']} images; HT's curve: exit head "
             f"{doc['ht_exit_head']}.", "",
             "| uplink/downlink Mbit/s | mode | s per epoch (mean ± std, repeats) | epochs to "
             "target | time to target |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        s = r["epoch_s"]
        sd = "" if not s or s["std"] is None else f" ± {s['std']:.0f}"
        es = "-" if not s else f"{s['mean']:.0f}{sd} ({s['repeats']})"
        ep = "not reached" if r["epochs_to_target"] is None else f"{r['epochs_to_target']:.1f}"
        tt = "-" if r["time_to_target_s"] is None else f"{r['time_to_target_s'] / 3600:.2f} h"
        lines.append(f"| {r['link']} | {r['mode']} | {es} | {ep} | {tt} |")
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    links = doc["links"]
    fig, axes = plt.subplots(1, len(links), figsize=(5 * len(links), 4), squeeze=False)
    by = {(r["mode"], r["link"]): r for r in doc["rows"]}
    for ax, link in zip(axes[0], links, strict=True):
        for mode in MODES:
            s = (by.get((mode, link)) or {}).get("epoch_s")
            curve = doc["curves"].get(mode) or []
            if s and curve:
                ax.plot([e * s["mean"] / 3600 for e, _ in curve], [a for _, a in curve],
                        marker=".", color=COLORS[mode], label=LABELS[mode])
        ax.axhline(doc["target"], color="grey", ls=":", label="target")
        ax.set(xlabel="wall time (h)", ylabel="test accuracy", title=f"{link} Mbit/s up/down")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report-only", action="store_true", help="run no bench, report only")
    ap.add_argument("--samples", type=int, default=1024, help="samples per runtime run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target", type=float, default=0.95,
                    help="fraction of end-to-end's final accuracy to reach")
    args = ap.parse_args(argv)
    conv = json.loads((RESULTS / "convergence.json").read_text())
    setting = Setting(**{k: tuple(v) if isinstance(v, list) else v
                         for k, v in conv["setting"].items()})
    if not args.report_only:
        from toolkit.cli import main as toolkit

        rc = toolkit(bench_argv(setting, args.samples, args.repeats))
        if rc:
            return rc
    rows = json.loads((BENCH_OUT / "lowbitrate.json").read_text())
    doc = report(conv, rows, args.target)
    (RESULTS / "time_to_accuracy.json").write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / "time_to_accuracy.md").write_text(markdown(doc))
    plot(doc, RESULTS / "time_to_accuracy.png")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
