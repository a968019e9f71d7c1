"""``edge-runtime personalise`` and the multi-exit branch of ``edge-runtime infer``.

Kept out of ``edge_runtime/cli.py`` so the shared CLI file changes by a few lines; the
shared arguments come from ``edge_runtime.cli_args``, so this module never imports
``cli.py`` back.
"""

from __future__ import annotations

import argparse
import json

from edge_runtime.cli_args import DATA_HELP, add_runtime_only_args, positive_int, setup
from toolkit.core.errors import HiertrainError

SHIFTS = ("none", "tint", "invert")  # toolkit.core.data.personal.SHIFTS, without importing torch


def _classes(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated class ids, got {text!r}")\
            from None


def add_scenario_args(sp: argparse.ArgumentParser) -> None:
    """The personal scenario: which classes this device sees, through which shift."""
    sp.add_argument("--classes", type=_classes, default=None,
                    help="comma-separated class ids this device sees; unset: all")
    sp.add_argument("--shift", choices=SHIFTS, default="none",
                    help="fixed colour shift of this device's camera")


def add_personalise_parser(sub) -> None:
    sp = sub.add_parser("personalise",
                        help="train the early exits on local, mostly unlabelled data; calibrate "
                             "their thresholds")
    sp.add_argument("--artifacts", required=True,
                    help="'toolkit export --personalise' output directory")
    sp.add_argument("--out", required=True,
                    help="where exits.pt, policy.json and report.json go")
    sp.add_argument("--data", default=None, help=DATA_HELP)
    add_scenario_args(sp)
    sp.add_argument("--labelled", type=float, default=0.1,
                    help="share of local samples with a real label")
    sp.add_argument("--pseudo-threshold", type=float, default=0.9,
                    help="final-exit confidence a pseudo-label needs to be used")
    sp.add_argument("--epochs", type=positive_int, default=5,
                    help="passes over the local training stream")
    sp.add_argument("--holdout", type=float, default=0.2,
                    help="share of local samples held out to calibrate thresholds")
    sp.add_argument("--target-accuracy", type=float, default=None,
                    help="accuracy each early exit must reach on held-out data; unset: the "
                         "deepest exit's own held-out accuracy")
    sp.add_argument("--limit", type=positive_int, default=None,
                    help="use at most this many samples; unset: all")
    add_runtime_only_args(sp)
    sp.set_defaults(func=cmd_personalise)


def cmd_personalise(args: argparse.Namespace) -> int:
    from edge_runtime.personalise import PersonaliseConfig, run_personalise

    setup(args)
    r = run_personalise(PersonaliseConfig(
        artifacts=args.artifacts, out=args.out, data=args.data, classes=args.classes,
        shift=args.shift, labelled=args.labelled, pseudo_threshold=args.pseudo_threshold,
        epochs=args.epochs, holdout=args.holdout, target_accuracy=args.target_accuracy,
        backend=args.backend, seed=args.seed, limit=args.limit, quiet=args.quiet,
    ))
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    before, after = r["heldout_accuracy_before"], r["heldout_accuracy_after"]
    print(f"personalised on {r['data']} ({r['backend']}): {r['steps']} steps, "
          f"{r['labelled_samples']} labelled + {r['pseudo_labelled_samples']} pseudo-labelled "
          f"(pseudo-label accuracy {r['pseudo_label_accuracy'] or 0:.3f}), "
          f"{r['ignored_samples']} ignored; {r['train_step_ms']:.1f} ms/step")
    print(f"  held-out accuracy: final exit {before['final']:.3f}; personalised exits "
          + ", ".join(f"{k} {before[k]:.3f} -> {v:.3f}" for k, v in after.items()
                      if k != "final"))
    pol = r["policy"]
    print(f"  thresholds for target {pol['target_accuracy']:.3f}: "
          + ", ".join(f"{k} {'never' if t is None else f'{t:.3f}'}"
                      for k, t in zip(pol["exit_points"], pol["thresholds"], strict=True))
          + f" (terminal {pol['terminal']})")
    print("  coverage: " + ", ".join(
        f"{k} {v['coverage']:.2f}" for k, v in pol["calibration"]["per_exit"].items())
        + f"; written to {args.out}")
    return 0


def cmd_infer_personal(args: argparse.Namespace) -> int:
    from edge_runtime.multi_exit_infer import (
        MultiExitConfig,
        format_result,
        run_multi_exit_inference,
    )

    r = run_multi_exit_inference(MultiExitConfig(
        artifacts=args.artifacts, weights=args.weights, data=args.data, classes=args.classes,
        shift=args.shift, limit=args.limit, threshold=args.threshold,
        backend=args.backend, compare_full=args.compare_full, bake=args.bake,
        seed=args.seed, quiet=args.quiet,
        report=args.report,
    ))
    print(json.dumps(r, indent=2) if args.json else format_result(r))
    return 0


def require_broker(args: argparse.Namespace) -> None:
    if not args.broker or not args.device_id:
        raise HiertrainError("hierarchical inference needs --broker and --device-id (only "
                             "personalised artifacts run without a cloud)")
