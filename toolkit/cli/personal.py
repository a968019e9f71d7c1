"""``toolkit export --personalise``: argument handling kept out of ``toolkit/cli.py``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from toolkit.core.errors import HiertrainError


def cmd_export_personal(args: argparse.Namespace) -> int:
    from toolkit.build.export import OptimizerConfig
    from toolkit.build.personal_export import PersonalExportConfig, export_personal

    if args.checkpoint is None:
        raise HiertrainError("--personalise needs --checkpoint: the pretrained backbone's state "
                             "dict (personalising a random network is meaningless)")
    exits = tuple(e.strip() for e in args.exits.split(",") if e.strip()) if args.exits else None
    cfg = PersonalExportConfig(
        model=args.model, out=Path(args.out), checkpoint=args.checkpoint, exit_points=exits,
        exit_channels=32 if args.exit_channels is None else args.exit_channels,
        batch=args.batch or 32, num_classes=args.num_classes, input_shape=args.input_shape,
        mean=args.mean, std=args.std,
        optimizer=OptimizerConfig(lr=args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay),
        seed=args.seed, force=args.force, verify=not args.no_verify,
    )
    manifest = export_personal(cfg, progress=lambda m: print(f"[export] {m}", file=sys.stderr))
    d = manifest.data
    parity = d["parity"]
    check = (f"gradient parity with eager PyTorch: {parity['global_rel_grad_error']:.1e}"
             if parity["checked"] else "parity not checked (--no-verify)")
    print(f"wrote {args.out}: {d['spec']['model']} (frozen) with exits after "
          f"{', '.join(d['spec']['exit_points'])}, batch {d['batch_size']}, "
          f"{d['cost']['trainable_parameters']:,} trainable parameters; {check}")
    return 0


def add_bake_parser(sub) -> None:
    """``toolkit bake``: the build-side half of ``edge-runtime infer`` with baked exits."""
    sp = sub.add_parser(
        "bake", help="lower a personalised exit policy's segments with the exit weights baked "
                     "in (XNNPACK end to end); 'edge-runtime infer' then uses them")
    sp.add_argument("--artifacts", required=True,
                    help="'toolkit export --personalise' output directory; the baked segments "
                         "and baked.json are written into it")
    sp.add_argument("--weights", default=None,
                    help="the --out directory of 'edge-runtime personalise' (exits.pt and "
                         "policy.json) or an exits.pt file; unset: the initial exits")
    sp.add_argument("--threshold", type=float, default=None,
                    help="one confidence threshold for every exit instead of the calibrated "
                         "policy (use the same with 'edge-runtime infer'); unset: the policy")
    sp.set_defaults(func=cmd_bake)


def cmd_bake(args: argparse.Namespace) -> int:
    from toolkit.build.personal_export import BakeConfig, bake_personal

    d = bake_personal(BakeConfig(artifacts=args.artifacts, weights=args.weights,
                                 threshold=args.threshold),
                      progress=lambda m: print(f"[bake] {m}", file=sys.stderr))
    segs = ", ".join(f"{s['file']} ({s['exit']}, {s['backend']})" for s in d["segments"])
    print(f"baked {len(d['segments'])} segment(s) into {args.artifacts}: {segs}")
    return 0
