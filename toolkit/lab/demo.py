"""``toolkit demo``: hierarchical training end to end on a laptop, nothing else installed.

Exports a small CNN, then starts the embedded MQTT broker, the cloud trainer
and N edge runtimes as separate OS processes, exactly as they would run on a
server and on boards. Default data: scikit-learn's bundled
digits (real data, no download). The demo only launches and watches: all the
work happens in the ``cloud_trainer`` and ``edge_runtime`` processes, which it
reaches through their command lines and the broker, never by import.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from toolkit.core.entry import show_progress
from toolkit.core.errors import HiertrainError
from toolkit.lab.launch import ProcessGroup, StatusWatcher, start_cloud, start_embedded_broker

DEMO_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class DemoConfig:
    run_dir: Path | None = None
    data: str | None = None
    broker: str | None = None
    epochs: int = 3
    edges: int = 2
    backend: str = "executorch"
    batch: int = 32
    model: str = "smallcnn"


def _data_profile(data: str | None) -> tuple[str | None, tuple, tuple, tuple, str]:
    """Input shape and normalisation for the demo's data source."""
    from toolkit.core.data.datasets import digits_stats, load_dataset
    from toolkit.core.models import CIFAR_MEAN, CIFAR_STD

    if data in (None, "digits"):
        mean, std = digits_stats()
        return None, (1, 8, 8), mean, std, "scikit-learn digits (bundled)"
    ds = load_dataset(data, "test", limit=8)
    c = ds.x.shape[1]
    shape = (c, *ds.x.shape[2:]) if ds.x.shape[2] >= 8 else (c, 32, 32)
    if c == 3:
        return data, shape, CIFAR_MEAN, CIFAR_STD, ds.name
    return data, shape, (0.5,) * c, (0.25,) * c, ds.name


def run_demo(cfg: DemoConfig) -> dict:
    from toolkit.build.export import ExportConfig, OptimizerConfig, export_artifacts
    from toolkit.core.data.datasets import load_dataset, shard
    from toolkit.core.models.exits import ExitHeadConfig

    if cfg.edges < 1 or cfg.epochs < 1:
        raise HiertrainError("the demo needs at least one edge and one epoch")
    if cfg.broker is not None:
        from toolkit.core.transport import parse_url

        parse_url(cfg.broker)  # a bad URL is refused before any work
    run_dir = Path(cfg.run_dir) if cfg.run_dir else Path(tempfile.mkdtemp(prefix="hiertrain-"))
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HiertrainError(f"cannot create run directory {run_dir}: {exc.strerror}") from None
    t0 = time.monotonic()
    source, shape, mean, std, data_name = _data_profile(cfg.data)
    print(f"hiertrain demo: {cfg.model} on {data_name}, {cfg.edges} edge(s) x {cfg.epochs} "
          f"epoch(s), backend {cfg.backend}, run dir {run_dir}")

    artifacts = run_dir / "artifacts"
    print("[1/4] exporting the edge training program (ExecuTorch) ...")
    export_artifacts(ExportConfig(
        model=cfg.model, out=artifacts, input_shape=shape, mean=mean, std=std, batch=cfg.batch,
        board="rpi4", exit=ExitHeadConfig(channels=16), force=True,
        optimizer=OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=5e-4),
    ))
    train = load_dataset(source, "train", input_shape=shape)
    expected = sum((len(shard(train, i, cfg.edges)) // cfg.batch) * cfg.epochs
                   for i in range(cfg.edges))

    url = cfg.broker
    run_id = f"demo-{int(time.time())}"
    with ProcessGroup(run_dir) as group:
        if url is None:
            print("[2/4] starting the embedded MQTT broker (amqtt) on 127.0.0.1 ...")
            url = start_embedded_broker(group)
        else:
            print(f"[2/4] using the broker at {url}")
        live = ("broker",) if "broker" in group.procs else ()
        with StatusWatcher(url, run_id) as watcher:
            print("[3/4] starting the cloud trainer and the edge runtimes as processes ...")
            cloud_args = ["cloud_trainer", "--artifacts", str(artifacts), "--broker", url,
                          "--run-dir", str(run_dir / "cloud"), "--run-id", run_id,
                          "--devices", str(cfg.edges), "--threads", "1", "--quiet"]
            if source:
                cloud_args += ["--eval-data", source]
            start_cloud(group, cloud_args, url, run_id, watcher=watcher, must_live=live)
            for i in range(cfg.edges):
                dev = f"edge-{i}"
                args = ["edge_runtime", "train", "--artifacts", str(artifacts), "--broker", url,
                        "--device-id", dev, "--run-id", run_id, "--epochs", str(cfg.epochs),
                        "--backend", cfg.backend, "--shard", f"{i}/{cfg.edges}",
                        "--report", str(run_dir / f"{dev}.json"), "--threads", "1",
                        "--state-dir", str(run_dir), "--quiet"]
                if source:
                    args += ["--data", source]
                group.start(dev, args)

            print(f"[4/4] training: {expected} batches expected")
            _follow(watcher, group, expected, cfg.edges, live)

    summary = _summarise(run_dir, cfg, time.monotonic() - t0, data_name)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, run_dir)
    return summary


def _follow(watcher: StatusWatcher, group: ProcessGroup, expected: int, n_edges: int,
            live: tuple[str, ...]) -> None:
    """Progress bars when stdout is a terminal (``show_progress``, the rule all three CLIs
    share); otherwise a plain line every 10 s, so logs and CI output hold no carriage returns."""
    deadline = time.monotonic() + DEMO_TIMEOUT_S
    tty = show_progress()
    per_edge = expected // n_edges
    bars = {}
    if tty:
        bars["cloud"] = tqdm(total=expected, desc="cloud trained", unit="batch", position=0)
        for i in range(n_edges):
            bars[f"edge-{i}"] = tqdm(total=per_edge, desc=f"edge-{i} sent ", unit="batch",
                                     position=i + 1)
    last_line = 0.0
    workers = [n for n in group.procs if n != "broker"]
    try:
        while group.running(workers):
            with watcher.lock:
                trained = int(watcher.cloud.get("batches_trained", 0))
                sent = {d: int(st.get("batches", 0)) for d, st in watcher.edges.items()}
            if tty:
                bars["cloud"].n = trained
                for dev, n in sent.items():
                    if dev in bars:
                        bars[dev].n = min(n, bars[dev].total)
                for b in bars.values():
                    b.refresh()
            elif time.monotonic() - last_line > 10:
                last_line = time.monotonic()
                edges = ", ".join(f"{d} {n}" for d, n in sorted(sent.items())) or "none yet"
                print(f"  cloud trained {trained}/{expected}; edges sent (at epoch ends): "
                      f"{edges}", file=sys.stderr, flush=True)
            group.check(live)
            if time.monotonic() > deadline:
                raise HiertrainError(f"the demo did not finish within {DEMO_TIMEOUT_S:.0f} s")
            time.sleep(0.25)
        group.check(live)
    finally:
        for b in bars.values():
            b.close()


def _summarise(run_dir: Path, cfg: DemoConfig, wall_s: float, data_name: str) -> dict:
    edges = [json.loads((run_dir / f"edge-{i}.json").read_text()) for i in range(cfg.edges)]
    cloud = json.loads((run_dir / "cloud" / "cloud_summary.json").read_text())
    samples = sum(e["samples_published"] for e in edges)
    payload = sum(e["payload_bytes_per_sample"] * e["samples_published"] for e in edges)
    return {
        "data": data_name,
        "model": cfg.model,
        "edges": cfg.edges,
        "epochs": cfg.epochs,
        "backend": cfg.backend,
        "exit_accuracy": cloud["exit_accuracy"],
        "full_accuracy": cloud["full_accuracy"],
        "edge_exit_train_accuracy": [e["exit_accuracy"] for e in edges],
        "samples_published": samples,
        "batches_published": sum(e["batches_published"] for e in edges),
        "batches_trained": cloud["batches_trained"],
        "bytes_per_sample": payload / samples if samples else 0.0,
        "float32_bytes_per_sample": edges[0]["float32_bytes_per_sample"],
        "publish_wait_s": max(e["publish_wait_s"] for e in edges),
        "dropped": cloud.get("dropped", {}),
        "wall_s": round(wall_s, 2),
        "run_dir": str(run_dir),
    }


def _print_summary(s: dict, run_dir: Path) -> None:
    ratio = s["float32_bytes_per_sample"] / s["bytes_per_sample"] if s["bytes_per_sample"] else 0
    rows = [
        ("exit accuracy (held-out)", f"{s['exit_accuracy']:.3f}"),
        ("full-model accuracy (held-out)", f"{s['full_accuracy']:.3f}"),
        ("batches published / trained", f"{s['batches_published']} / {s['batches_trained']}"),
        ("samples published", f"{s['samples_published']}"),
        ("bytes per sample on the wire", f"{s['bytes_per_sample']:.0f} (int8 + headers)"),
        ("float32 bytes per sample", f"{s['float32_bytes_per_sample']} ({ratio:.1f}x more)"),
        ("edge time blocked on publishing", f"{s['publish_wait_s']:.2f} s"),
        ("wall time", f"{s['wall_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    print("\nsummary")
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print(f"\nwritten to {run_dir / 'summary.json'}")
