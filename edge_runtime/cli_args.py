"""Arguments the ``edge-runtime`` sub-commands share (the help format is the core's,
``toolkit.core.entry``: defaults shown, a ``None`` default left to the help text).

A module of its own so that the sub-command modules (``cluster_run``,
``personal_cli``) take their arguments from here and never import ``cli.py``,
which imports them: no import cycle.
"""

from __future__ import annotations

import argparse
import logging
import sys

from edge_runtime.config import BACKENDS
from toolkit.core.lr_schedule import SCHEDULES
from toolkit.core.security import add_security_args

DATA_HELP = ("dataset: digits, an .npz file, a cifar-10-batches-py directory or an ImageFolder "
             "directory; unset: digits (bundled with scikit-learn)")
BACKEND_HELP = ("executorch: the exported program, as on a board; torch: eager PyTorch, the "
                "same math")


def positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def setup(args: argparse.Namespace) -> None:
    """Logging to stderr (connect retries, epoch lines) and the torch thread count."""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="edge-runtime: %(message)s", stream=sys.stderr)
    if args.threads is not None:
        import torch

        from toolkit.core.et_program import set_threads

        torch.set_num_threads(args.threads)
        set_threads(args.threads)  # ExecuTorch's own pool, else it takes every core


def add_threads(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--threads", type=positive_int, default=None, metavar="N",
                    help="torch CPU threads; unset: the --board profile's training.threads "
                         "where a sub-command takes --board, else torch's choice. 1 is fastest "
                         "for small models and when several processes share the CPUs")


def add_output(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--json", action="store_true", help="print the result as JSON")
    sp.add_argument("--quiet", action="store_true",
                    help="no progress bars or info logs (bars only show on a terminal anyway)")


def add_common_args(sp: argparse.ArgumentParser, *, cloud: bool = True,
                    backend_help: str = BACKEND_HELP) -> None:
    """The flags of the sub-commands that talk to a broker: train, infer, cluster."""
    sp.add_argument("--artifacts", required=True, help="'toolkit export' output directory")
    sp.add_argument("--broker", default=None,
                    help="mqtt://host[:port], mqtts://... or serial:///dev/ttyUSB0?baud=N")
    sp.add_argument("--serial", default=None, metavar="PORT",
                    help="serial port to a 'toolkit gateway' instead of --broker")
    sp.add_argument("--baud", type=int, default=115200, help="with --serial: the line's baud rate")
    sp.add_argument("--device-id", required=cloud, help="this device's id (A-Za-z0-9_.-)")
    sp.add_argument("--data", default=None, help=DATA_HELP)
    sp.add_argument("--run-id", default="default",
                    help="the run this device belongs to; the cloud trainer uses the same")
    sp.add_argument("--backend", choices=BACKENDS, default="executorch", help=backend_help)
    sp.add_argument("--seed", type=int, default=0, help="seed of the data order and sampling")
    sp.add_argument("--connect-timeout", type=float, default=30.0, metavar="S",
                    help="seconds to keep retrying the broker")
    add_threads(sp)
    sp.add_argument("--report", default=None, metavar="PATH",
                    help="write a JSON report here; unset: no report")
    add_output(sp)
    sp.add_argument("--link-kbps", type=float, default=None, metavar="KBPS",
                    help="model a slow uplink: send at most KBPS kbit/s, counting whole MQTT "
                         "packets; unset: unlimited (docs/runtime.md 'Link shaping')")
    sp.add_argument("--link-latency-ms", type=float, default=0.0, metavar="MS",
                    help="with --link-kbps or alone: one-way latency added to every message")
    add_security_args(sp)


def non_negative_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = -1
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return v


def augment_list(text: str):
    """``--augment flip,crop``: parsed once here into an ``Augment`` (docs/data.md)."""
    from toolkit.core.data.augment import Augment
    from toolkit.core.errors import HiertrainError

    try:
        return Augment.parse(text)
    except HiertrainError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_data_args(sp: argparse.ArgumentParser) -> None:
    """How ``train`` reads its data: streaming image folders (docs/data.md)."""
    sp.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                    help="image folders: processes decoding the next batches while the edge "
                         "trains (0: decode in the training process); unset: the cores this "
                         "process may use minus one")
    sp.add_argument("--augment", type=augment_list, default="none", metavar="LIST",
                    help="comma-separated augmentations, each image drawn anew every epoch: "
                         "flip (horizontal), crop (random shift by 1/8 of the size), color "
                         "(brightness/contrast/saturation +-20%%; image folders only); none: off")
    sp.add_argument("--lr-schedule", choices=SCHEDULES, default="constant",
                    help="the exported learning rate over the run: constant, or cosine down to "
                         "0 over --epochs (per batch); the cloud trainer follows the edge's "
                         "schedule")
    sp.add_argument("--max-batches", type=positive_int, default=None, metavar="N",
                    help="ht: stop after N batches in all, mid-epoch if need be (the checkpoint "
                         "keeps the position for --resume); unset: every epoch")


def add_live_args(sp: argparse.ArgumentParser) -> None:
    """``train --live``: online learning from a directory that keeps growing (docs/data.md)."""
    sp.add_argument("--live", action="store_true",
                    help="--data DIR keeps receiving frames: train on each new frame as it "
                         "arrives (mixed with replayed ones) until --idle-timeout passes "
                         "without one or --max-batches; --epochs does not apply")
    sp.add_argument("--labels", default=None, metavar="PATH|MODULE:FUNCTION",
                    help="--live: the frames' labels, a sidecar labels.csv (file,label) or "
                         "labels.jsonl ({\"file\", \"label\"}), or a function called with "
                         "each frame's path returning its label or None (not yet); unset: "
                         "DIR/labels.csv or DIR/labels.jsonl")
    sp.add_argument("--replay", type=non_negative_int, default=512, metavar="N",
                    help="--live: replay buffer capacity in frames (reservoir sampling); half "
                         "of each batch is replayed once it holds that many; 0: new frames only")
    sp.add_argument("--idle-timeout", type=float, default=60.0, metavar="S",
                    help="--live: end the run after S seconds without a new frame")


def add_runtime_only_args(sp: argparse.ArgumentParser) -> None:
    """The flags of the sub-commands that run without a broker (personalise)."""
    sp.add_argument("--backend", choices=BACKENDS, default="executorch", help=BACKEND_HELP)
    sp.add_argument("--seed", type=int, default=0,
                    help="seed of the data sample, the labelled share and the data order")
    add_threads(sp)
    add_output(sp)
