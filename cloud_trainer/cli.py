"""``cloud-trainer`` command line.

Training is the default command, so ``cloud-trainer --artifacts A --broker B
--run-dir R`` trains; ``cloud-trainer serve ...`` only answers inference.
User errors print one line and exit with a distinct code (``toolkit.core.entry``).
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from toolkit.core.entry import new_parser, run
from toolkit.core.protocol.modes import DEFAULT_MODE, MODES
from toolkit.core.security import add_security_args, security_from_args

COMMANDS = ("train", "serve")


def _ids(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )


@contextmanager
def _stop_on_sigterm() -> Iterator[threading.Event]:
    """SIGTERM sets the event: the run finishes cleanly (checkpoint, summary) and exits."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def _check_link(args: argparse.Namespace) -> None:
    """Bad --link-* values fail in a second, before torch is imported."""
    from toolkit.core.transport import LinkShape

    LinkShape.from_options(args.link_kbps, args.link_latency_ms)


def cmd_train(args: argparse.Namespace) -> int:
    _check_link(args)
    security = security_from_args(args)
    from cloud_trainer.checkpoint import ensure_run_dir

    ensure_run_dir(args.run_dir)  # seconds before torch is imported
    from cloud_trainer.trainer import CloudConfig, run_cloud

    _setup_logging(args.quiet)
    cfg = CloudConfig(
        artifacts=args.artifacts, broker=args.broker, run_dir=args.run_dir, run_id=args.run_id,
        devices=args.devices, device_ids=args.device_ids, eval_data=args.eval_data,
        eval_every=args.eval_every, eval_limit=args.eval_limit, idle_timeout=args.idle_timeout,
        queue_size=args.queue_size, checkpoint_every=args.checkpoint_every, quiet=args.quiet,
        connect_timeout=args.connect_timeout, threads=args.threads,
        link_kbps=args.link_kbps, link_latency_ms=args.link_latency_ms, mode=args.mode,
        grad_bits=args.grad_bits, security=security, session_expiry=args.session_expiry,
    )
    with _stop_on_sigterm() as stop:
        s = run_cloud(cfg, stop)
    per = ", ".join(f"{d}: {v['trained']}/{v['published']}" for d, v in s["per_device"].items())
    dropped = sum(s["dropped"].values())
    exit_acc = "-" if s["exit_accuracy"] is None else f"{s['exit_accuracy']:.3f}"
    print(f"--mode {s['mode']}: trained {s['batches_trained']} batches ({per}); full accuracy "
          f"{s['full_accuracy']:.3f}, exit accuracy {exit_acc}; "
          f"{dropped} message(s) dropped; summary in {cfg.run_dir}/cloud_summary.json")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _check_link(args)
    security = security_from_args(args)
    from cloud_trainer.serve import ServeConfig, serve_cloud

    _setup_logging(args.quiet)
    cfg = ServeConfig(artifacts=args.artifacts, broker=args.broker, run_dir=args.run_dir,
                      run_id=args.run_id, duration=args.duration,
                      connect_timeout=args.connect_timeout, quiet=args.quiet,
                      link_kbps=args.link_kbps, link_latency_ms=args.link_latency_ms,
                      security=security)
    with _stop_on_sigterm() as stop:
        result = serve_cloud(cfg, stop)
    print(json.dumps(result))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--artifacts", required=True, help="artifacts directory of 'toolkit export'")
    p.add_argument("--broker", required=True, help="broker URL, e.g. mqtt://127.0.0.1:1883")
    p.add_argument("--run-dir", required=True, help="where checkpoints, metrics and models go")
    p.add_argument("--run-id", default="default", help="run id shared with the edges")
    p.add_argument("--connect-timeout", type=float, default=30.0, metavar="S")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--link-kbps", type=float, metavar="KBPS",
                   help="model a slow downlink: publish at most KBPS kbit/s, counting whole MQTT "
                        "packets (default: unlimited; docs/runtime.md 'Link shaping')")
    p.add_argument("--link-latency-ms", type=float, default=0.0, metavar="MS",
                   help="one-way latency added to every message the cloud publishes")
    add_security_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        prog="cloud-trainer",
        description="Train the cloud segment on int8 activations from edge devices over MQTT "
                    "(default command), or serve hierarchical inference with a trained one.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,serve}")
    t = sub.add_parser("train", help="train (the default when no command is given)")
    _common(t)
    who = t.add_mutually_exclusive_group()
    who.add_argument("--devices", type=int, metavar="N",
                     help="expect N edge devices (the first N that come online)")
    who.add_argument("--device-ids", type=_ids, metavar="A,B",
                     help="expect exactly these edge device ids")
    t.add_argument("--eval-data", help="held-out data (default: digits test split)")
    t.add_argument("--eval-every", type=int, metavar="N",
                   help="also evaluate every N batches (always when edge weights arrive)")
    t.add_argument("--eval-limit", type=int, metavar="N", help="evaluate on N test samples")
    t.add_argument("--idle-timeout", type=float, default=120.0, metavar="S",
                   help="finish after S seconds without any message (default 120)")
    t.add_argument("--queue-size", type=int, default=64, metavar="N",
                   help="activation batches buffered before back-pressure (default 64)")
    t.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="checkpoint every N batches trained (default 50)")
    t.add_argument("--threads", type=int, metavar="N",
                   help="torch threads (default: torch's choice; 1 on a machine shared with edges)")
    t.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help="ht: train the cloud segment on the edges' activations (default); "
                        "split: classic split learning, send each activation's gradient back; "
                        "cloud: train the whole network on the images the edges upload. "
                        "The edges must run the same --mode")
    t.add_argument("--grad-bits", type=int, choices=(32, 8), default=32,
                   help="split: gradients sent back as float32 (32, default) or int8 (8)")
    t.add_argument("--session-expiry", type=int, default=3600, metavar="S",
                   help="seconds the broker keeps this trainer's MQTT session and the batches "
                        "queued for it while it is down (default 3600; 0: clean sessions; "
                        "docs/delivery.md)")
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("serve", help="answer inference requests with run-dir/cloud_final.pt")
    _common(s)
    s.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    s.set_defaults(func=cmd_serve)
    return parser


def _with_default_command(argv: Sequence[str]) -> list[str]:
    args = list(argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("-h", "--help", "--version")):
        args.insert(0, "train")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args: Any = sys.argv[1:] if argv is None else argv
    return run(_with_default_command(args), build_parser)


if __name__ == "__main__":
    sys.exit(main())
