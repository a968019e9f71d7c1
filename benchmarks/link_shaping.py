"""How closely a ShapedLink holds its configured rate, and what it does to a small edge run.

Part A streams fixed-size messages through a real broker on 127.0.0.1 (mosquitto when
installed, else the embedded broker) for a few seconds per rate, with a producer faster than
the link, and reports the achieved rate (bytes charged / (last arrival - first send)), the
producer's blocked time and the scheduler's worst lateness. Part B (``--edge``) exports smallcnn
for digits and times ``edge-runtime train`` unshaped and shaped.

    python benchmarks/link_shaping.py [--edge]   # -> benchmarks/results/link_shaping.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from toolkit.core.transport import LinkShape, ShapedLink, open_link
from toolkit.core.transport.shaping import mqtt_publish_size
from toolkit.lab.broker import EmbeddedBroker, MosquittoBroker, find_mosquitto

ROOT = Path(__file__).resolve().parents[1]


def stream(url: str, kbps: float, seconds: float, size: int, latency_ms: float) -> dict[str, Any]:
    topic = f"bench/shape/{os.getpid()}/{kbps:g}"
    arrivals: queue.Queue[float] = queue.Queue()
    sub = open_link(url, f"bench-sub-{os.getpid()}")
    sub.subscribe(topic, lambda _t, _p, _props: arrivals.put(time.monotonic()))
    sub.connect(timeout=10)
    shape = LinkShape(kbps=kbps, latency_ms=latency_ms)
    link = ShapedLink(open_link(url, f"bench-pub-{os.getpid()}"), shape)
    link.connect(timeout=10)
    try:
        per_msg = mqtt_publish_size(topic, size, qos=1, protocol=link.protocol_version)
        n = max(2, round(seconds * shape.bytes_per_s / per_msg))
        t0 = time.monotonic()
        for _ in range(n):
            link.publish(topic, os.urandom(size))
        last = 0.0
        for _ in range(n):
            last = arrivals.get(timeout=seconds * 3 + 30)
    finally:
        link.close()
        sub.close()
    s = link.stats
    achieved = s.bytes_charged * 8 / (last - t0) / 1000
    return {"kbps": kbps, "latency_ms": latency_ms, "message_bytes": size, "messages": n,
            "bytes_charged": s.bytes_charged, "seconds": round(last - t0, 3),
            "achieved_kbps": round(achieved, 2),
            "error_pct": round(100 * (achieved - kbps) / kbps, 2),
            "producer_blocked_s": round(s.blocked_s, 3), "max_late_s": round(s.max_late_s, 4)}


def edge_runs(url: str, kbps: float) -> list[dict[str, Any]]:
    from toolkit.build.export import ExportConfig, export_artifacts
    from toolkit.core.data.datasets import digits_stats
    from toolkit.core.models.exits import ExitHeadConfig

    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / "art"
        mean, std = digits_stats()
        export_artifacts(ExportConfig(model="smallcnn", out=art, input_shape=(1, 8, 8),
                                      mean=mean, std=std, batch=32,
                                      exit=ExitHeadConfig(channels=16), verify=False))
        for rate in (None, kbps):
            rep = Path(tmp) / f"edge-{rate}.json"
            cmd = [sys.executable, "-m", "edge_runtime", "train", "--artifacts", str(art),
                   "--broker", url, "--device-id", "bench", "--run-id", f"bench{os.getpid()}",
                   "--epochs", "1", "--limit", "320", "--backend", "torch", "--threads", "1",
                   "--state-dir", tmp, "--report", str(rep), "--quiet"]
            if rate is not None:
                cmd += ["--link-kbps", str(rate)]
            subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, timeout=600)
            r = json.loads(rep.read_text())
            link = r.get("link") or {}
            out.append({"link_kbps": rate, "wall_s": round(r["wall_s"], 3),
                        "publish_wait_s": round(r["publish_wait_s"], 3),
                        "act_bytes_sent": r["act_bytes_sent"], "bytes_sent": r["bytes_sent"],
                        "bytes_charged": link.get("bytes_charged"),
                        "link_blocked_s": link.get("blocked_s"),
                        "lower_bound_s": (round(link["bytes_charged"] * 8 / (rate * 1000), 3)
                                          if rate else None)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--edge", action="store_true", help="also time a small edge-runtime run")
    args = ap.parse_args()
    broker = MosquittoBroker() if find_mosquitto() else EmbeddedBroker()
    with broker.start(timeout=10):
        cases = [(20.0, 200), (200.0, 1000), (200.0, 1000, 100.0), (2000.0, 8000),
                 (10000.0, 32000)]
        rows = []
        for case in cases:
            kbps, size, latency = (*case, 0.0) if len(case) == 2 else case
            row = stream(broker.url, kbps, args.seconds, size, latency)
            rows.append(row)
            print(f"{kbps:>8g} kbit/s, {size:>6} B msgs, latency {latency:g} ms: achieved "
                  f"{row['achieved_kbps']:.1f} kbit/s ({row['error_pct']:+.2f} %), "
                  f"max late {row['max_late_s'] * 1000:.1f} ms")
        edge = edge_runs(broker.url, 160.0) if args.edge else None
        if edge:
            for e in edge:
                print(f"edge train, link {e['link_kbps'] or 'unlimited'}: wall {e['wall_s']} s, "
                      f"charged {e['bytes_charged']} B, lower bound {e['lower_bound_s']} s")
    result = {"broker": type(broker).__name__, "host": platform.node(),
              "cpus": os.cpu_count(), "load_avg": os.getloadavg(), "streams": rows,
              "edge_train": edge}
    path = ROOT / "benchmarks" / "results" / "link_shaping.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
