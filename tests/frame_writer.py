"""A camera stand-in for tests/test_stream_data.py: writes frames into a directory over time.

Not a test module. Writes the images of ``FRAMES.npz`` (``x`` uint8 N x H x W, ``y``
labels) as ``DIR/f<index>.png`` from ``--first`` on, ``--per-tick`` of them every
``--tick`` seconds, each under a temporary name renamed into place (a reader never sees
half a frame), its label appended to ``DIR/labels.csv`` after the frame exists. Prints one
line per tick (``wrote <first>..<last> at <unix time>``) and exits when all are written.

    python tests/frame_writer.py FRAMES.npz DIR --first 16 --per-tick 16 --tick 0.3
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("frames", type=Path)
    ap.add_argument("dir", type=Path)
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--per-tick", type=int, default=16)
    ap.add_argument("--tick", type=float, default=0.3)
    args = ap.parse_args()
    with np.load(args.frames) as f:
        x, y = f["x"], f["y"]
    for start in range(args.first, len(x), args.per_tick):
        stop = min(start + args.per_tick, len(x))
        for i in range(start, stop):
            tmp = args.dir / f".f{i:05d}.png"
            Image.fromarray(x[i]).save(tmp)
            os.replace(tmp, args.dir / f"f{i:05d}.png")
        with open(args.dir / "labels.csv", "a") as f:
            f.writelines(f"f{i:05d}.png,{int(y[i])}\n" for i in range(start, stop))
        print(f"wrote {start}..{stop - 1} at {time.time():.3f}", flush=True)
        time.sleep(args.tick)


if __name__ == "__main__":
    main()
