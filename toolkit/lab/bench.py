"""``toolkit bench``: hierarchical training against the usual edge-cloud baselines on a slow link.

Each row of the result is one real run: a broker, a cloud trainer and one edge
runtime as separate processes on this machine, the edge's (and, for split
learning, the cloud's) sending side shaped to the link's bit rate. Nothing is
computed from a formula except the ``predicted_s`` column, which is the
runtime model's (``toolkit.plan.runtime_model``) estimate set beside the
measurement.

Two schedules, because the slow-link runs cannot also be long enough to train
to a useful accuracy on a 2-core machine:

* **runtime**: every (model, mode, bit rate), one epoch over ``samples``
  training samples, fewer at the slowest rates so that the slowest mode's link
  time stays under ``max_link_s`` (every mode at one rate sees the same
  samples, so the comparison at that rate is exact);
* **accuracy**: every (model, mode) and every extra codec for ``ht``, on an
  unshaped link, ``accuracy_samples`` x ``accuracy_epochs``: the accuracy
  comparison on the same schedule.

The edge runs the torch backend in all modes: the comparison is about the link
and the pipeline, so every mode gets the same edge compute (the committed runs
predate the XNNPACK training lowering; ExecuTorch on the portable kernels was
~60x slower than eager, see benchmarks/et_speed.py for today's ratio). Each
process gets one thread: the edge stands for the board, the cloud for the
server, and the machine has two cores.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.core.errors import HiertrainError
from toolkit.lab.launch import ProcessGroup, start_cloud

MODES: tuple[str, ...] = ("ht", "split", "cloud")
DEFAULT_SPLITS: dict[str, str] = {"vgg16": "stage2", "resnet18": "layer3", "smallcnn": "block1"}
RUN_TIMEOUT_S = 3600.0

# Sepehri et al. (arXiv 2303.02384), training-runtime reduction of HT-EE against
# the usual edge-cloud (split) training on a low bit-rate link.
PAPER_REDUCTION = {
    ("vgg16", "CIFAR-10"): 0.29, ("resnet18", "CIFAR-10"): 0.61,
    ("vgg16", "Tiny ImageNet"): 0.25, ("resnet18", "Tiny ImageNet"): 0.81,
}


@dataclass(frozen=True)
class BenchConfig:
    out: Path = Path("benchmarks/results")
    work_dir: Path | None = None
    models: tuple[str, ...] = ("vgg16", "resnet18")
    splits: dict[str, str] = field(default_factory=dict)
    modes: tuple[str, ...] = MODES
    rates_mbps: tuple[float, ...] = (0.5, 2.0, 10.0, 50.0)
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
    broker: str = "auto"
    schedules: tuple[str, ...] = ("runtime", "accuracy")
    report_only: bool = False
    """Run nothing: re-derive predictions, tables and plots from ``out/lowbitrate.json``."""
    resume: bool = False
    """Skip runs already in ``out/lowbitrate.json`` (by their ``run`` name)."""
    split_grad_bits: tuple[int, ...] = (32,)
    """Split learning's gradient codes: 32 (float32, classic) and/or 8 (a stronger baseline)."""

    def check(self) -> None:
        from toolkit.core.models import MODELS

        for m in self.models:
            if m not in MODELS:
                raise HiertrainError(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise HiertrainError(f"unknown mode(s) {', '.join(bad)}; use {', '.join(MODES)}")
        if any(r <= 0 for r in self.rates_mbps):
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


@dataclass(frozen=True)
class RunSpec:
    model: str
    split: str
    mode: str
    schedule: str
    link_mbps: float | None
    latency_ms: float
    codec: str
    samples: int
    epochs: int
    grad_bits: int = 32  # split only: float32 gradients (classic) or int8

    @property
    def name(self) -> str:
        rate = "inf" if self.link_mbps is None else f"{self.link_mbps:g}"
        g = "-g8" if self.mode == "split" and self.grad_bits == 8 else ""
        return (f"{self.schedule}-{self.model}-{self.mode}{g}-{rate}M-"
                f"{self.codec.replace('+', '_')}")

    @property
    def key(self) -> str:
        """Mode as the tables name it: split learning with int8 gradients is ``split_g8``."""
        return "split_g8" if self.mode == "split" and self.grad_bits == 8 else self.mode


# ----------------------------------------------------------------------------- data


def _data_source(cfg: BenchConfig) -> tuple[str | None, tuple[int, int, int], tuple, tuple, str]:
    """CIFAR-10 when there is a copy, else digits upscaled, said loudly."""
    from toolkit.core.data.datasets import digits_stats, load_dataset, shared_cifar10
    from toolkit.core.models import CIFAR_MEAN, CIFAR_STD

    source = cfg.data or (str(p) if (p := shared_cifar10()) else None)
    if source in (None, "digits"):
        if source is None:
            print("bench: no CIFAR-10 copy ($HIERTRAIN_CIFAR10 or ../shared/data/cifar10.npz);"
                  " FALLING BACK to scikit-learn digits upscaled to 32x32: figures are not "
                  "comparable with the paper's", file=sys.stderr)
        mean, std = digits_stats()
        return "digits", (1, 32, 32), mean, std, "scikit-learn digits (8x8 upscaled to 32x32)"
    ds = load_dataset(source, "test", limit=8, input_shape=(3, 32, 32))
    return source, (3, 32, 32), CIFAR_MEAN, CIFAR_STD, ds.name


# ----------------------------------------------------------------------------- sizes


def _cut_bytes(model: str, split: str, shape: tuple[int, int, int]) -> tuple[int, int]:
    """(int8, float32) payload bytes per sample at the cut."""
    from toolkit.plan.stats import model_table

    for m in model_table(input_shape=shape):
        if m["name"] == model:
            for s in m["splits"]:
                if s["split"] == split:
                    return s["cut_int8_bytes"], s["cut_float32_bytes"]
    raise HiertrainError(f"model {model} has no split {split!r}")


def runtime_samples(cfg: BenchConfig, rate_mbps: float, up_bytes: int, down_bytes: int) -> int:
    """Samples for the runtime schedule at ``rate_mbps``: the slowest mode's link time bounded.

    Split learning moves ``up_bytes + down_bytes`` per sample, the most of any
    mode; every mode at this rate trains on the same count, rounded down to
    whole batches and never below two.
    """
    per_sample_s = (up_bytes + down_bytes) * 8 / (rate_mbps * 1e6)
    fit = int(cfg.max_link_s / per_sample_s) if per_sample_s > 0 else cfg.samples
    n = min(cfg.samples, fit) // cfg.batch * cfg.batch
    return max(n, 2 * cfg.batch)


# ----------------------------------------------------------------------------- one run


def _broker(cfg: BenchConfig):
    from toolkit.lab.broker import EmbeddedBroker, MosquittoBroker

    if cfg.broker in ("auto", "mosquitto") and (shutil.which("mosquitto")
                                                 or Path("/usr/sbin/mosquitto").exists()):
        return MosquittoBroker()
    if cfg.broker == "mosquitto":
        raise HiertrainError("mosquitto is not installed (apt-get install mosquitto)")
    return EmbeddedBroker()


def _link_args(spec: RunSpec) -> list[str]:
    if spec.link_mbps is None:
        return []
    return ["--link-kbps", f"{spec.link_mbps * 1000:g}", "--link-latency-ms",
            f"{spec.latency_ms:g}"]


def run_one(spec: RunSpec, artifacts: Path, url: str, work: Path, source: str | None,
            cfg: BenchConfig) -> dict[str, Any]:
    """One real run: cloud trainer + one edge runtime as processes; returns their two summaries."""
    run_dir = work / spec.name
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    run_id = f"b{int(time.time() * 1000) % 10**10}"
    data = ["--data", source] if source else []
    with ProcessGroup(run_dir) as group:
        cloud = ["cloud_trainer", "--artifacts", str(artifacts), "--broker", url,
                 "--run-dir", str(run_dir / "cloud"), "--run-id", run_id, "--devices", "1",
                 "--threads", "1", "--quiet", "--mode", spec.mode,
                 "--eval-limit", str(cfg.eval_limit), "--checkpoint-every", "1000000",
                 # A slow link can be silent for minutes while the edge uploads its
                 # weights at the end; the run's own deadline bounds it instead.
                 "--idle-timeout", f"{RUN_TIMEOUT_S:g}",
                 *_link_args(spec)]
        if spec.mode == "split":
            cloud += ["--grad-bits", str(spec.grad_bits)]
        if source:
            cloud += ["--eval-data", source]
        start_cloud(group, cloud, url, run_id, timeout=180)
        group.start("edge", [
            "edge_runtime", "train", "--artifacts", str(artifacts), "--broker", url,
            "--device-id", "edge-0", "--run-id", run_id, "--epochs", str(spec.epochs),
            "--backend", "torch", "--limit", str(spec.samples), "--mode", spec.mode,
            "--codec", spec.codec, "--report", str(run_dir / "edge.json"), "--threads", "1",
            "--state-dir", str(run_dir), "--quiet", *data, *_link_args(spec)])
        group.wait_exit(["edge", "cloud"], RUN_TIMEOUT_S)
    edge = json.loads((run_dir / "edge.json").read_text())
    cloud_summary = json.loads((run_dir / "cloud" / "cloud_summary.json").read_text())
    return {"edge": edge, "cloud": cloud_summary}


def _row(spec: RunSpec, res: dict[str, Any], data_name: str, float32_bytes: int
         ) -> dict[str, Any]:
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
    return {
        "run": spec.name, "model": spec.model, "split": spec.split, "mode": spec.mode,
        "grad_codec": ({32: "float32", 8: "int8"}[spec.grad_bits] if spec.mode == "split"
                       else None),
        "schedule": spec.schedule, "link_mbps": spec.link_mbps,
        "latency_ms": spec.latency_ms if spec.link_mbps is not None else 0.0,
        "codec": spec.codec if spec.mode != "cloud" else "uint8-images",
        "samples": samples, "epochs": spec.epochs, "wall_s": round(end - start, 3),
        "bytes_up": up, "bytes_down": down, "bytes_up_total": edge["bytes_up"],
        "bytes_per_sample_up": round(up / max(samples, 1), 1),
        "float32_cut_bytes_per_sample": float32_bytes,
        "full_accuracy": cloud["full_accuracy"],
        "exit_accuracy": cloud.get("exit_accuracy") if spec.mode == "ht" else None,
        "batches_trained": cloud["batches_trained"],
        "edge_train_s": edge.get("train_s"), "data": data_name, "edge_backend": "torch",
    }


# ----------------------------------------------------------------------------- the sweep


def plan_runs(cfg: BenchConfig, shape: tuple[int, int, int]) -> list[RunSpec]:
    """Every run of the sweep, in the order they run.

    Runtime runs come first, slowest links first: those are bound by the
    link, not by the CPU, so they are the least disturbed by anything else
    running on the machine. The compute-bound fast-link runs follow, then the
    accuracy runs, whose figures do not depend on timing at all.
    """
    runtime: list[RunSpec] = []
    accuracy: list[RunSpec] = []
    for model in cfg.models:
        split = cfg.splits.get(model) or DEFAULT_SPLITS.get(model)
        if split is None:
            from toolkit.core.models import get_spec

            split = get_spec(model).default_split
        int8, f32 = _cut_bytes(model, split, shape)
        if "runtime" in cfg.schedules:
            for rate in cfg.rates_mbps:
                n = runtime_samples(cfg, rate, int8, f32)
                for mode in cfg.modes:
                    for g in (cfg.split_grad_bits if mode == "split" else (32,)):
                        runtime.append(RunSpec(model, split, mode, "runtime", rate,
                                               cfg.latency_ms, cfg.codec, n, 1, g))
        if "accuracy" in cfg.schedules:
            for mode in cfg.modes:
                accuracy.append(RunSpec(model, split, mode, "accuracy", None, 0.0, cfg.codec,
                                        cfg.accuracy_samples, cfg.accuracy_epochs))
            if "ht" in cfg.modes:
                for codec in cfg.extra_codecs:
                    accuracy.append(RunSpec(model, split, "ht", "accuracy", None, 0.0, codec,
                                            cfg.accuracy_samples, cfg.accuracy_epochs))
    runtime.sort(key=lambda r: (r.link_mbps, cfg.models.index(r.model)))  # stable: modes kept
    return runtime + accuracy


def _export(model: str, split: str, shape, mean, std, cfg: BenchConfig, work: Path) -> Path:
    from toolkit.build.export import ExportConfig, OptimizerConfig, export_artifacts

    out = work / "artifacts" / f"{model}-{split}"
    if (out / "manifest.json").is_file():
        return out
    export_artifacts(ExportConfig(
        model=model, split=split, out=out, input_shape=shape, mean=mean, std=std,
        batch=cfg.batch, board="jetson-orin-nano", force=True, verify=False,
        optimizer=OptimizerConfig(lr=cfg.lr, momentum=0.9, weight_decay=5e-4),
        # The bench's edges run the torch backend (module docstring), so the .pte is never
        # run: the portable lowering saves the XNNPACK pass's minute without changing a figure.
        lowering="portable",
    ))
    return out


def run_bench(cfg: BenchConfig) -> list[dict[str, Any]]:
    cfg.check()
    source, shape, mean, std, data_name = _data_source(cfg)
    work = Path(cfg.work_dir) if cfg.work_dir else cfg.out / "lowbitrate-runs"
    work.mkdir(parents=True, exist_ok=True)
    cfg.out.mkdir(parents=True, exist_ok=True)
    runs = plan_runs(cfg, shape)
    print(f"bench: {len(runs)} runs on {data_name}; work dir {work}", file=sys.stderr)
    results = cfg.out / "lowbitrate.json"
    rows: list[dict[str, Any]] = []
    if cfg.resume and results.is_file():
        rows = [r for r in json.loads(results.read_text()) if "run" in r]
        print(f"bench: resuming, {len(rows)} runs already measured", file=sys.stderr)
    done = {r["run"] for r in rows}
    failed: list[str] = []
    profiles = {m: _profile(m, shape, cfg, work) for m in cfg.models}
    if cfg.report_only:
        return _report_only(cfg, runs, results, profiles)
    with _broker(cfg) as broker:
        for i, spec in enumerate(runs, 1):
            if spec.name in done:
                continue
            artifacts = _export(spec.model, spec.split, shape, mean, std, cfg, work)
            _, f32 = _cut_bytes(spec.model, spec.split, shape)
            t = time.monotonic()
            print(f"[{i}/{len(runs)}] {spec.name}: {spec.samples} samples x {spec.epochs} "
                  "epoch(s) ...", file=sys.stderr, flush=True)
            try:
                res = run_one(spec, artifacts, broker.url, work, source, cfg)
            except HiertrainError as exc:  # keep going: one bad run must not lose the sweep
                failed.append(spec.name)
                print(f"    FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            row = _row(spec, res, data_name, f32)
            row["predicted_s"] = _predict(spec, row, profiles[spec.model])
            rows.append(row)
            print(f"    {row['wall_s']:.1f} s training, {row['bytes_per_sample_up']:.0f} B/sample "
                  f"up, {row['bytes_down']} B down, full acc {row['full_accuracy']:.3f} "
                  f"({time.monotonic() - t:.0f} s with start-up)", file=sys.stderr, flush=True)
            write_results(rows, results)  # nothing lost if a later run fails
    write_report(rows, cfg.out)
    if failed:
        raise HiertrainError(f"{len(failed)} run(s) failed (logs under {work}): "
                             f"{', '.join(failed)}; rerun with --resume to retry only those")
    return rows


def _report_only(cfg: BenchConfig, runs: list[RunSpec], results: Path, profiles: dict
                 ) -> list[dict[str, Any]]:
    if not results.is_file():
        raise HiertrainError(f"--report-only needs {results}; run the benchmark first")
    specs = {s.name: s for s in runs}
    rows = json.loads(results.read_text())
    for row in rows:
        spec = specs.get(row.get("run", ""))
        if spec is not None and spec.model in profiles:
            row["predicted_s"] = _predict(spec, row, profiles[spec.model])
    write_results(rows, results)
    write_report(rows, cfg.out)
    return rows


def _codec_bits(codec: str) -> int:
    """Code width of a codec name (``int4+deflate`` -> 4; ``float32`` -> 32)."""
    head = codec.split("+")[0]
    return 32 if head == "float32" else int(head.removeprefix("int"))


def _predict(spec: RunSpec, row: dict[str, Any], profile) -> float | None:
    """The runtime model's estimate for this run (``toolkit.plan.runtime_model``), from the profile.

    Edge and cloud each had one core of this machine, as in the profile, so
    both speeds are 1. Unshaped runs have no link to price.
    """
    from toolkit.plan.runtime_model import Link, predict

    if spec.link_mbps is None:
        return None
    bits = _codec_bits(spec.codec)
    p = predict(spec.mode, profile, spec.split, Link(spec.link_mbps * 1000, spec.latency_ms),
                row["samples"], bits if bits in (2, 4, 8, 32) else 8,
                grad_bits=spec.grad_bits)
    return round(p.epoch_s, 3)


def _profile(model: str, shape, cfg: BenchConfig, work: Path):
    from toolkit.plan.profiling import load_or_profile

    profile, cached = load_or_profile(work / "profiles.json", model, cfg.batch, shape, threads=1,
                                      show_progress=True)
    print(f"bench: {'cached' if cached else 'measured'} compute profile of {model}",
          file=sys.stderr)
    return profile


# ----------------------------------------------------------------------------- output


def write_results(rows: list[dict[str, Any]], path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(rows, indent=2) + "\n")
    tmp.replace(path)
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        if rows:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def reductions(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (model, rate): HT's runtime reduction against split and cloud on the same samples."""
    out = []
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["schedule"] == "runtime":
            key = "split_g8" if r["mode"] == "split" and r.get("grad_codec") == "int8" \
                else r["mode"]
            by_key.setdefault((r["model"], r["link_mbps"]), {})[key] = r
    for (model, rate), modes in sorted(by_key.items()):
        ht = modes.get("ht")
        if ht is None:
            continue
        entry = {"model": model, "link_mbps": rate, "samples": ht["samples"],
                 "ht_s": ht["wall_s"]}
        for base in ("split", "split_g8", "cloud"):
            b = modes.get(base)
            entry[f"{base}_s"] = b["wall_s"] if b else None
            entry[f"reduction_vs_{base}"] = (
                round(1 - ht["wall_s"] / b["wall_s"], 3) if b and b["wall_s"] > 0 else None)
        out.append(entry)
    return out


def write_report(rows: list[dict[str, Any]], out: Path) -> None:
    """Plots and the markdown table (docs/lowbitrate.md is written from it by hand-free copy)."""
    red = reductions(rows)
    (out / "lowbitrate_reductions.json").write_text(json.dumps(red, indent=2) + "\n")
    _plot(rows, out)
    (out / "lowbitrate.md").write_text(markdown_table(rows, red))


def markdown_table(rows: list[dict[str, Any]], red: list[dict[str, Any]]) -> str:
    data = sorted({r["data"] for r in rows})
    lines = [f"Data: {', '.join(data)}. Each figure is a measured run (see benchmarks/results/"
             "lowbitrate.json).", "",
             "| model | link Mbit/s | samples | HT s | split s | split (int8 grad) s | cloud s | "
             "HT vs split | HT vs split (int8 grad) | HT vs cloud | paper (CIFAR-10, vs split) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v * 100:.0f} %"

    def sec(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    for e in red:
        paper = PAPER_REDUCTION.get((e["model"], "CIFAR-10"))
        lines.append(f"| {e['model']} | {e['link_mbps']:g} | {e['samples']} | {sec(e['ht_s'])} | "
                     f"{sec(e['split_s'])} | {sec(e['split_g8_s'])} | {sec(e['cloud_s'])} | "
                     f"{pct(e['reduction_vs_split'])} | {pct(e['reduction_vs_split_g8'])} | "
                     f"{pct(e['reduction_vs_cloud'])} | "
                     f"{pct(paper)} |")
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


def _plot(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rt = [r for r in rows if r["schedule"] == "runtime"]
    models = sorted({r["model"] for r in rt})
    if models:
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
        for ax, model in zip(axes[0], models, strict=True):
            for mode, grad, label in (("ht", None, "ht"), ("split", "float32", "split"),
                                      ("split", "int8", "split (int8 grad)"),
                                      ("cloud", None, "cloud")):
                pts = sorted((r["link_mbps"], r["wall_s"] / r["samples"] * 1000)
                             for r in rt if r["model"] == model and r["mode"] == mode
                             and r.get("grad_codec") == grad)
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=label)
            ax.set(xscale="log", yscale="log", xlabel="link bit rate (Mbit/s)",
                   ylabel="training time per sample (ms)", title=model)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(out / "lowbitrate_runtime.png", dpi=120)
        plt.close(fig)
    acc = [r for r in rows if r["schedule"] == "accuracy"]
    if acc:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in acc:
            x = max(r["bytes_per_sample_up"], 1.0)
            ax.scatter(x, r["full_accuracy"])
            ax.annotate(f"{r['model']} {r['mode']} {r['codec']}", (x, r["full_accuracy"]),
                        fontsize=7)
        ax.set(xscale="log", xlabel="bytes per sample up (measured)",
               ylabel="full-model accuracy (held-out)")
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "lowbitrate_accuracy.png", dpi=120)
        plt.close(fig)
