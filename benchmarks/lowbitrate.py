"""HT vs split learning vs cloud training on low bit-rate links: the paper's runtime comparison.

Thin wrapper over ``toolkit bench`` (see ``toolkit/lab/bench.py`` for what each run
does and why the schedule looks like this) with the configuration whose results
are committed under ``benchmarks/results/lowbitrate*``. Every row is a real run
of a broker, a cloud trainer and an edge runtime as processes on this machine.

    python benchmarks/lowbitrate.py            # the committed configuration (~1 h on 2 cores)
    python benchmarks/lowbitrate.py --quick    # a smoke run: smallcnn, two rates, few samples

Extra arguments are passed to ``toolkit bench`` and override the defaults.
"""

from __future__ import annotations

import sys

from toolkit.cli import main

COMMITTED = ["bench", "--models", "vgg16,resnet18", "--rates", "0.5,2,10,50",
             "--latency-ms", "20", "--codec", "int8", "--extra-codecs",
             "int4+deflate,int2+deflate", "--samples", "512", "--max-link-s", "200",
             "--split-grad-bits", "32,8",
             "--accuracy-samples", "1024", "--accuracy-epochs", "2"]
QUICK = ["bench", "--models", "smallcnn", "--rates", "0.5,10", "--samples", "128",
         "--accuracy-samples", "256", "--accuracy-epochs", "1", "--eval-limit", "200",
         "--out", "benchmarks/results/quick", "--data", "digits"]

if __name__ == "__main__":
    extra = sys.argv[1:]
    if "--quick" in extra:
        extra.remove("--quick")
        sys.exit(main([*QUICK, *extra]))
    sys.exit(main([*COMMITTED, *extra]))
