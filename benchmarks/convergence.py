"""Accuracy at convergence: HT (full model and exit) vs split learning vs end-to-end training.

HT-EE's second claim is a negligible accuracy drop against end-to-end training. Every run
here is what a user runs: a broker (mosquitto on 127.0.0.1), a cloud trainer and an edge
runtime as separate processes; in ``ht`` the edge trains its exported ExecuTorch program
(default lowering), in ``split`` the edge runs eager torch (the exported program cannot
take the cloud's gradient), in ``cloud`` (end-to-end training of the whole network) the
edge uploads the images and the cloud trains everything. Same network, same data, same
augmentation (random crop and flip, on the edge), same SGD and the same per-batch cosine
learning-rate schedule on both sides (``edge-runtime train --lr-schedule cosine``; the
cloud follows the edge's announced schedule), three seeds (initial weights, data subset,
order and augmentation draws).

The setting is sized for a 2-core CPU: ``vgg11_quarter`` (VGG-11 with BatchNorm at a
quarter width, 9.9 M multiply-adds per image), cut after ``stage2`` (2 KB of int8 per
sample), ``--samples`` training images of CIFAR-10 (JPEG copy) for ``--epochs`` epochs,
scored on the 10,000 test images after every epoch (the cloud's evaluation when the
edge's epoch weights arrive) and at the end.

    python benchmarks/convergence.py                  # the committed setting; resumes
    python benchmarks/convergence.py --report-only    # tables and plot from the results
    python benchmarks/convergence.py --quick          # smallcnn on digits, a smoke run
    python benchmarks/convergence.py --variant pool2 --seeds 0   # one of VARIANTS, HT only

A variant changes one thing of HT's edge (``VARIANTS``: the levers the local-learning
literature names for layers trained by an auxiliary loss alone: the exit head's capacity,
the spatial information it keeps, where to cut) and is compared with the same seed's
end-to-end run; its rows are stored beside the base runs (``"variant"``).

Results go to ``benchmarks/results/convergence.json`` (one row per finished run, written
as each finishes: an interrupted sweep loses only the run in progress and continues with
the next one on the next start), ``convergence.md`` and ``convergence.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from toolkit.core.errors import HiertrainError  # noqa: E402
from toolkit.lab.launch import ProcessGroup, start_cloud  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
RUN_TIMEOUT_S = 4 * 3600.0
MODES = ("ht", "cloud", "split")  # cloud = end-to-end training of the whole network
COLORS = {"ht": "tab:blue", "split": "tab:orange", "cloud": "tab:green"}  # every plot's


@dataclass(frozen=True)
class Setting:
    model: str = "vgg11_quarter"
    split: str = "stage2"
    data: str = "cifar10"  # "cifar10": the local copy (toolkit's shared_cifar10); or a path
    samples: int = 20000
    epochs: int = 15
    batch: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: str = "flip,crop"
    eval_limit: int = 10000
    seeds: tuple[int, ...] = (0, 1, 2)
    modes: tuple[str, ...] = MODES
    name: str = "convergence"
    exit_channels: int | None = None  # None: the model's
    # global pooling: the exit head when these runs began; the "pool2" variant is the
    # export's default today (DEFAULT_HEAD), adopted because of them
    exit_pool: int = 1
    variant: str = ""  # "": the base setting; else a key of VARIANTS (HT runs only)

    def runs(self) -> list[tuple[str, int]]:
        """Seed by seed, so that every finished seed is a complete comparison."""
        return [(m, s) for s in self.seeds for m in self.modes]

    def run_name(self, mode: str, seed: int) -> str:
        return f"{mode}+{self.variant}-s{seed}" if self.variant else f"{mode}-s{seed}"


# HT's levers against its gap to end-to-end; each changes only what trains the edge
VARIANTS: dict[str, dict[str, Any]] = {
    "exit128": {"exit_channels": 128},  # capacity: a 4x wider exit convolution
    "pool2": {"exit_pool": 2},  # the exit keeps a 2x2 grid instead of global pooling
    "stage1": {"split": "stage1"},  # cut earlier: fewer layers trained by the exit alone
}


DEFAULT_HEAD = "pool2"  # the variant whose exit head ``toolkit export`` now makes by default


def variant_of(setting: Setting, name: str) -> Setting:
    if name not in VARIANTS:
        raise HiertrainError(f"unknown variant {name!r}; choose one of: {', '.join(VARIANTS)}")
    return replace(setting, variant=name, modes=("ht",), **VARIANTS[name])


QUICK = Setting(model="smallcnn", split="block1", data="digits", samples=512, epochs=2,
                batch=32, eval_limit=300, seeds=(0,), name="convergence_quick")


def data_source(setting: Setting) -> tuple[str, tuple[int, int, int], tuple, tuple, str]:
    from toolkit.core.data.datasets import digits_stats, load_dataset, shared_cifar10
    from toolkit.core.models import CIFAR_MEAN, CIFAR_STD

    if setting.data == "digits":
        mean, std = digits_stats()
        return "digits", (1, 32, 32), mean, std, "scikit-learn digits (upscaled to 32x32)"
    path = shared_cifar10() if setting.data == "cifar10" else Path(setting.data)
    if path is None:
        raise HiertrainError("no CIFAR-10 copy ($HIERTRAIN_CIFAR10 or ../shared/data/"
                             "cifar10.npz); pass --data PATH, or --quick for digits")
    name = load_dataset(str(path), "test", limit=8, input_shape=(3, 32, 32)).name
    return str(path), (3, 32, 32), CIFAR_MEAN, CIFAR_STD, name


def model_cost(setting: Setting, shape: tuple[int, int, int]) -> dict[str, Any]:
    """Multiply-adds per image of the whole network and of the edge segment (measured by
    torch's FLOP counter on the model itself)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from toolkit.core.models import build_model

    model = build_model(setting.model, input_shape=shape).eval()
    names = list(dict(model.named_children()))
    edge = torch.nn.Sequential(*[getattr(model, n) for n in names[:names.index(setting.split) + 1]])
    out = {}
    for key, module in (("macs_per_image", model), ("edge_macs_per_image", edge)):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            module(torch.zeros(1, *shape))
        out[key] = counter.get_total_flops() // 2
    out["parameters"] = sum(p.numel() for p in model.parameters())
    return out


def export(setting: Setting, seed: int, shape, mean, std, work: Path) -> Path:
    """The run's artifacts (initial weights from ``seed``), exported once per seed with
    the default lowering and the export's parity gate, as a user would."""
    from toolkit.build.export import ExportConfig, OptimizerConfig, export_artifacts
    from toolkit.core.models import get_spec
    from toolkit.core.models.exits import ExitHeadConfig

    tag = f"-{setting.variant}" if setting.variant else ""
    out = work / "artifacts" / f"{setting.model}-{setting.split}{tag}-seed{seed}"
    if (out / "manifest.json").is_file():
        return out
    print(f"exporting {out.name} ...", file=sys.stderr, flush=True)
    export_artifacts(ExportConfig(
        model=setting.model, split=setting.split, out=out, input_shape=shape, mean=mean,
        std=std, batch=setting.batch, seed=seed, force=True,
        exit=ExitHeadConfig(channels=setting.exit_channels or get_spec(setting.model).exit_channels,
                            pool=setting.exit_pool),
        optimizer=OptimizerConfig(lr=setting.lr, momentum=setting.momentum,
                                  weight_decay=setting.weight_decay)))
    return out


def run_one(setting: Setting, mode: str, seed: int, artifacts: Path, source: str, url: str,
            work: Path) -> dict[str, Any]:
    run_dir = work / setting.run_name(mode, seed)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    run_id = f"c{int(time.time() * 1000) % 10**10}"
    cloud = ["cloud_trainer", "--artifacts", str(artifacts), "--broker", url,
             "--run-dir", str(run_dir / "cloud"), "--run-id", run_id, "--device-ids", "edge-0",
             "--mode", mode, "--threads", "1", "--quiet", "--eval-data", source,
             "--eval-limit", str(setting.eval_limit), "--idle-timeout", "3600",
             "--no-tensorboard"]
    edge = ["edge_runtime", "train", "--artifacts", str(artifacts), "--broker", url,
            "--device-id", "edge-0", "--run-id", run_id, "--mode", mode, "--data", source,
            "--epochs", str(setting.epochs), "--limit", str(setting.samples),
            "--seed", str(seed), "--augment", setting.augment,
            "--lr-schedule", setting.schedule, "--threads", "1", "--quiet",
            "--state-dir", str(run_dir), "--report", str(run_dir / "edge.json")]
    t0 = time.monotonic()
    with ProcessGroup(run_dir) as group:
        start_cloud(group, cloud, url, run_id, timeout=300)
        group.start("edge", edge)
        group.wait_exit(["edge", "cloud"], RUN_TIMEOUT_S)
    report = json.loads((run_dir / "edge.json").read_text())
    summary = json.loads((run_dir / "cloud" / "cloud_summary.json").read_text())
    evals = [json.loads(line) for line in (run_dir / "cloud" / "metrics.jsonl").read_text()
             .splitlines() if '"eval"' in line]
    per_epoch = report["samples_published"] // setting.epochs // setting.batch
    # x: the cloud's own progress (batches it trained, in epochs) when it scored the model
    curve = [{"epochs_trained": round(e["batches_trained"] / per_epoch, 3),
              "edge_epoch": e.get("edge_epoch"), "batches_trained": e["batches_trained"],
              "full_accuracy": e["full_accuracy"], "exit_accuracy": e.get("exit_accuracy"),
              "trigger": e.get("trigger")} for e in evals]
    return {
        "run": setting.run_name(mode, seed), "mode": mode, "seed": seed,
        **({"variant": setting.variant, "variant_setting": VARIANTS[setting.variant]}
           if setting.variant else {}),
        "full_accuracy": summary["full_accuracy"], "exit_accuracy": summary["exit_accuracy"],
        "test_samples": summary["eval_samples"], "eval_data": summary["eval_data"],
        "samples_trained": summary["samples_trained"],
        "edge_backend": report["backend"], "epochs": setting.epochs,
        "edge_epoch_s": [h["seconds"] for h in report["history"]],
        "train_exit_accuracy": [h.get("exit_accuracy") for h in report["history"]],
        "wall_s": round(time.monotonic() - t0, 1), "curve": curve,
        "edge_cmd": "python -m " + " ".join(edge), "finished": time.time(),
    }


# ------------------------------------------------------------------------------ output


def load_rows(path: Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text())["runs"] if path.is_file() else []


def write_rows(path: Path, setting: Setting, meta: dict[str, Any], rows: list[dict]) -> None:
    doc = {"setting": asdict(setting), **meta, "runs": rows,
           "command": "python benchmarks/convergence.py"
                      + (" --quick" if setting.name.endswith("quick") else "")}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)


def _spread(vals: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(vals), "values": vals,
            "std": statistics.stdev(vals) if len(vals) > 1 else None}


def _entry(rs: list[dict[str, Any]]) -> dict[str, Any]:
    entry: dict[str, Any] = {"seeds": [r["seed"] for r in rs]}
    for key in ("full_accuracy", "exit_accuracy"):
        vals = [r[key] for r in rs if r.get(key) is not None]
        if vals:
            entry[key] = _spread(vals)
    return entry


def _gap_to_end_to_end(ht: list[dict[str, Any]], base: list[dict[str, Any]]
                       ) -> dict[str, Any] | None:
    """HT's full model minus end-to-end, paired by seed (same initial weights, data, draws)."""
    gaps = [h["full_accuracy"] - c["full_accuracy"] for h in ht for c in base
            if c["mode"] == "cloud" and c["seed"] == h["seed"]]
    return _spread(gaps) if gaps else None


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per mode: mean, sample std and the per-seed values of the final accuracies; then
    per HT variant the same, each with its gap to the same seeds' end-to-end runs."""
    out: dict[str, dict[str, Any]] = {}
    base = [r for r in rows if not r.get("variant")]
    for mode in MODES:
        rs = sorted((r for r in base if r["mode"] == mode), key=lambda r: r["seed"])
        if rs:
            out[mode] = _entry(rs)
    gap = _gap_to_end_to_end([r for r in base if r["mode"] == "ht"], base)
    if gap:
        out["ht_minus_end_to_end"] = gap
    variants = {}
    for name in sorted({r["variant"] for r in rows if r.get("variant")}):
        rs = sorted((r for r in rows if r.get("variant") == name), key=lambda r: r["seed"])
        variants[name] = {**_entry(rs), "setting": rs[0]["variant_setting"],
                          "minus_end_to_end": _gap_to_end_to_end(rs, base)}
    if variants:
        out["variants"] = variants
    return out


def markdown(setting: Setting, meta: dict[str, Any], stats: dict[str, Any]) -> str:
    def pct(d: dict | None) -> str:
        if not d:
            return "-"
        sd = "" if d["std"] is None else f" ± {d['std'] * 100:.2f}"
        return f"{d['mean'] * 100:.2f}{sd} ({', '.join(f'{v * 100:.2f}' for v in d['values'])})"

    label = {"ht": "HT, exit with global pooling (exit_pool=1)", "split": "split learning",
             "cloud": "end-to-end (whole network in the cloud)"}
    lines = [f"{meta['data_name']}, {setting.model} cut after {setting.split} "
             f"({meta['cost']['macs_per_image'] / 1e6:.1f} M multiply-adds per image, "
             f"{meta['cost']['edge_macs_per_image'] / 1e6:.2f} M on the edge), "
             f"{setting.samples} training images x {setting.epochs} epochs, batch "
             f"{setting.batch}, SGD lr {setting.lr} momentum {setting.momentum} weight decay "
             f"{setting.weight_decay}, {setting.schedule} schedule, augmentation "
             f"{setting.augment}; accuracy on {setting.eval_limit} test images, percent, "
             "mean ± sample std over seeds (per-seed values).", "",
             "| mode | seeds | full model | early exit |", "|---|---|---|---|"]
    for mode in MODES:
        if mode in stats:
            s = stats[mode]
            lines.append(f"| {label[mode]} | {len(s['seeds'])} | {pct(s.get('full_accuracy'))} "
                         f"| {pct(s.get('exit_accuracy'))} |")
    if "ht_minus_end_to_end" in stats:
        lines += ["", f"HT's full model minus end-to-end, paired by seed: "
                      f"{pct(stats['ht_minus_end_to_end'])} points."]
    if "variants" in stats:
        lines += ["", "HT variants (one change each to what trains the edge; gap to the same "
                      "seeds' end-to-end runs):", "",
                  "| variant | change | seeds | full model | early exit | minus end-to-end |",
                  "|---|---|---|---|---|---|"]
        for name, v in stats["variants"].items():
            change = ", ".join(f"{k}={val}" for k, val in v["setting"].items())
            if name == DEFAULT_HEAD:
                change += " (the export's default head)"
            lines.append(f"| {name} | {change} | {len(v['seeds'])} "
                         f"| {pct(v.get('full_accuracy'))} | {pct(v.get('exit_accuracy'))} "
                         f"| {pct(v.get('minus_end_to_end'))} |")
    return "\n".join(lines) + "\n"


def _curves(ax, rows: list[dict[str, Any]], colors: dict[str, str], exits: bool) -> None:
    """Every run's test curve (one line per seed), coloured by mode or variant."""
    labelled: set[str] = set()
    for r in sorted(rows, key=lambda r: (r["mode"], r.get("variant", ""), r["seed"])):
        key = r["mode"] + (f"+{r['variant']}" if r.get("variant") else "")
        full = sorted((c["epochs_trained"], c["full_accuracy"]) for c in r["curve"])
        ex = sorted((c["epochs_trained"], c["exit_accuracy"]) for c in r["curve"]
                    if c.get("exit_accuracy") is not None)
        first = key not in labelled
        labelled.add(key)
        if full:
            ax.plot(*zip(*full, strict=True), color=colors[key], alpha=0.8, marker=".",
                    label=f"{key} full" if first else None)
        if ex and exits:
            ax.plot(*zip(*ex, strict=True), color=colors[key], alpha=0.6, ls="--",
                    label=f"{key} exit" if first else None)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Left: the three modes (base setting); right, when there are variants: HT's exit
    heads and cuts against end-to-end training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = [r for r in rows if not r.get("variant")]
    variants = [r for r in rows if r.get("variant")]
    colors = dict(COLORS)
    extra = iter(["tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:cyan"])
    for name in sorted({r["variant"] for r in variants}, key=lambda v: v != DEFAULT_HEAD):
        colors[f"ht+{name}"] = next(extra, "tab:gray")
    panels = [(base, "the three modes", True)]
    if variants:
        panels.append(([r for r in base if r["mode"] in ("ht", "cloud")] + variants,
                       "HT variants (full model) vs end-to-end", False))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False,
                             sharey=True)
    for ax, (rs, sub, exits) in zip(axes[0], panels, strict=True):
        _curves(ax, rs, colors, exits)
        ax.set(xlabel="epochs trained by the cloud", title=sub)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    axes[0][0].set_ylabel("test accuracy")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(setting: Setting, meta: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    stats = summarize(rows)
    doc = json.loads((RESULTS / f"{setting.name}.json").read_text())
    doc["summary"] = stats
    (RESULTS / f"{setting.name}.json").write_text(json.dumps(doc, indent=1) + "\n")
    (RESULTS / f"{setting.name}.md").write_text(markdown(setting, meta, stats))
    if rows:
        plot(rows, RESULTS / f"{setting.name}.png",
             f"{setting.model}/{setting.split}, {setting.samples} x {setting.epochs} epochs")
    print(markdown(setting, meta, stats))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smallcnn on digits, one seed")
    ap.add_argument("--report-only", action="store_true", help="run nothing")
    ap.add_argument("--fresh", action="store_true", help="forget earlier results and rerun all")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    ap.add_argument("--modes", default=None, help="comma-separated modes (default all)")
    ap.add_argument("--variant", default=None, choices=sorted(VARIANTS),
                    help="run HT with one change (VARIANTS) instead of the base setting; "
                         "compared with the same seeds' end-to-end runs")
    ap.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "convergence")
    args = ap.parse_args(argv)
    setting = QUICK if args.quick else Setting()
    if args.seeds:
        setting = Setting(**{**asdict(setting),
                             "seeds": tuple(int(s) for s in args.seeds.split(","))})
    if args.modes:
        setting = Setting(**{**asdict(setting), "modes": tuple(args.modes.split(","))})
    source, shape, mean, std, data_name = data_source(setting)
    meta = {"data_name": data_name, "cost": model_cost(setting, shape)}
    base_setting = setting  # the file's header describes the base runs
    if args.variant:
        setting = variant_of(setting, args.variant)
    path = RESULTS / f"{setting.name}.json"
    rows = [] if args.fresh else load_rows(path)
    if args.report_only:
        report(base_setting, meta, rows)
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    work = args.work / setting.name
    work.mkdir(parents=True, exist_ok=True)
    done = {r["run"] for r in rows}
    todo = [(m, s) for m, s in setting.runs() if setting.run_name(m, s) not in done]
    print(f"{len(done)} run(s) done, {len(todo)} to go; work dir {work}", file=sys.stderr)
    from toolkit.lab.broker import local_broker

    with local_broker() as broker:
        for i, (mode, seed) in enumerate(todo, 1):
            artifacts = export(setting, seed, shape, mean, std, work)
            t = time.monotonic()
            print(f"[{i}/{len(todo)}] {setting.run_name(mode, seed)}: {setting.samples} x "
                  f"{setting.epochs} "
                  "epochs ...", file=sys.stderr, flush=True)
            row = run_one(setting, mode, seed, artifacts, source, broker.url, work)
            rows.append(row)
            write_rows(path, base_setting, meta, rows)  # nothing lost if a later run fails
            ex = row["exit_accuracy"]
            print(f"    full {row['full_accuracy']:.4f}, exit "
                  f"{'-' if ex is None else f'{ex:.4f}'} ({time.monotonic() - t:.0f} s)",
                  file=sys.stderr, flush=True)
    write_rows(path, base_setting, meta, rows)
    report(base_setting, meta, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
