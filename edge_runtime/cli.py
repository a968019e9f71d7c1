"""``edge-runtime`` command line: ``train``, ``infer`` and ``personalise``.

User errors print ``error: ...`` and exit 2 (``toolkit.cli.run``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence

from edge_runtime import personal_cli
from edge_runtime.config import BACKENDS


def _setup(args: argparse.Namespace) -> None:
    """Logging to stderr (connect retries, epoch lines) and the torch thread count."""
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="edge-runtime: %(message)s", stream=sys.stderr)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def cmd_train(args: argparse.Namespace) -> int:
    _setup(args)
    from edge_runtime.train import TrainConfig, run_training

    summary = run_training(TrainConfig(
        artifacts=args.artifacts, broker=args.broker, device_id=args.device_id, data=args.data,
        run_id=args.run_id, epochs=args.epochs, backend=args.backend, shard=args.shard,
        seed=args.seed, limit=args.limit, quiet=args.quiet,
        connect_timeout=args.connect_timeout, report=args.report, state_dir=args.state_dir,
    ))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['device']}: {summary['epochs']} epoch(s), {summary['batches_published']} "
          f"batches ({summary['samples_published']} samples) published in "
          f"{summary['wall_s']:.1f} s ({summary['batches_per_s']:.1f} batches/s, "
          f"{summary['backend']}); exit accuracy {summary['exit_accuracy']:.3f}; "
          f"{summary['payload_bytes_per_sample']:.0f} B/sample on the wire "
          f"(float32 cut: {summary['float32_bytes_per_sample']} B); blocked on the link "
          f"{summary['publish_wait_s']:.2f} s; weights saved to {summary['weights_path']}")
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    _setup(args)
    from toolkit.personal_export import is_personal

    if is_personal(args.artifacts):  # multi-exit artifacts of 'toolkit export --personalise'
        return personal_cli.cmd_infer_personal(args)
    personal_cli.require_broker(args)
    from edge_runtime.infer import InferConfig, format_table, run_inference

    result = run_inference(InferConfig(
        artifacts=args.artifacts, broker=args.broker, device_id=args.device_id, data=args.data,
        run_id=args.run_id, threshold=0.8 if args.threshold is None else args.threshold,
        limit=args.limit, weights=args.weights,
        timeout=args.timeout, backend=args.backend, seed=args.seed, quiet=args.quiet,
        connect_timeout=args.connect_timeout, report=args.report,
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
    p = argparse.ArgumentParser(
        prog="edge-runtime",
        description="hiertrain edge device: train the edge segment and stream int8 cut "
                    "activations over MQTT; hierarchical inference",
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, cloud: bool = True) -> None:
        sp.add_argument("--artifacts", required=True, help="'toolkit export' output directory")
        sp.add_argument("--broker", required=cloud, help="mqtt://host[:port] or mqtts://...")
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

    sp = sub.add_parser("train", help="train on the local shard and publish cut activations")
    common(sp)
    sp.add_argument("--epochs", type=_positive_int, default=3)
    sp.add_argument("--shard", default="0/1",
                    help="INDEX/COUNT: this device's strided share of the dataset (default 0/1)")
    sp.add_argument("--limit", type=_positive_int, default=None,
                    help="use only this many training samples (before sharding)")
    sp.add_argument("--state-dir", default=".",
                    help="where to save edge_weights-<device>.pt (default: current directory)")
    sp.set_defaults(func=cmd_train)

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
    sp.set_defaults(func=cmd_infer)

    def runtime_only(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--backend", choices=BACKENDS, default="executorch")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
        sp.add_argument("--json", action="store_true", help="print the result as JSON")
        sp.add_argument("--quiet", action="store_true", help="no progress bars or info logs")

    personal_cli.add_personalise_parser(sub, runtime_only)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from toolkit.cli import run

    return run(argv, build_parser)


if __name__ == "__main__":
    sys.exit(main())
