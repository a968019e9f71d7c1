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

from edge_runtime import cluster_run, personal_cli
from edge_runtime.board import apply_board
from edge_runtime.cli_args import (
    add_common_args,
    add_data_args,
    add_live_args,
    positive_int,
    setup,
)
from edge_runtime.config import DEFAULT_GRAD_TIMEOUT, DEFAULT_MODE, MODES, TrainConfig
from toolkit.core.entry import new_parser, run


def _check_link(args: argparse.Namespace) -> None:
    """Bad --link-* values fail in a second, before torch is imported."""
    from toolkit.core.transport import LinkShape

    LinkShape.from_options(args.link_kbps, args.link_latency_ms)


def _security(args: argparse.Namespace) -> None:
    """--username/--password-file/--ca-file/.../--hmac-key-file (and the environment) checked
    once and kept in ``args.security``; a password inside --broker is refused here, and so
    is a device key file made for another device or run (in a second, before torch)."""
    from toolkit.core.security import security_from_args

    args.security = security_from_args(args, args.broker)
    if args.device_id:
        args.security = args.security.for_device(args.run_id, args.device_id)


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
    setup(args)
    from edge_runtime.provision import ProvisionConfig, run_provisioning

    print(json.dumps(run_provisioning(ProvisionConfig(
        port=args.port, baud=args.baud, dest=args.dest, timeout=args.timeout))))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _check_link(args)
    board = apply_board(args)  # before setup(): the profile's threads are set there
    setup(args)
    if board is not None:
        logging.getLogger("edge_runtime").info("%s", board.describe())
    args.broker = _broker(args)
    _security(args)
    from edge_runtime.train import run_training
    from toolkit.core.errors import RunIncompleteError

    try:
        summary = run_training(_train_config(args))
    except RunIncompleteError as exc:  # exit 5; with --json the report still goes to stdout
        if args.json and getattr(exc, "summary", None) is not None:
            print(json.dumps(exc.summary, indent=2))  # type: ignore[attr-defined]
        raise
    return _print_train(args, summary)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        artifacts=args.artifacts, broker=args.broker, device_id=args.device_id, data=args.data,
        run_id=args.run_id, epochs=1 if args.live else args.epochs,  # live: one open pass
        backend=args.backend, shard=args.shard,
        seed=args.seed, limit=args.limit, quiet=args.quiet,
        connect_timeout=args.connect_timeout, report=args.report, state_dir=args.state_dir,
        link_kbps=args.link_kbps, link_latency_ms=args.link_latency_ms,
        mode=args.mode, grad_timeout=args.grad_timeout, float_act=args.float_act,
        security=args.security,
        codec=args.codec, resume=args.resume, spool_dir=args.spool_dir, spool_mb=args.spool_mb,
        checkpoint_every=args.checkpoint_every, confirm_timeout=args.confirm_timeout,
        board=args.board, workers=args.workers, augment=args.augment,
        max_batches=args.max_batches, live=args.live, labels=args.labels,
        lr_schedule=args.lr_schedule,
        replay=args.replay, idle_timeout=args.idle_timeout, shard_skew=args.shard_skew,
        fleet_average=args.fleet_average, fleet_average_wait=args.fleet_average_wait,
    )


def _print_train(args: argparse.Namespace, summary: dict) -> int:
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
    setup(args)
    from toolkit.core.artifacts.personal import is_personal

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


def build_parser() -> argparse.ArgumentParser:
    p = new_parser(
        prog="edge-runtime",
        description="hiertrain edge device: train the edge segment and stream int8 cut "
                    "activations over MQTT; hierarchical inference",
    )
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("train", help="train on the local shard and publish cut activations")
    add_common_args(sp, backend_help="executorch: the exported program, as on a board; torch: "
                                     "eager PyTorch, the same math; unset: executorch for "
                                     "--mode ht, torch for split, none for cloud")
    sp.add_argument("--epochs", type=positive_int, default=3,
                    help="passes over this device's shard")
    sp.add_argument("--shard", default="0/1",
                    help="INDEX/COUNT: this device's strided share of the dataset")
    sp.add_argument("--shard-skew", default=None, metavar="SPEC",
                    help="with --shard: a label-skewed share instead (a non-IID fleet from one "
                         "data set): dirichlet:ALPHA (class shares drawn from a Dirichlet, "
                         "e.g. 0.3) or classes:K (K classes per device), optionally :SEED; "
                         "every device passes the same --data, --limit and --seed; unset: "
                         "strided")
    sp.add_argument("--fleet-average", action="store_true",
                    help="ht: start each epoch from the fleet's averaged edge, which a "
                         "cloud-trainer run with --fleet-average sends at every epoch end "
                         "(docs/fleet.md)")
    sp.add_argument("--fleet-average-wait", type=float, default=None, metavar="S",
                    help="--fleet-average: wait at most S seconds for each average, then go on "
                         "with this device's own weights; keep it above the trainer's "
                         "--fleet-average-wait; unset: 180")
    sp.add_argument("--limit", type=positive_int, default=None,
                    help="use only this many training samples (before sharding); unset: all")
    sp.add_argument("--state-dir", default=".",
                    help="where to save edge_weights-<device>.pt, the checkpoint and the spool")
    sp.add_argument("--codec", default=None,
                    help="activation codec (int8, int4, int2, int8+deflate, int4+deflate, "
                         "int2+deflate, float32); unset: the manifest's")
    sp.add_argument("--mode", choices=MODES, default=DEFAULT_MODE,
                    help="ht: this method; split: classic split learning, waits for the cloud's "
                         "gradient every batch (torch backend); cloud: upload the raw images, "
                         "the cloud trains everything. The cloud trainer must run the same "
                         "--mode")
    sp.add_argument("--grad-timeout", type=float, default=DEFAULT_GRAD_TIMEOUT, metavar="S",
                    help="split: seconds to wait for the cloud trainer and for each gradient; "
                         "running out ends the run with exit code 5")
    sp.add_argument("--float-act", action="store_true",
                    help="split: send the cut activation as raw float32 instead of the "
                         "manifest's quantization")
    sp.add_argument("--resume", action="store_true",
                    help="continue from the checkpoint and spool in --state-dir/--spool-dir "
                         "(after a crash or power loss); without it the run starts afresh")
    sp.add_argument("--spool-dir", default=None,
                    help="where the on-disk outbox lives; unset: --state-dir")
    sp.add_argument("--spool-mb", type=float, default=None, metavar="MB",
                    help="spool budget; when full, training waits; unset: the --board "
                         "profile's mqtt.spool_mb, else that of the profile the artifacts "
                         "were exported for")
    sp.add_argument("--board", default=None, metavar="NAME|PATH",
                    help="board profile (a name from 'toolkit boards' or a .yaml, e.g. the "
                         "bundle's board.yaml): its threads and spool budget where --threads / "
                         "--spool-mb are unset, and a check of its batch against the "
                         "artifacts' (docs/deploy.md); unset: no profile")
    sp.add_argument("--checkpoint-every", type=positive_int, default=20, metavar="N",
                    help="checkpoint the edge every N batches")
    sp.add_argument("--confirm-timeout", type=float, default=300.0, metavar="S",
                    help="at the end, wait up to S seconds until the cloud trainer acked every "
                         "batch; batches still unconfirmed end the run with exit code 5 and "
                         "stay in the spool for --resume; 0: do not wait, exit 0 "
                         "(docs/delivery.md)")
    add_data_args(sp)
    add_live_args(sp)
    # --backend: executorch for ht, torch for split, none for cloud (resolve_backend)
    sp.set_defaults(func=cmd_train, backend=None)

    sp = sub.add_parser("infer", help="early-exit inference, asking the cloud when unsure")
    add_common_args(sp, cloud=False)  # personalised multi-exit artifacts need no cloud
    sp.add_argument("--threshold", type=float, default=None,
                    help="exit softmax confidence needed to answer locally; unset: 0.8, or for "
                         "personalised artifacts the calibrated thresholds (which it overrides)")
    sp.add_argument("--limit", type=positive_int, default=200, help="number of test samples")
    sp.add_argument("--weights", default=None,
                    help="edge_weights-<device>.pt from training, or 'retained' to take the "
                         "device's retained weights from the broker; personalised artifacts: "
                         "the --out directory of 'edge-runtime personalise'; unset: the "
                         "initial weights")
    sp.add_argument("--timeout", type=float, default=10.0, metavar="S",
                    help="seconds to wait for each cloud reply")
    personal_cli.add_scenario_args(sp)
    sp.add_argument("--compare-full", action="store_true",
                    help="personalised artifacts: also time the original network per sample")
    sp.add_argument("--bake", action=argparse.BooleanOptionalAction, default=None,
                    help="personalised artifacts on executorch: run the segments 'toolkit bake' "
                         "baked for these exit weights and policy, an error if there are none "
                         "(--no-bake: the shipped segments); unset: the baked segments when "
                         "they match, else the shipped ones")
    sp.set_defaults(func=cmd_infer)

    sp = sub.add_parser("provision", help="wait for 'toolkit flash' on a serial port")
    sp.add_argument("--port", required=True, help="serial port, e.g. /dev/ttyGS0")
    sp.add_argument("--baud", type=int, default=115200, help="the serial line's baud rate")
    sp.add_argument("--dest", required=True, help="artifacts directory to install into")
    sp.add_argument("--timeout", type=float, default=None, metavar="S",
                    help="give up after this many seconds; unset: wait forever")
    sp.add_argument("--threads", type=positive_int, default=None, help=argparse.SUPPRESS)
    sp.add_argument("--quiet", action="store_true", help="no info logs")
    sp.set_defaults(func=cmd_provision)

    cluster_run.add_parser(sub)
    personal_cli.add_personalise_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv, build_parser)


if __name__ == "__main__":
    sys.exit(main())
