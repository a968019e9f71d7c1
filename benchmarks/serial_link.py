"""Goodput and retransmissions of the serial ARQ channel at UART baud rates and byte error rates.

Two channels talk through two pseudo-terminals joined by a relay that flips a bit of a
byte with probability ``ber`` and drops a byte with probability ``ber / 2``. A pty has no
baud rate, so each sender paces its writes at the configured baud (10 bits a byte, 8N1),
emulating the UART. Each run sends activation-batch-sized messages one way for about
``--seconds`` of line time while the other way carries only ACKs.

Reported per run: goodput (message bytes delivered per second), its share of the raw line
rate (baud / 10 bytes/s), frames sent and retransmitted, frames the receiver rejected, and
that every message arrived intact and once. Also: stop-and-wait (window 1) against the
sliding window, and frame sizes (mtu) under errors.

    python benchmarks/serial_link.py            # -> benchmarks/results/serial_link.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
from pathlib import Path

import serial

from toolkit.core.transport.arq import ReliableChannel
from toolkit.lab.pty_relay import PtyRelay

RESULTS = Path(__file__).resolve().parent / "results" / "serial_link.json"


def run_one(baud: int, ber: float, *, window: int = 16, mtu: int = 256, seconds: float = 4.0,
            msg_bytes: int = 8192, seed: int = 0) -> dict:
    line_bps = baud / 10
    n = max(2, int(line_bps * seconds / msg_bytes))
    budget = line_bps * seconds  # bytes the line can carry in the run's time
    size = msg_bytes if budget >= 2 * msg_bytes else max(256, int(budget / 2))
    rng = random.Random(seed)
    msgs = [rng.randbytes(size) for _ in range(n)]
    with PtyRelay(corrupt=ber, drop=ber / 2, seed=seed) as relay:
        ports = [serial.Serial(p, baud, timeout=0.05) for p in relay.ports]
        tx = ReliableChannel(ports[0], baud=baud, window=window, mtu=mtu, name="tx")
        rx = ReliableChannel(ports[1], baud=baud, window=window, mtu=mtu, name="rx")
        got: list[bytes | None] = []
        limit = 30 * seconds + 60

        def sink() -> None:
            for _ in msgs:
                got.append(rx.recv(timeout=limit))
                if got[-1] is None:
                    return

        t = threading.Thread(target=sink)
        t0 = time.monotonic()
        t.start()
        for m in msgs:
            tx.send(m)
        t.join(timeout=limit)
        wall = time.monotonic() - t0
        extra = rx.recv(timeout=0.3)
        s_tx, s_rx = tx.stats_dict(), rx.stats_dict()
        for c in (tx, rx):
            c.close()
        for p in ports:
            p.close()
    payload = sum(map(len, msgs))
    return {
        "baud": baud, "byte_error_rate": ber, "window": window, "mtu": mtu,
        "messages": n, "message_bytes": size, "wall_s": round(wall, 3),
        "goodput_Bps": round(payload / wall, 1),
        "line_rate_Bps": line_bps,
        "efficiency": round(payload / wall / line_bps, 3),
        "frames_sent": s_tx["frames_sent"],
        "frames_retransmitted": s_tx["frames_retransmitted"],
        "retransmit_ratio": round(s_tx["frames_retransmitted"] / max(1, s_tx["frames_sent"]), 3),
        "frames_rejected_by_receiver": s_rx["bad_frames"],
        "acks_lost_or_rejected": s_tx["bad_frames"],
        "bytes_flipped": relay.stats.flipped, "bytes_dropped": relay.stats.dropped,
        "intact_exactly_once": got == msgs and extra is None,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=4.0, help="line time per run")
    ap.add_argument("--bauds", default="9600,57600,115200,921600")
    ap.add_argument("--bers", default="0,0.0001,0.001")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    bauds = [int(b) for b in args.bauds.split(",")]
    bers = [float(b) for b in args.bers.split(",")]
    runs, arq, mtus = [], [], []

    def show(r: dict) -> None:
        print(f"baud {r['baud']:>7} ber {r['byte_error_rate']:<7g} win {r['window']:>2} "
              f"mtu {r['mtu']:>4}: goodput {r['goodput_Bps']:>9.0f} B/s "
              f"({100 * r['efficiency']:5.1f}% of line) retx {r['frames_retransmitted']:>4}/"
              f"{r['frames_sent']:<4} rejected {r['frames_rejected_by_receiver']:>4} "
              f"ok={r['intact_exactly_once']}", flush=True)

    for baud in bauds:
        for ber in bers:
            runs.append(run_one(baud, ber, seconds=args.seconds))
            show(runs[-1])
    for window in (1, 16):  # stop-and-wait against the sliding window
        for ber in (0.0, 0.001):
            arq.append(run_one(115200, ber, window=window, seconds=args.seconds))
            show(arq[-1])
    for mtu in (64, 256, 1024):  # frame size under errors
        mtus.append(run_one(115200, 0.001, mtu=mtu, seconds=args.seconds))
        show(mtus[-1])
    result = {
        "benchmark": "serial_link",
        "command": "python benchmarks/serial_link.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "method": ("two pty pairs joined by a relay thread that flips a bit with probability "
                   "ber and drops a byte with probability ber/2; senders paced at the baud "
                   "(10 bits/byte) because a pty has no baud limit; one-way message stream, "
                   "ACKs the other way"),
        "by_baud_and_error_rate": runs,
        "stop_and_wait_vs_window": arq,
        "frame_size": mtus,
        "all_intact_exactly_once": all(r["intact_exactly_once"] for r in runs + arq + mtus),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if result["all_intact_exactly_once"] else 1


if __name__ == "__main__":
    sys.exit(main())
