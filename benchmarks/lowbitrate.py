"""HT vs split learning vs cloud training on low bit-rate links: the paper's runtime comparison.

Thin wrapper over ``toolkit bench`` (see ``toolkit/lab/bench.py`` for what each run
does and why the schedule looks like this) with the configurations whose results
are committed under ``benchmarks/results/lowbitrate*``. Every row is a real run
of a broker, a cloud trainer and an edge runtime as processes on this machine;
the ht edge runs the exported ExecuTorch program (the default lowering), and
every runtime point is run three times.

    python benchmarks/lowbitrate.py            # the committed sweep: VGG-16, ResNet-18
    python benchmarks/lowbitrate.py --camera   # 224x224 frames, MobileNetV3-small, planned split
    python benchmarks/lowbitrate.py --quick    # a smoke run: smallcnn, two links, few samples

Extra arguments are passed to ``toolkit bench`` and override the defaults.
"""

from __future__ import annotations

import sys

from toolkit.cli import main

LINKS = "0.5/0.5,2/2,10/10,50/50,2/20,10/50"  # symmetric, and two uplink-limited ones
COMMITTED = ["bench", "--models", "vgg16,resnet18", "--splits", "vgg16=stage2,resnet18=layer3",
             "--links", LINKS, "--repeats", "3",
             "--latency-ms", "20", "--codec", "int8", "--extra-codecs",
             "int4+deflate,int2+deflate", "--samples", "512", "--max-link-s", "200",
             "--split-grad-bits", "32,8",
             "--accuracy-samples", "1024", "--accuracy-epochs", "2"]
# Where HT beats uploading images: camera-sized frames (147 KB), the split toolkit plan picks
# for each link; runtime only (the frames are the bench's data upscaled, see toolkit bench
# --input-shape).
CAMERA = ["bench", "--models", "torchvision:mobilenet_v3_small",
          "--splits", "torchvision:mobilenet_v3_small=plan", "--input-shape", "3,224,224",
          "--links", "0.5/0.5,2/20,10/50,50/50", "--modes", "ht,cloud", "--repeats", "3",
          "--schedules", "runtime",
          "--samples", "256", "--max-link-s", "200", "--eval-limit", "200",
          "--out", "benchmarks/results/camera"]
QUICK = ["bench", "--models", "smallcnn", "--links", "0.5/0.5,2/20", "--samples", "128",
         "--repeats", "2", "--accuracy-samples", "256", "--accuracy-epochs", "1",
         "--eval-limit", "200", "--out", "benchmarks/results/quick", "--data", "digits"]

if __name__ == "__main__":
    extra = sys.argv[1:]
    for flag, preset in (("--quick", QUICK), ("--camera", CAMERA)):
        if flag in extra:
            extra.remove(flag)
            sys.exit(main([*preset, *extra]))
    sys.exit(main([*COMMITTED, *extra]))
