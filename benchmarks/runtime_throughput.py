"""Edge training throughput per backend, and the cloud trainer's ingest throughput.

Part A times ``edge_runtime``'s two backends (ExecuTorch program vs eager
PyTorch, same math) on exported programs, step by step, with 1 and 2 threads.
Part B measures the cloud side as deployed: a ``cloud-trainer`` process on a
real broker (embedded amqtt, and mosquitto when installed) fed by a publisher
that replays pre-encoded int8 activation batches as fast as QoS 1 allows; the
figure is batches trained per second from the first publish to the cloud's
``done`` status (so it includes MQTT, decoding, de-duplication and the
cloud segment's SGD step), plus the bare decode+dequantize rate.

    python benchmarks/runtime_throughput.py   # -> benchmarks/results/runtime_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from edge_runtime.backends import make_backend
from toolkit.build.export import ExportConfig, export_artifacts
from toolkit.core.artifacts.manifest import load_manifest
from toolkit.core.models.exits import ExitHeadConfig
from toolkit.core.protocol import topics
from toolkit.core.protocol.codec import BatchMeta, codec_for, decode
from toolkit.core.protocol.messages import CLOUD_DEVICE, Status, decode_status
from toolkit.core.protocol.quant import QuantScheme
from toolkit.core.transport import open_link
from toolkit.lab.broker import EmbeddedBroker, MosquittoBroker, find_mosquitto
from toolkit.lab.launch import ProcessGroup

ROOT = Path(__file__).resolve().parents[1]

EDGE_CONFIGS = [
    # name, model, split, input shape, batch, steps
    ("smallcnn/digits", "smallcnn", "block1", (1, 8, 8), 32, 200),
    ("resnet18/stem", "resnet18", "stem", (3, 32, 32), 8, 6),
]


def _export(tmp: Path, model: str, split: str, shape, batch: int) -> Path:
    out = tmp / f"{model}-{split}-{batch}"
    mean, std = ((0.3,), (0.37,)) if shape[0] == 1 else (None, None)
    export_artifacts(ExportConfig(model=model, split=split, out=out, input_shape=shape,
                                  mean=mean, std=std, batch=batch, verify=False,
                                  exit=ExitHeadConfig(channels=16)))
    return out


def edge_throughput(tmp: Path) -> list[dict]:
    rows = []
    for name, model, split, shape, batch, steps in EDGE_CONFIGS:
        art = _export(tmp, model, split, shape, batch)
        manifest = load_manifest(art)
        x = torch.rand(batch, *shape)
        y = torch.randint(0, 10, (batch,))
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for backend in ("executorch", "torch"):
                b = make_backend(backend, manifest)
                for _ in range(2):
                    b.step(x, y)
                t = time.perf_counter()
                for _ in range(steps):
                    b.step(x, y)
                s = (time.perf_counter() - t) / steps
                rows.append({"program": name, "backend": backend, "threads": threads,
                             "batch": batch, "step_s": s, "samples_per_s": batch / s})
                print(f"  {name:<18} {backend:<10} threads={threads}  {s * 1e3:8.1f} ms/step  "
                      f"{batch / s:8.0f} samples/s", flush=True)
    return rows


def _messages(manifest, n: int, run: str, device: str) -> list[bytes]:
    scheme = QuantScheme.from_dict(manifest.data["quantization"])
    b = manifest.batch_size
    cut = manifest.cut_shape
    g = torch.Generator().manual_seed(0)
    out = []
    for seq in range(n):
        act = torch.relu(torch.randn(b, *cut, generator=g))
        out.append(codec_for(scheme).encode(act, torch.randint(0, 10, (b,), generator=g),
                                            BatchMeta(run, device, seq, 0, seq), base=scheme))
    return out


def cloud_ingest(tmp: Path, broker_kind: str, n: int) -> dict:
    art = _export(tmp, "smallcnn", "block1", (1, 8, 8), 32) if not (
        tmp / "smallcnn-block1-32").exists() else tmp / "smallcnn-block1-32"
    manifest = load_manifest(art)
    run, dev = f"bench-{broker_kind}", "bench-edge"
    msgs = _messages(manifest, n, run, dev)
    broker = EmbeddedBroker() if broker_kind == "amqtt" else MosquittoBroker()
    with broker, ProcessGroup(tmp / f"logs-{broker_kind}", cwd=ROOT) as procs:
        run_dir = tmp / f"cloud-{broker_kind}"
        procs.start("cloud", [
            "cloud_trainer", "--artifacts", str(art), "--broker", broker.url,
            "--run-dir", str(run_dir), "--run-id", run, "--devices", "1",
            "--threads", "1", "--quiet", "--eval-limit", "100"])
        done = threading.Event()
        online = threading.Event()

        def on_status(topic, payload, _props):
            _, device, _ = topics.parse_topic(topic)
            st = decode_status(payload)
            if device == CLOUD_DEVICE and st.state in ("online", "training"):
                online.set()
            if device == CLOUD_DEVICE and st.state == "done":
                done.set()

        with open_link(broker.url, f"bench-pub-{broker_kind}") as link:
            link.subscribe(topics.status_wildcard(run), on_status)
            link.connect(timeout=30)
            if not online.wait(120):
                raise RuntimeError(f"cloud trainer did not come online: {procs.tail('cloud')}")
            link.publish(topics.status_topic(run, dev),
                         Status(role="edge", device=dev, run=run, state="online").encode(),
                         retain=True)
            t = time.perf_counter()
            for m in msgs:
                link.publish(topics.act_topic(run, dev), m)
            publish_s = time.perf_counter() - t
            link.publish(topics.status_topic(run, dev),
                         Status(role="edge", device=dev, run=run, state="done",
                                batches_published=n, last_seq=n - 1).encode(), retain=True)
            ok = done.wait(600)
            total_s = time.perf_counter() - t
        procs.wait("cloud", timeout=120)
    summary = json.loads((run_dir / "cloud_summary.json").read_text()) if ok else {}
    t = time.perf_counter()
    for m in msgs:
        _ = decode(m, expected_run_id=run).tensor  # decoding is the work timed
    decode_s = (time.perf_counter() - t) / n
    mb = sum(len(m) for m in msgs) / 1e6
    row = {"broker": broker_kind, "batches": n, "batch": manifest.batch_size,
           "message_bytes": len(msgs[0]), "publish_s": publish_s, "until_trained_s": total_s,
           "trained": summary.get("batches_trained"), "trained_batches_per_s": n / total_s,
           "ingest_mb_per_s": mb / total_s, "publish_mb_per_s": mb / publish_s,
           "decode_dequantize_ms": decode_s * 1e3}
    print(f"  cloud on {broker_kind:<9} {n} batches: published in {publish_s:.1f} s, trained in "
          f"{total_s:.1f} s -> {row['trained_batches_per_s']:.0f} batches/s "
          f"({row['ingest_mb_per_s']:.2f} MB/s); decode+dequantize "
          f"{row['decode_dequantize_ms']:.2f} ms/msg; trained={row['trained']}", flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=600, help="batches for the ingest part")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/runtime_throughput.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        print("A. edge training step, per backend (no network)")
        edge = edge_throughput(tmp)
        print("B. cloud trainer ingest (real broker on 127.0.0.1, cloud-trainer process)")
        brokers = ["amqtt"] + (["mosquitto"] if find_mosquitto() else [])
        cloud = [cloud_ingest(tmp, b, args.batches) for b in brokers]
    result = {"machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "torch": torch.__version__,
                          "load_average_at_end": os.getloadavg()},
              "edge": edge, "cloud": cloud, "command": " ".join(sys.argv)}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
