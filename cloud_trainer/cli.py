"""``cloud-trainer`` command line.

Training is the default command, so ``cloud-trainer --artifacts A --broker B
--run-dir R`` trains; ``cloud-trainer serve ...`` only answers inference.
User errors print one line and exit with a distinct code (``toolkit.core.entry``): 3 for
bad input, 4 when the broker is unreachable, 5 when the run ends with devices missing
or incomplete. ``--json`` prints the run's summary (``serve``: its result) as one JSON
object on stdout, also on exit 5; logs stay on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from toolkit.core.entry import new_parser, run
from toolkit.core.protocol.modes import DEFAULT_MODE, MODES
from toolkit.core.security import add_security_args, security_from_args

COMMANDS = ("train", "serve", "status")


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


def _print_json(result: dict[str, Any]) -> None:
    """One JSON object, one line, on stdout; logs and the progress bar are on stderr."""
    print(json.dumps(result, sort_keys=True))


def cmd_train(args: argparse.Namespace) -> int:
    _check_link(args)
    if args.workers > 1 and "WORLD_SIZE" not in os.environ:  # start the group: workers.py
        from cloud_trainer.group import check_group_options
        from cloud_trainer.workers import launch_workers, strip_workers

        # before any worker starts (and restarts)
        check_group_options(args.mode, args.amp, args.fleet_average)
        _setup_logging(args.quiet)
        return launch_workers(args.workers, strip_workers(_ARGV), max_restarts=args.max_restarts,
                              run_dir=args.run_dir)
    security = security_from_args(args)
    security.require_run_key("cloud-trainer")  # in a second, before torch is imported
    from cloud_trainer.checkpoint import SUMMARY, ensure_run_dir

    ensure_run_dir(args.run_dir)  # seconds before torch is imported
    from cloud_trainer.trainer import CloudConfig, run_cloud
    from toolkit.core.errors import RunIncompleteError

    _setup_logging(args.quiet)
    cfg = CloudConfig(
        artifacts=args.artifacts, broker=args.broker, run_dir=args.run_dir, run_id=args.run_id,
        devices=args.devices, device_ids=args.device_ids, eval_data=args.eval_data,
        eval_every=args.eval_every, eval_limit=args.eval_limit, idle_timeout=args.idle_timeout,
        queue_size=args.queue_size, checkpoint_every=args.checkpoint_every, quiet=args.quiet,
        connect_timeout=args.connect_timeout, threads=args.threads,
        link_kbps=args.link_kbps, link_latency_ms=args.link_latency_ms, mode=args.mode,
        grad_bits=args.grad_bits, security=security, session_expiry=args.session_expiry,
        device=args.device, amp=args.amp, eval_interval=args.eval_interval,
        infer_max_age=args.infer_max_age, tensorboard=args.tensorboard, trace=args.trace,
        fleet_average=args.fleet_average, fleet_average_wait=args.fleet_average_wait,
        fleet_average_quorum=args.fleet_average_quorum,
    )
    try:
        with _stop_on_sigterm() as stop:
            s = run_cloud(cfg, stop)
    except RunIncompleteError as exc:  # exit 5; the summary of what was trained still counts
        summary = getattr(exc, "summary", None)
        if args.json and summary is not None:
            _print_json(summary)
        if "WORLD_SIZE" in os.environ:
            # In a group, any other exit code makes the launcher restart the workers; the
            # run is over, and --workers reads exit code 5 from the summary (workers.py).
            logging.getLogger("cloud_trainer").error("%s", exc)
            return 0
        raise
    if "worker" in s:  # one worker of a group that is not the leader: the leader reports
        if not args.json:
            print(f"worker {s['worker']}: trained {s['batches_trained_here']} batches ({s['end']})")
        return 0
    if args.json:
        _print_json(s)
        return 0
    per = ", ".join(f"{d}: {v['trained']}/{v['published']}" for d, v in s["per_device"].items())
    dropped = sum(s["dropped"].values())
    exit_acc = "-" if s["exit_accuracy"] is None else f"{s['exit_accuracy']:.3f}"
    print(f"--mode {s['mode']}: trained {s['batches_trained']} batches ({per}); full accuracy "
          f"{s['full_accuracy']:.3f}, exit accuracy {exit_acc}; "
          f"{dropped} message(s) dropped; summary in {cfg.run_dir}/{SUMMARY}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    _check_link(args)
    security = security_from_args(args)
    security.require_run_key("cloud-trainer serve")
    from cloud_trainer.serve import ServeConfig, serve_cloud

    _setup_logging(args.quiet)
    cfg = ServeConfig(artifacts=args.artifacts, broker=args.broker, run_dir=args.run_dir,
                      run_id=args.run_id, duration=args.duration,
                      connect_timeout=args.connect_timeout, quiet=args.quiet,
                      link_kbps=args.link_kbps, link_latency_ms=args.link_latency_ms,
                      security=security)
    with _stop_on_sigterm() as stop:
        result = serve_cloud(cfg, stop)
    if args.json:
        _print_json(result)
    else:
        print(f"answered {result['answered']} inference request(s), refused "
              f"{result['refused']}; {sum(result['dropped'].values())} message(s) dropped")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from cloud_trainer.fleet_status import format_status, read_status

    status = read_status(args.run_dir)
    if args.json:
        _print_json(status)
    else:
        print(format_status(status))
    return 0


def _common(p: argparse.ArgumentParser) -> None:
    """The flags ``train`` and ``serve`` share. Required flags show no default."""
    p.add_argument("--artifacts", required=True, default=argparse.SUPPRESS, metavar="DIR",
                   help="artifacts directory of 'toolkit export'")
    p.add_argument("--broker", required=True, default=argparse.SUPPRESS, metavar="URL",
                   help="broker URL, e.g. mqtt://127.0.0.1:1883 (mqtts:// for TLS)")
    p.add_argument("--run-dir", required=True, default=argparse.SUPPRESS, metavar="DIR",
                   help="where checkpoints, metrics and models go")
    p.add_argument("--run-id", default="default", metavar="ID",
                   help="run id shared with the edges")
    p.add_argument("--connect-timeout", type=float, default=30.0, metavar="S",
                   help="seconds to keep trying the broker before giving up (exit 4)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object on stdout (logs stay on stderr)")
    p.add_argument("--link-kbps", type=float, metavar="KBPS",
                   help="model a slow downlink: publish at most KBPS kbit/s, counting whole MQTT "
                        "packets (None: unlimited; docs/runtime.md 'Link shaping')")
    p.add_argument("--link-latency-ms", type=float, default=0.0, metavar="MS",
                   help="one-way latency added to every message the cloud publishes")
    add_security_args(p)  # --hmac-key-file: the run key (each device's key is derived from it)


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser(
        prog="cloud-trainer",
        description="Train the cloud segment on int8 activations from edge devices over MQTT "
                    "(default command), or serve hierarchical inference with a trained one.",
        epilog="exit codes: 0 done, 1 bug, 2 usage, 3 bad input or configuration, "
               "4 broker unreachable, 5 run incomplete (devices missing at the idle timeout), "
               "130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,serve,status}")
    t = sub.add_parser("train", help="train (the default when no command is given)",
                       description="Train the cloud segment until every expected edge is done "
                                   "(or --idle-timeout passes); --json prints the summary.")
    _common(t)
    who = t.add_mutually_exclusive_group()
    who.add_argument("--devices", type=int, metavar="N",
                     help="expect N edge devices, the first N that come online (None, without "
                          "--device-ids: train every device that comes online)")
    who.add_argument("--device-ids", type=_ids, metavar="A,B",
                     help="expect exactly these edge device ids (None: see --devices)")
    t.add_argument("--eval-data", metavar="SOURCE",
                   help="held-out data: digits, .npz, cifar-10-batches-py or ImageFolder; its "
                        "test split (None: the digits test split)")
    t.add_argument("--eval-every", type=int, metavar="N",
                   help="also evaluate every N batches trained (None: only when edge weights "
                        "arrive, and at the end)")
    t.add_argument("--eval-limit", type=int, metavar="N",
                   help="evaluate on the first N held-out samples (None: all of them)")
    t.add_argument("--idle-timeout", type=float, default=120.0, metavar="S",
                   help="finish after S seconds without any message (exit 5 if devices are "
                        "missing or incomplete then)")
    t.add_argument("--queue-size", type=int, default=64, metavar="N",
                   help="activation batches buffered before back-pressure")
    t.add_argument("--checkpoint-every", type=int, default=50, metavar="N",
                   help="checkpoint (and ack to the edges) every N batches trained")
    t.add_argument("--threads", type=int, metavar="N",
                   help="torch threads (None: torch's choice; use 1 on a machine shared with "
                        "edges)")
    t.add_argument("--device", default="auto", metavar="DEV",
                   help="auto (a GPU when torch sees one), cpu, cuda or cuda:N")
    t.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off",
                   help="mixed precision of the cloud's step: bf16 (CPU or recent GPUs) or fp16 "
                        "(GPU, loss-scaled); off trains in float32 like the edge")
    t.add_argument("--eval-interval", type=float, default=0.0, metavar="S",
                   help="at least S seconds between the starts of two evaluations (they run "
                        "on their own thread, one per edge at most pending)")
    t.add_argument("--infer-max-age", type=float, default=1.0, metavar="S",
                   help="inference answers use a copy of the cloud segment at most S seconds "
                        "old")
    t.add_argument("--workers", type=int, default=1, metavar="N",
                   help="train with N local worker processes that share the activations (MQTT 5 "
                        "shared subscription; a mosquitto 2 broker) and keep one model in sync "
                        "(torch.distributed); several machines: torchrun (docs/fleet.md)")
    t.add_argument("--max-restarts", type=int, default=3, metavar="N",
                   help="--workers: restart the group up to N times when a worker dies")
    t.add_argument("--trace", metavar="FILE",
                   help="append a JSON line per trained batch (device, seq, n, trained: unix "
                        "time) to FILE, e.g. for publish-to-trained latency")
    t.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="no TensorBoard event files in run-dir/tensorboard (they are written "
                        "when the tensorboard package is installed)")
    t.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                   help="ht: train the cloud segment on the edges' activations; "
                        "split: classic split learning, send each activation's gradient back; "
                        "cloud: train the whole network on the images the edges upload. "
                        "The edges must run the same --mode")
    t.add_argument("--grad-bits", type=int, choices=(32, 8), default=32,
                   help="split: gradients sent back as float32 (32) or int8 (8)")
    t.add_argument("--fleet-average", action="store_true",
                   help="the fleet's model: at each epoch end average the edges' segments "
                        "(sample-weighted, BatchNorm statistics included) and send the average "
                        "back to every device as its next start; the edges run with "
                        "--fleet-average too (docs/fleet.md)")
    t.add_argument("--fleet-average-wait", type=float, metavar="S",
                   help="--fleet-average: after the first device delivers an epoch, wait at "
                        "most S seconds for the others, then average those that delivered "
                        "(None: 120)")
    t.add_argument("--fleet-average-quorum", type=int, metavar="N",
                   help="--fleet-average: fewest devices an average may have once the wait ran "
                        "out; fewer skip that epoch's average (None: 1)")
    t.add_argument("--session-expiry", type=int, default=3600, metavar="S",
                   help="seconds the broker keeps this trainer's MQTT session and the batches "
                        "queued for it while it is down (0: clean sessions; docs/delivery.md)")
    t.set_defaults(func=cmd_train)
    s = sub.add_parser("serve", help="answer inference requests with run-dir/cloud_final.pt",
                       description="Answer hierarchical inference requests with a finished "
                                   "run's cloud segment until SIGTERM, Ctrl-C or --duration.")
    _common(s)
    s.add_argument("--duration", type=float, metavar="S",
                   help="stop after S seconds (None: until SIGTERM or Ctrl-C)")
    s.set_defaults(func=cmd_serve)
    st = sub.add_parser("status", help="the fleet of a run at a glance (run-dir/fleet_status.json)",
                        description="Print the fleet status a running (or finished) trainer "
                                    "writes every few seconds: per edge batches trained, lag, "
                                    "queue wait, last seen, accuracy.")
    st.add_argument("--run-dir", required=True, metavar="DIR", help="the trainer's --run-dir")
    st.add_argument("--json", action="store_true", help="print the file's JSON")
    st.set_defaults(func=cmd_status)
    return parser


def _with_default_command(argv: Sequence[str]) -> list[str]:
    args = list(argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("-h", "--help", "--version")):
        args.insert(0, "train")
    return args


_ARGV: list[str] = []
"""The command line being run (``--workers`` hands it, less that flag, to each worker)."""


def main(argv: Sequence[str] | None = None) -> int:
    args: Any = sys.argv[1:] if argv is None else argv
    _ARGV[:] = _with_default_command(args)
    return run(list(_ARGV), build_parser)


if __name__ == "__main__":
    sys.exit(main())
