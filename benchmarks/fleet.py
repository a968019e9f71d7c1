"""Fleet benchmark (issue 15): many simulated edges against the real ``cloud-trainer``.

Each grid point starts Debian's mosquitto on 127.0.0.1, the real ``cloud-trainer`` CLI as a
server would run it (all cores, ``--trace`` for per-batch train times, ``--json`` summary),
and a few *light publisher* processes. A light publisher owns many edges, each its own MQTT
client id (so the broker sees N clients, as with N boards), and does no training: it replays
a pool of real encoded activation batches (the exported small CNN's edge segment run on the
bundled digits, coded by the manifest's codec) at ``--rate`` batches/s per edge, re-stamped
with each edge's device id and sequence number, announces each edge ``online`` and finishes
it ``done`` with ``batches_published`` like an edge runtime does, so the trainer's own done
rule ends the run. Per point it records:

- ``samples_per_s``: samples trained / (last trained - first published), and what was offered;
- ``latency_ms``: publish-to-trained p50 / p99 / max (publish time: the publisher's clock just
  before ``publish``; trained: the trainer's trace; one machine, one clock);
- ``broker_cpu``: mosquitto's utime+stime (/proc/<pid>/stat) over the point, in CPU seconds
  and as cores busy; the trainer's and the publishers' likewise;
- ``ack_bytes_per_edge``: from the summary's per-device ``ack_bytes`` (mean and max);
- ``lost`` (published, never trained) and ``trained_twice`` (a seq twice in the trace): both
  must be 0; ``queue_wait`` from the summary.

Workers are a grid dimension (``cloud-trainer --workers N``: a group sharing the batches,
``cloud_trainer/group.py``). A trainer without that flag (asked with ``cloud-trainer train
--help``) gets its N > 1 points recorded as skipped with the reason.

    python benchmarks/fleet.py                      # 10,100,300 edges x 1,2,4 workers
    python benchmarks/fleet.py --quick --out /tmp/fleet.json   # 10 edges, 10 s smoke run
    python benchmarks/fleet.py --plot               # fleet.png from fleet.json

Rows are appended to ``benchmarks/results/fleet.json`` as each point finishes; points already
there are skipped unless ``--force`` (so a long grid can be resumed). This machine has 2
cores shared by broker, trainer and publishers: the figures show where that saturates, not
what a server with its own cores would do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: import the toolkit of this checkout
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
EXPORT_OPTIONS = ("--model", "smallcnn", "--input-shape", "1,8,8", "--mean", "0.3",
                  "--std", "0.37", "--no-verify", "--lowering", "portable")
"""The small CNN on the bundled digits: the cheapest real export; the benchmark measures the
fleet plumbing (broker, intake, acks), so a bigger model would only hide it behind compute."""
EDGES_PER_PUBLISHER = 100
"""Edges one publisher process drives: a single-threaded paho loop over its clients stays well
under a core at the default rate, and few processes keep the 2-core machine for the trainer."""
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Point:
    """One grid point and the settings shared by all of them (parsed once, in ``main``)."""

    edges: int
    workers: int
    rate: float  # batches/s per edge
    seconds: float  # publishing time
    batch: int
    pool: int  # distinct encoded batches replayed
    drain_s: float  # bound on waiting for the trainer after publishing stops
    threads: int = 1  # torch threads per trainer worker (see --trainer-threads)

    def key(self) -> tuple[int, int, float, float, int]:
        """What makes two rows the same point (for resuming)."""
        return (self.edges, self.workers, self.rate, self.seconds, self.batch)


# --------------------------------------------------------------------------- set-up


def export_artifacts(batch: int, cache: Path) -> Path:
    """Export the small CNN once per batch size into ``cache`` and reuse it: an export takes
    ~20 s of a shared CPU that no grid point should pay for."""
    out = cache / f"smallcnn-digits-b{batch}"
    if (out / "manifest.json").exists():
        return out
    cmd = [sys.executable, "-m", "toolkit", "export", *EXPORT_OPTIONS, "--batch", str(batch),
           "--out", str(out), "--force"]
    r = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise SystemExit(f"toolkit export failed ({r.returncode}):\n{r.stderr[-2000:]}")
    return out


def build_pool(artifacts: Path, size: int, out: Path) -> int:
    """Encode ``size`` distinct real activation batches (edge segment on digits, the manifest's
    codec) into ``out``, one length-prefixed message after another; returns bytes per message.

    Done once per point in this process, so publishers only re-stamp routing fields.
    """
    import torch

    from toolkit.core.artifacts.manifest import load_manifest
    from toolkit.core.data.datasets import batches, load_dataset, normalize
    from toolkit.core.models.segments import load_segments
    from toolkit.core.protocol.codec import BatchMeta, codec_for
    from toolkit.core.protocol.quant import QuantScheme

    manifest = load_manifest(artifacts, verify=False)
    edge = load_segments(manifest).step.edge
    ds = load_dataset(None, "train", input_shape=manifest.input_shape)
    norm = manifest.data["model"]["normalization"]
    ds.x = normalize(ds.x, norm["mean"], norm["std"])
    scheme = QuantScheme.from_dict(manifest.data["quantization"])
    codec = codec_for(scheme)
    sizes = []
    with torch.no_grad(), open(out, "wb") as f:
        epoch = 0
        while len(sizes) < size:
            for i, (x, y) in enumerate(batches(ds, manifest.batch_size, epoch=epoch, seed=0)):
                if len(sizes) >= size:
                    break
                data = codec.encode(edge(x), y, BatchMeta("pool", "pool", i, epoch, i),
                                    base=scheme)
                f.write(len(data).to_bytes(4, "little") + data)
                sizes.append(len(data))
            epoch += 1
    return max(sizes)


def read_pool(path: Path) -> list[bytes]:
    """The messages :func:`build_pool` wrote."""
    raw, out, i = path.read_bytes(), [], 0
    while i < len(raw):
        n = int.from_bytes(raw[i:i + 4], "little")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out


def _env() -> dict[str, str]:
    """Children import this checkout (not whatever copy is installed) and flush their logs."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}


def trainer_supports_workers() -> bool:
    """Whether ``cloud-trainer train`` has ``--workers`` (asked, not assumed, so the grid's
    skipped points start running the day the flag lands)."""
    r = subprocess.run([sys.executable, "-m", "cloud_trainer", "train", "--help"], cwd=REPO,
                       env=_env(), capture_output=True, text=True, timeout=120)
    return "--workers" in r.stdout


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of ``pid`` in seconds from /proc (None once it is gone)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14, 15 of stat(5)


def tree_cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds of ``pid`` and every live descendant (``--workers``: the launcher and its
    worker processes); None once it is gone."""
    import psutil

    if pid is None:
        return None
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


# --------------------------------------------------------------------------- publisher


def publisher_main(spec_path: Path) -> int:
    """One light publisher process: its edges' MQTT clients, paced replay, timings out.

    Single-threaded on purpose: one ``selectors`` wait over all its clients' sockets drives
    paho's external-loop calls (``loop_read`` for a socket with data, ``loop_write`` for one
    with a backlog, ``loop_misc`` for keepalives once a second), so an idle edge costs
    nothing, 100 edges cost one thread, and the process's CPU is what the messages cost.
    (paho's ``loop(0)`` per client and tick polled every socket: 0.13 of a core at 100 edges.)
    """
    import selectors

    import paho.mqtt.client as mqtt

    from toolkit.core.protocol import topics
    from toolkit.core.protocol.codec import decode
    from toolkit.core.protocol.messages import Status
    from toolkit.core.protocol.wire import encode

    spec = json.loads(spec_path.read_text())
    run, devices, rate = spec["run"], spec["devices"], spec["rate"]
    pool = [decode(m).message for m in read_pool(Path(spec["pool"]))]
    clients: dict[str, mqtt.Client] = {}
    for dev in devices:
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=dev,
                        protocol=mqtt.MQTTv5)
        c.max_inflight_messages_set(64)
        c.connect(spec["host"], spec["port"], keepalive=60)
        clients[dev] = c
    sel = selectors.DefaultSelector()
    for c in clients.values():
        sel.register(c.socket(), selectors.EVENT_READ, c)
    misc_at = [time.monotonic()]

    def pump(timeout: float) -> None:
        """Read what arrived (CONNACKs, PUBACKs) within ``timeout`` s, write backlogs."""
        for key, _ in sel.select(max(0.0, timeout)):
            key.data.loop_read(100)
        for c in clients.values():
            if c.want_write():
                c.loop_write()
        if time.monotonic() - misc_at[0] > 1.0:
            misc_at[0] = time.monotonic()
            for c in clients.values():
                c.loop_misc()

    deadline = time.monotonic() + 60
    while not all(c.is_connected() for c in clients.values()):
        if time.monotonic() > deadline:
            raise SystemExit(f"{sum(not c.is_connected() for c in clients.values())} edges "
                             "did not connect within 60 s")
        pump(0.05)

    batch = int(pool[0].labels.shape[0]) if pool[0].labels is not None else 0

    def status(dev: str, state: str, n: int) -> None:
        st = Status("edge", dev, run, state, batches_published=n, samples_published=n * batch,
                    last_seq=n - 1)
        infos.append(clients[dev].publish(topics.status_topic(run, dev), st.encode(), qos=1,
                                          retain=True))

    infos: list[mqtt.MQTTMessageInfo] = []
    for dev in devices:
        status(dev, "online", 0)
    # Wait for the go time the harness chose, so all publishers start together.
    while time.time() < spec["start"]:
        pump(min(0.05, spec["start"] - time.time()))
    cpu0 = time.process_time()
    period = 1.0 / rate
    t0 = time.monotonic()
    # Staggered phases: edges are not synchronised in a real fleet.
    due = {dev: t0 + period * (i / len(devices)) for i, dev in enumerate(devices)}
    offset = {dev: i for i, dev in enumerate(devices)}  # edges replay the pool out of step
    sent: dict[str, list[float]] = {dev: [] for dev in devices}
    stop = t0 + spec["seconds"]
    while True:
        now = time.monotonic()
        if now >= stop:
            break
        for dev, at in due.items():
            if at <= now:
                seq = len(sent[dev])
                msg = dataclasses.replace(pool[(seq + offset[dev]) % len(pool)], run_id=run,
                                          device_id=dev, seq=seq, batch_index=seq)
                data = encode(msg)
                sent[dev].append(time.time())
                infos.append(clients[dev].publish(topics.act_topic(run, dev), data, qos=1))
                due[dev] = at + period
        pump(min(min(due.values()), stop) - time.monotonic())
    for dev in devices:
        status(dev, "done", len(sent[dev]))
    # Drain: every outgoing QoS 1 message acknowledged by the broker (bounded).
    deadline = time.monotonic() + 30
    while not all(i.is_published() for i in infos) and time.monotonic() < deadline:
        pump(0.05)
    unacked = sum(not i.is_published() for i in infos)
    cpu = time.process_time() - cpu0
    for c in clients.values():
        c.disconnect()
    Path(spec["result"]).write_text(json.dumps({"sent": sent, "cpu_s": cpu,
                                                "unacked": unacked}))
    return 0


# --------------------------------------------------------------------------- one point


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (None for no values): no interpolation between two batches."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def run_point(p: Point, artifacts: Path, work: Path) -> dict[str, Any]:
    """Run one grid point end to end and return its figures (every wait bounded)."""
    from toolkit.lab.broker import MosquittoBroker
    from toolkit.lab.launch import ProcessGroup, start_cloud

    run = f"fleet-{uuid.uuid4().hex[:8]}"
    devices = [f"e{i:04d}" for i in range(p.edges)]
    pool = work / "pool.bin"
    msg_bytes = build_pool(artifacts, p.pool, pool)
    trace, run_dir = work / "trace.jsonl", work / "run"
    load0 = os.getloadavg()
    with MosquittoBroker() as broker, ProcessGroup(work / "logs", cwd=REPO) as procs:
        broker_cpu0 = cpu_seconds(broker.pid)
        host, port = broker.url.removeprefix("mqtt://").rsplit(":", 1)
        cloud_args = ["cloud_trainer", "train", "--artifacts", str(artifacts),
                      "--broker", broker.url, "--run-dir", str(run_dir), "--run-id", run,
                      "--device-ids", ",".join(devices), "--trace", str(trace), "--json",
                      "--quiet", "--eval-limit", "64", "--no-tensorboard",
                      "--idle-timeout", str(max(30.0, p.drain_s))]
        cloud_args += ["--threads", str(p.threads)]
        if p.workers > 1:
            cloud_args += ["--workers", str(p.workers)]
        cloud = start_cloud(procs, cloud_args, broker.url, run, timeout=120)
        # Publishers load torch (~3 s each): the go time leaves room for that and the connects.
        n_pub = max(1, math.ceil(p.edges / EDGES_PER_PUBLISHER))
        start = time.time() + 8 + 0.02 * p.edges
        names = []
        for k in range(n_pub):
            spec = work / f"pub{k}.json"
            spec.write_text(json.dumps({
                "run": run, "devices": devices[k::n_pub], "rate": p.rate,
                "seconds": p.seconds, "host": host, "port": int(port), "pool": str(pool),
                "start": start, "result": str(work / f"pub{k}.out.json")}))
            procs.start_command(f"pub{k}", [sys.executable, str(Path(__file__).resolve()),
                                            "--publisher", str(spec)], _env())
            names.append(f"pub{k}")
        cloud_cpu = tree_cpu_seconds(cloud.pid) or 0.0
        cloud_cpu0 = cloud_cpu
        deadline = start + p.seconds + 90
        while procs.running(names) and time.time() < deadline:
            cloud_cpu = max(cloud_cpu, tree_cpu_seconds(cloud.pid) or 0.0)
            time.sleep(0.5)
        pub_codes = {n: procs.stop(n) if procs.returncode(n) is None else procs.returncode(n)
                     for n in names}
        published_at = time.time()
        deadline = time.time() + p.drain_s
        while cloud.poll() is None and time.time() < deadline:
            cloud_cpu = max(cloud_cpu, tree_cpu_seconds(cloud.pid) or 0.0)
            time.sleep(0.5)
        drained = cloud.poll() is not None
        code = cloud.returncode if drained else procs.stop("cloud", timeout=30)
        broker_cpu1 = cpu_seconds(broker.pid)
        end = time.time()
        cloud_out = procs.output("cloud")
        logs = {n: procs.tail(n, 5) for n in [*names, "cloud"]}
    summary: dict[str, Any] = {}
    for line in reversed(cloud_out.splitlines()):
        if line.startswith("{"):
            try:
                summary = json.loads(line)
                break
            except json.JSONDecodeError:
                continue
    sent: dict[str, list[float]] = {}
    pub_cpu, unacked = 0.0, 0
    for k in range(n_pub):
        out = work / f"pub{k}.out.json"
        if out.exists():
            r = json.loads(out.read_text())
            sent.update(r["sent"])
            pub_cpu += r["cpu_s"]
            unacked += r["unacked"]
    trained: dict[tuple[str, int], float] = {}
    twice, samples = 0, 0
    if trace.exists():
        for line in trace.read_text().splitlines():
            t = json.loads(line)
            k = (t["device"], t["seq"])
            if k in trained:
                twice += 1
            else:
                trained[k] = t["trained"]
                samples += t["n"]
    published = sum(len(v) for v in sent.values())
    lat = [(trained[(d, s)] - at) * 1000 for d, times in sent.items()
           for s, at in enumerate(times) if (d, s) in trained]
    first = min((v[0] for v in sent.values() if v), default=start)
    last = max(trained.values(), default=first)
    span = max(last - first, 1e-9)
    acks = [float(v) for v in summary.get("ack_bytes", {}).values()]
    wall = end - start
    return {
        "status": "ok" if drained and code == 0 and len(trained) == published else "incomplete",
        "published": published, "trained": len(trained), "lost": published - len(trained),
        "trained_twice": twice,
        "summary_duplicates": sum(d.get("duplicates", 0)
                                  for d in summary.get("per_device", {}).values()),
        "dropped": summary.get("dropped"),
        "samples_per_s": samples / span,
        "offered_samples_per_s": p.edges * p.rate * p.batch,
        "latency_ms": {"p50": percentile(lat, 50), "p99": percentile(lat, 99),
                       "max": max(lat, default=None)},
        "broker_cpu_s": (broker_cpu1 or 0.0) - (broker_cpu0 or 0.0),
        "broker_cores": ((broker_cpu1 or 0.0) - (broker_cpu0 or 0.0)) / wall,
        "broker_cpu_us_per_batch": 1e6 * ((broker_cpu1 or 0.0) - (broker_cpu0 or 0.0))
        / max(published, 1),
        "trainer_cores": (cloud_cpu - cloud_cpu0) / wall,
        "publisher_cores": pub_cpu / p.seconds,
        "publisher_cpu_ms_per_batch": 1000 * pub_cpu / max(published, 1),
        "ack_bytes_per_edge": {"mean": statistics.fmean(acks) if acks else None,
                               "max": max(acks, default=None)},
        # Per edge and per batch: flat in the number of edges if acks are O(1) per edge.
        "ack_bytes_per_batch": sum(acks) / max(published, 1),
        "queue_wait": summary.get("queue_wait"), "max_queue_depth":
            summary.get("max_queue_depth"),
        "message_bytes": msg_bytes, "publishers": n_pub, "publisher_exit": pub_codes,
        "unacked_at_publisher": unacked, "trainer_exit": code,
        "drain_s": end - published_at, "wall_s": wall, "loadavg_at_start": list(load0),
        **({} if drained and code == 0 else {"logs": logs}),
    }


# --------------------------------------------------------------------------- grid, output


def load_rows(path: Path) -> list[dict[str, Any]]:
    """Rows already written (a missing file: none)."""
    return json.loads(path.read_text()) if path.exists() else []


def save_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Write all rows atomically, so an interrupted grid leaves a readable file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rows, indent=1) + "\n")
    tmp.replace(path)


def row_key(row: dict[str, Any]) -> tuple[int, int, float, float, int]:
    """The :meth:`Point.key` of a stored row."""
    return (row["edges"], row["workers"], row["rate"], row["seconds"], row["batch"])


def plot(rows: list[dict[str, Any]], out: Path) -> None:
    """Throughput and p99 latency against edges, a line per worker count (ran points only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for workers in sorted({r["workers"] for r in rows}):
        pts = sorted((r for r in rows if r["workers"] == workers and r.get("samples_per_s")),
                     key=lambda r: r["edges"])
        if not pts:
            continue
        edges = [r["edges"] for r in pts]
        a.plot(edges, [r["samples_per_s"] for r in pts], "o-", label=f"{workers} worker(s)")
        b.plot(edges, [r["latency_ms"]["p99"] for r in pts], "o-", label=f"{workers} worker(s)")
    offered = sorted({(r["edges"], r["offered_samples_per_s"]) for r in rows
                      if "offered_samples_per_s" in r})
    if offered:
        a.plot([e for e, _ in offered], [o for _, o in offered], "k--", lw=0.8,
               label="offered")
    for ax, ylabel in ((a, "trained samples/s"), (b, "publish-to-trained p99 (ms)")):
        ax.set_xscale("log")
        ax.set_xlabel("simulated edges")
        ax.set_ylabel(ylabel)
        ax.legend()
        ax.grid(alpha=0.3)
    cores = rows[0]["machine"]["cores"] if rows else "?"
    fig.suptitle(f"Fleet: mosquitto + cloud-trainer + publishers on one {cores}-core machine")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    """Parse the flags, run the grid points not yet in ``--out``, write rows and the plot."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--edges", type=_ints, default=[10, 100, 300], help="edge counts, e.g. 10,100")
    ap.add_argument("--workers", type=_ints, default=[1, 2, 4], help="cloud worker counts")
    ap.add_argument("--rate", type=float, default=1.0, help="batches/s each edge publishes")
    ap.add_argument("--seconds", type=float, default=30.0, help="publishing time per point")
    ap.add_argument("--batch", type=int, default=16, help="samples per batch (export option)")
    ap.add_argument("--trainer-threads", type=int, default=1,
                    help="torch threads per trainer worker (default 1: here broker, publishers "
                         "and trainer share 2 cores, and a small step on an oversubscribed CPU "
                         "measured 49 ms of CPU with 2 threads against 2.9 ms with 1)")
    ap.add_argument("--pool", type=int, default=32, help="distinct real batches replayed")
    ap.add_argument("--drain", type=float, default=120.0,
                    help="at most S seconds for the trainer to finish after publishing stops")
    ap.add_argument("--out", type=Path, default=RESULTS / "fleet.json", help="rows JSON")
    ap.add_argument("--artifacts", type=Path, default=None,
                    help="exported artifacts to use (default: export once into a cache)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 10 edges, 1 worker, 10 s (write it with --out /tmp/...)")
    ap.add_argument("--force", action="store_true", help="run points already in --out again")
    ap.add_argument("--plot", action="store_true", help="write --out's .png (after any runs)")
    ap.add_argument("--publisher", type=Path, help=argparse.SUPPRESS)  # internal: one publisher
    args = ap.parse_args(argv)
    if args.publisher:
        return publisher_main(args.publisher)
    if args.quick:
        args.edges, args.workers, args.seconds = [10], [1], 10.0
    if args.rate <= 0 or args.seconds <= 0 or min(args.edges, default=0) < 1:
        ap.error("--rate, --seconds and every --edges must be > 0")
    rows = load_rows(args.out)
    done = {row_key(r) for r in rows}
    points = [Point(e, w, args.rate, args.seconds, args.batch, args.pool, args.drain,
                    args.trainer_threads) for e in args.edges for w in args.workers]
    todo = [p for p in points if args.force or p.key() not in done]
    if todo:
        multi = any(p.workers > 1 for p in todo) and trainer_supports_workers()
        cache = Path(tempfile.gettempdir()) / "hiertrain-fleet-artifacts"
        artifacts = args.artifacts or export_artifacts(args.batch, cache)
        machine = {"cores": os.cpu_count(), "platform": platform.platform(),
                   "python": platform.python_version()}
        command = shlex.join([sys.executable, *sys.argv])
        for i, p in enumerate(todo, 1):
            head = f"[{i}/{len(todo)}] {p.edges} edges x {p.workers} worker(s) at {p.rate}/s"
            row: dict[str, Any] = {"edges": p.edges, "workers": p.workers, "rate": p.rate,
                                   "seconds": p.seconds, "batch": p.batch,
                                   "trainer_threads": p.threads, "command": command,
                                   "machine": machine, "time": time.time()}
            if p.workers > 1 and not multi:
                row.update(status="skipped", reason="cloud-trainer has no --workers option "
                           "yet (multi-worker training is not built)")
                print(f"{head}: skipped, {row['reason']}", flush=True)
            else:
                print(f"{head}: {p.seconds:.0f} s of publishing...", flush=True)
                with tempfile.TemporaryDirectory(prefix="hiertrain-fleet-") as work:
                    row.update(run_point(p, artifacts, Path(work)))
                lat = row["latency_ms"]
                print(f"{head}: {row['status']}, {row['samples_per_s']:.0f} samples/s trained "
                      f"(offered {row['offered_samples_per_s']:.0f}), p50 {_ms(lat['p50'])} "
                      f"p99 {_ms(lat['p99'])}, broker "
                      f"{row['broker_cpu_us_per_batch']:.0f} us/batch, "
                      f"trainer {row['trainer_cores']:.2f}, publishers "
                      f"{row['publisher_cores']:.2f}, ack "
                      f"{_num(row['ack_bytes_per_edge']['mean'])} B/edge "
                      f"({row['ack_bytes_per_batch']:.0f} B/batch), lost {row['lost']}, "
                      f"trained twice {row['trained_twice']}", flush=True)
            rows = [r for r in rows if row_key(r) != p.key()] + [row]
            save_rows(args.out, rows)
    if args.plot:
        plot(rows, args.out.with_suffix(".png"))
        print(f"wrote {args.out.with_suffix('.png')}")
    return 0


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f} ms"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


if __name__ == "__main__":
    sys.exit(main())
