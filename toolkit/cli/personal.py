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
