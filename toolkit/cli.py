"""``toolkit`` command line: the only place that parses arguments.

User errors (``HiertrainError``) print one line and exit 2; bugs keep their
tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from toolkit.errors import HiertrainError


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None


def _shape(text: str) -> tuple[int, int, int]:
    try:
        parts = tuple(int(v) for v in text.lower().replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,32,32), got {text!r}")
    return parts  # type: ignore[return-value]


def cmd_models(args: argparse.Namespace) -> int:
    from toolkit.stats import model_table

    table = model_table(num_classes=args.num_classes, input_shape=args.input_shape)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    for m in table:
        shape = "x".join(str(s) for s in m["input_shape"])
        print(f"{m['name']}: {m['description']}")
        print(f"  input {shape}, {m['params']:,} parameters, default split {m['default_split']}")
        print(f"  {'split':<8} {'edge params':>12} {'exit params':>12} {'edge MFLOP':>11} "
              f"{'cut shape':>12} {'fp32 B/smp':>11} {'int8 B/smp':>11}")
        for s in m["splits"]:
            cut = "x".join(str(d) for d in s["cut_shape"])
            print(f"  {s['split']:<8} {s['edge_params']:>12,} {s['exit_params']:>12,} "
                  f"{s['edge_flops'] / 1e6:>11.1f} {cut:>12} {s['cut_float32_bytes']:>11,} "
                  f"{s['cut_int8_bytes']:>11,}")
        print()
    return 0


def cmd_boards(args: argparse.Namespace) -> int:
    from toolkit.boards import list_boards, load_board

    boards = [load_board(n) for n in list_boards()]
    if args.json:
        print(json.dumps([b.to_dict() for b in boards], indent=2))
        return 0
    for b in boards:
        print(f"{b.name:<18} {b.budget_mb:>6} MB budget  batch {b.default_batch:<3} "
              f"link {b.link_kbps / 1000:g} Mbit/s  {b.description}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    if args.personalise:
        from toolkit.personal_cli import cmd_export_personal

        return cmd_export_personal(args)
    from toolkit.exits import ExitHeadConfig
    from toolkit.export import ExportConfig, OptimizerConfig, export_artifacts
    from toolkit.models import get_spec

    spec = get_spec(args.model)
    cfg = ExportConfig(
        model=args.model, out=Path(args.out), split=args.split, board=args.board,
        batch=args.batch, num_classes=args.num_classes, input_shape=args.input_shape,
        mean=args.mean, std=args.std,
        exit=ExitHeadConfig(
            channels=spec.exit_channels if args.exit_channels is None else args.exit_channels,
            kernel=args.exit_kernel, stride=args.exit_stride,
        ),
        optimizer=OptimizerConfig(lr=args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay),
        seed=args.seed, edge_norm=args.edge_norm, force=args.force, verify=not args.no_verify,
    )
    manifest = export_artifacts(cfg, progress=lambda m: print(f"[export] {m}", file=sys.stderr))
    d = manifest.data
    parity = d["parity"]
    check = (f"gradient parity with eager PyTorch: {parity['global_rel_grad_error']:.1e} "
             f"(worst tensor {parity['max_rel_grad_error']:.1e})"
             if parity["checked"] else "parity not checked (--no-verify)")
    print(f"wrote {args.out}: {d['model']['name']} split at {d['split']['point']}, "
          f"batch {d['batch_size']}, cut {d['cut']['shape']}, "
          f"~{d['board']['estimated_train_mb']:.0f} MB of {d['board']['budget_mb']} MB "
          f"({d['board']['name']}); {check}")
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from toolkit.broker import run_broker

    run_broker(args.host, args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from toolkit.demo import DemoConfig, run_demo

    run_demo(DemoConfig(
        run_dir=Path(args.run_dir) if args.run_dir else None, data=args.data,
        broker=args.broker, epochs=args.epochs, edges=args.edges, backend=args.backend,
    ))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="toolkit", description="hiertrain build-time toolkit: models, export, demo"
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common_model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--num-classes", type=int, default=10)
        sp.add_argument("--input-shape", type=_shape, default=None,
                        help="C,H,W (default: the model's, 3,32,32)")

    sp = sub.add_parser("models", help="list models, split points and their costs")
    common_model_args(sp)
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_models)

    sp = sub.add_parser("boards", help="list board profiles")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_boards)

    sp = sub.add_parser("export", help="export the edge training program and artifacts")
    sp.add_argument("--model", required=True)
    sp.add_argument("--split", default=None, help="split point (default: the model's)")
    sp.add_argument("--board", default="rpi4", help="board profile name or .yaml path")
    sp.add_argument("--batch", type=int, default=None, help="default: the board's")
    sp.add_argument("--out", required=True)
    sp.add_argument("--force", action="store_true", help="replace an existing --out")
    common_model_args(sp)
    sp.add_argument("--mean", type=_floats, default=None, help="per-channel input mean")
    sp.add_argument("--std", type=_floats, default=None, help="per-channel input std")
    sp.add_argument("--exit-channels", type=int, default=None)
    sp.add_argument("--exit-kernel", type=int, default=3)
    sp.add_argument("--exit-stride", type=int, default=1)
    sp.add_argument("--lr", type=float, default=0.05)
    sp.add_argument("--momentum", type=float, default=0.9)
    sp.add_argument("--weight-decay", type=float, default=5e-4)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--edge-norm", choices=("batch", "group"), default=None,
                    help="normalisation in the edge segment (default: the model's)")
    sp.add_argument("--no-verify", action="store_true",
                    help="skip the gradient-parity check of the lowered program")
    sp.add_argument("--personalise", action="store_true",
                    help="multi-exit personalisation program: frozen backbone, trainable exits "
                         "(docs/personalise.md)")
    sp.add_argument("--checkpoint", default=None,
                    help="with --personalise: pretrained backbone state dict (full_model.pt of a "
                         "hiertrain run, or the model's own state dict)")
    sp.add_argument("--exits", default=None,
                    help="with --personalise: comma-separated stages to attach exits after "
                         "(default: every stage but the classifier)")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("broker", help="run the embedded MQTT broker (amqtt) in the foreground")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=1883)
    sp.set_defaults(func=cmd_broker)

    sp = sub.add_parser("demo", help="hierarchical training end to end on bundled data")
    sp.add_argument("--run-dir", default=None, help="keep the run here (default: temporary)")
    sp.add_argument("--data", default=None,
                    help="cifar-10-batches-py folder or ImageFolder tree (default: sklearn digits)")
    sp.add_argument("--broker", default=None, help="external broker URL (default: embedded)")
    sp.add_argument("--epochs", type=int, default=3)
    sp.add_argument("--edges", type=int, default=2)
    sp.add_argument("--backend", choices=("executorch", "torch"), default="executorch")
    sp.set_defaults(func=cmd_demo)
    return p


def run(argv: Sequence[str] | None, parser_factory: Callable[[], argparse.ArgumentParser]) -> int:
    """Shared entry for the three CLIs: one-line errors for user mistakes."""
    args = parser_factory().parse_args(argv)
    try:
        return args.func(args)
    except HiertrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv, build_parser)


if __name__ == "__main__":
    sys.exit(main())
