"""``edge-runtime`` command line: ``train``, ``infer``, ``cluster``, ``personalise`` and
``provision``.

User errors print ``error: ...`` and exit with a distinct code (``toolkit.core.entry``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from edge_runtime import personal_cli
from edge_runtime.config import BACKENDS, DEFAULT_GRAD_TIMEOUT, DEFAULT_MODE, MODES
from toolkit.core.entry import new_parser, run
from toolkit.core.security import add_security_args


def _setup(args: argparse.Namespace) -> None:
    """Logging to stderr (connect retries, epoch lines) and the torch thread count."""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="edge-runtime: %(message)s", stream=sys.stderr)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def _check_link(args: argparse.Namespace) -> None:
    """Bad --link-* values fail in a second, before torch is imported."""
    from toolkit.core.transport import LinkShape

    LinkShape.from_options(args.link_kbps, args.link_latency_ms)


def _security(args: argparse.Namespace) -> None:
    """--username/--password-file/--ca-file/.../--hmac-key-file (and the environment) checked
    once and kept in ``args.security``; a password inside --broker is refused here."""
    from toolkit.core.security import security_from_args

    args.security = security_from_args(args, args.broker)


def _broker(args: argparse.Namespace) -> str:
    """--broker, or the serial:// URL that --serial/--baud stand for."""
    if args.serial:
        from toolkit.core.transport.serial_link import serial_url

        return serial_url(args.serial, args.baud)
    if not args.broker:
        from toolkit.core.errors import HiertrainError

        raise HiertrainError("give --broker mqtt://host[:port] or --serial PORT [--baud N]")
    return args.broker


def cmd_provision(args: argparse.Namespace) -> int:
    _setup(args)
    from edge_runtime.provision import ProvisionConfig, run_provisioning

    print(json.dumps(run_provisioning(ProvisionConfig(
        port=args.port, baud=args.baud, dest=args.dest, timeout=args.timeout))))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _check_link(args)
    _setup(args)
    args.broker = _broker(args)
    _security(args)
    from edge_runtime.train import TrainConfig, run_training

    summary = run_training(TrainConfig(
        artifacts=args.artifacts, broker=args.broker, device_id=args.device_id, data=args.data,
        run_id=args.run_id, epochs=args.epochs, backend=args.backend, shard=args.shard,
        seed=args.seed, limit=args.limit, quiet=args.quiet,
        connect_timeout=args.connect_timeout, report=args.report, state_dir=args.state_dir,
        link_kbps=args.link_kbps, link_latency_ms=args.link_latency_ms,
        mode=args.mode, grad_timeout=args.grad_timeout, float_act=args.float_act,
        security=args.security,
        codec=args.codec, resume=args.resume, spool_dir=args.spool_dir, spool_mb=args.spool_mb,
        checkpoint_every=args.checkpoint_every, confirm_timeout=args.confirm_timeout,
    ))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    if summary["mode"] != "ht":
        print(f"{summary['device']}: --mode {summary['mode']}, {summary['epochs']} epoch(s), "
              f"{summary['batches_published']} batches ({summary['samples']} samples) in "
              f"{summary['wall_s']:.1f} s; {summary['bytes_up']} B up, {summary['bytes_down']} "
              f"B down ({summary['payload_bytes_per_sample']:.0f} B/sample on the wire)")
        return 0
    print(f"{summary['device']}: {summary['epochs']} epoch(s), {summary['batches_published']} "
          f"batches ({summary['samples_published']} samples) published in "
          f"{summary['wall_s']:.1f} s ({summary['batches_per_s']:.1f} batches/s, "
          f"{summary['backend']}); exit accuracy {summary['exit_accuracy']:.3f}; "
          f"{summary['payload_bytes_per_sample']:.0f} B/sample on the wire "
          f"({summary['codec']}) "
          f"(float32 cut: {summary['float32_bytes_per_sample']} B); blocked on the link "
          f"{summary['publish_wait_s']:.2f} s; weights saved to {summary['weights_path']}")
    if summary.get("link"):
        ln = summary["link"]
        print(f"shaped link {ln['kbps'] or 'unlimited'} kbit/s, {ln['latency_ms']:g} ms: "
              f"{ln['bytes_charged']} bytes charged, publisher blocked {ln['blocked_s']:.2f} s")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    _check_link(args)
    _setup(args)
    from toolkit.build.personal_export import is_personal

    if is_personal(args.artifacts):  # multi-exit artifacts of 'toolkit export --personalise'
        return personal_cli.cmd_infer_personal(args)
    if not (args.broker or args.serial) or not args.device_id:
        personal_cli.require_broker(args)
    args.broker = _broker(args)
    _security(args)
    from edge_runtime.infer import InferConfig, format_table, run_inference

    result = run_inference(InferConfig(
        artifacts=args.artifacts, broker=args.broker, device_id=args.device_id, data=args.data,
        run_id=args.run_id, threshold=0.8 if args.threshold is None else args.threshold,
        limit=args.limit, weights=args.weights,
        timeout=args.timeout, backend=args.backend, seed=args.seed, quiet=args.quiet,
        connect_timeout=args.connect_timeout, report=args.report,
        link_kbps=args.link_kbps, link_latency_ms=args.link_latency_ms,
        security=args.security,
    ))
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(
        prog="edge-runtime",
        description="hiertrain edge device: train the edge segment and stream int8 cut "
                    "activations over MQTT; hierarchical inference",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, cloud: bool = True) -> None:
        sp.add_argument("--artifacts", required=True, help="'toolkit export' output directory")
        sp.add_argument("--broker", default=None,
                        help="mqtt://host[:port], mqtts://... or serial:///dev/ttyUSB0?baud=N")
        sp.add_argument("--serial", default=None,
                        help="serial port to a 'toolkit gateway' instead of --broker")
        sp.add_argument("--baud", type=int, default=115200, help="with --serial (default 115200)")
        sp.add_argument("--device-id", required=cloud, help="this device's id (A-Za-z0-9_.-)")
        sp.add_argument("--data", default=None,
                        help="dataset: digits (default), .npz, cifar-10-batches-py, ImageFolder")
        sp.add_argument("--run-id", default="default")
        sp.add_argument("--backend", choices=BACKENDS, default="executorch")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--connect-timeout", type=float, default=30.0,
                        help="seconds to keep retrying the broker (default 30)")
        sp.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: torch's choice); 1 is fastest for small "
                             "models and when several processes share the CPUs")
        sp.add_argument("--report", default=None, help="write a JSON report here")
        sp.add_argument("--json", action="store_true", help="print the result as JSON")
        sp.add_argument("--quiet", action="store_true", help="no progress bars or info logs")
        sp.add_argument("--link-kbps", type=float, default=None, metavar="KBPS",
                        help="model a slow uplink: send at most KBPS kbit/s, counting whole MQTT "
                             "packets (default: unlimited; docs/runtime.md 'Link shaping')")
        sp.add_argument("--link-latency-ms", type=float, default=0.0, metavar="MS",
                        help="with --link-kbps or alone: one-way latency added to every message")
        add_security_args(sp)

    sp = sub.add_parser("train", help="train on the local shard and publish cut activations")
    common(sp)
    sp.add_argument("--epochs", type=_positive_int, default=3)
    sp.add_argument("--shard", default="0/1",
                    help="INDEX/COUNT: this device's strided share of the dataset (default 0/1)")
    sp.add_argument("--limit", type=_positive_int, default=None,
                    help="use only this many training samples (before sharding)")
    sp.add_argument("--state-dir", default=".",
                    help="where to save edge_weights-<device>.pt (default: current directory)")
    sp.add_argument("--codec", default=None,
                    help="activation codec (int8, int4, int2, int8+deflate, int4+deflate, "
                         "int2+deflate, float32; default: the manifest's)")
    sp.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                    help="ht: this method (default); split: classic split learning, waits for "
                         "the cloud's gradient every batch (torch backend); cloud: upload the "
                         "raw images, the cloud trains everything. The cloud trainer must run "
                         "the same --mode")
    sp.add_argument("--grad-timeout", type=float, default=DEFAULT_GRAD_TIMEOUT, metavar="S",
                    help="split: seconds to wait for the cloud trainer and for each gradient "
                         f"(default {DEFAULT_GRAD_TIMEOUT:g})")
    sp.add_argument("--float-act", action="store_true",
                    help="split: send the cut activation as raw float32 instead of the "
                         "manifest's quantization")
    sp.add_argument("--resume", action="store_true",
                    help="continue from the checkpoint and spool in --state-dir/--spool-dir "
                         "(after a crash or power loss); without it the run starts afresh")
    sp.add_argument("--spool-dir", default=None,
                    help="where the on-disk outbox lives (default: --state-dir)")
    sp.add_argument("--spool-mb", type=float, default=None, metavar="MB",
                    help="spool budget; when full, training waits (default: the board "
                         "profile's mqtt.spool_mb)")
    sp.add_argument("--checkpoint-every", type=_positive_int, default=20, metavar="N",
                    help="checkpoint the edge every N batches (default 20)")
    sp.add_argument("--confirm-timeout", type=float, default=300.0, metavar="S",
                    help="at the end, wait up to S seconds until the cloud trainer acked every "
                         "batch (default 300; 0: do not wait; docs/delivery.md)")
    # --backend: executorch for ht, torch for split, none for cloud (resolve_backend)
    sp.set_defaults(func=cmd_train, backend=None)

    sp = sub.add_parser("infer", help="early-exit inference, asking the cloud when unsure")
    common(sp, cloud=False)  # personalised multi-exit artifacts need no cloud
    sp.add_argument("--threshold", type=float, default=None,
                    help="exit softmax confidence needed to answer locally (default 0.8; for "
                         "personalised artifacts: overrides the calibrated thresholds)")
    sp.add_argument("--limit", type=_positive_int, default=200,
                    help="number of test samples (default 200)")
    sp.add_argument("--weights", default=None,
                    help="edge_weights-<device>.pt from training, or 'retained' to take the "
                         "device's retained weights from the broker (default: initial weights)")
    sp.add_argument("--timeout", type=float, default=10.0,
                    help="seconds to wait for each cloud reply (default 10)")
    personal_cli.add_scenario_args(sp)
    sp.add_argument("--compare-full", action="store_true",
                    help="personalised artifacts: also time the original network per sample")
    sp.add_argument("--bake", action="store_true",
                    help="personalised artifacts on executorch: first re-lower the policy's "
                         "segments with the exit weights as constants (skips never-answering "
                         "exits; XNNPACK takes conv exit heads)")
    sp.set_defaults(func=cmd_infer)

    sp = sub.add_parser("provision", help="wait for 'toolkit flash' on a serial port")
    sp.add_argument("--port", required=True, help="serial port, e.g. /dev/ttyGS0")
    sp.add_argument("--baud", type=int, default=115200)
    sp.add_argument("--dest", required=True, help="artifacts directory to install into")
    sp.add_argument("--timeout", type=float, default=None,
                    help="give up after this many seconds (default: wait forever)")
    sp.add_argument("--threads", type=_positive_int, default=None, help=argparse.SUPPRESS)
    sp.add_argument("--quiet", action="store_true", help="no info logs")
    sp.set_defaults(func=cmd_provision)

    from edge_runtime.cluster_run import add_parser as add_cluster_parser

    add_cluster_parser(sub, common)

    def runtime_only(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--backend", choices=BACKENDS, default="executorch")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
        sp.add_argument("--json", action="store_true", help="print the result as JSON")
        sp.add_argument("--quiet", action="store_true", help="no progress bars or info logs")

    personal_cli.add_personalise_parser(sub, runtime_only)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv, build_parser)


if __name__ == "__main__":
    sys.exit(main())
