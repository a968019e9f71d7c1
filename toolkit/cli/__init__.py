"""``toolkit`` command line: the only place that parses arguments.

User errors (``HiertrainError``) print one line and exit with their code
(``toolkit.core.entry.ExitCode``); bugs keep their
tracebacks.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from toolkit.core.entry import new_parser, run
from toolkit.core.security import add_security_args


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
    from toolkit.plan.stats import model_table

    table = model_table(num_classes=args.num_classes, input_shape=args.input_shape,
                        names=args.model.split(",") if args.model else None)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    for m in table:
        shape = "x".join(str(s) for s in m["input_shape"])
        print(f"{m['name']}: {m['description']}")
        print(f"  input {shape}, {m['params']:,} parameters, default split {m['default_split']}")
        print(f"  {'split':<11} {'edge params':>9} {'exit params':>12} {'edge MFLOP':>11} "
              f"{'cut shape':>12} {'fp32 B/smp':>11} {'int8 B/smp':>11}")
        for s in m["splits"]:
            cut = "x".join(str(d) for d in s["cut_shape"])
            print(f"  {s['split']:<11} {s['edge_params']:>9,} {s['exit_params']:>12,} "
                  f"{s['edge_flops'] / 1e6:>11.1f} {cut:>12} {s['cut_float32_bytes']:>11,} "
                  f"{s['cut_int8_bytes']:>11,}")
        print()
    if not args.model and not args.json:
        from toolkit.core.models.zoo import TORCHVISION_SPLITS

        print("also: torchvision:" + ", torchvision:".join(TORCHVISION_SPLITS) + " (and any "
              "torchvision classification model), or package.module:factory for your own "
              "nn.Module; `toolkit models --model NAME` shows one (docs/models.md)")
    return 0


def cmd_boards(args: argparse.Namespace) -> int:
    from toolkit.core.artifacts.boards import list_boards, load_board

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
        from toolkit.cli.personal import cmd_export_personal

        return cmd_export_personal(args)
    from toolkit.build.export import ExportConfig, OptimizerConfig, export_artifacts
    from toolkit.core.models import get_spec
    from toolkit.core.models.exits import ExitHeadConfig

    spec = get_spec(args.model)
    cfg = ExportConfig(
        model=args.model, out=Path(args.out), split=args.split, board=args.board,
        batch=args.batch, num_classes=args.num_classes, input_shape=args.input_shape,
        mean=args.mean, std=args.std,
        exit=ExitHeadConfig(
            channels=spec.exit_channels if args.exit_channels is None else args.exit_channels,
            kernel=args.exit_kernel, stride=args.exit_stride, pool=args.exit_pool,
        ),
        optimizer=OptimizerConfig(lr=args.lr, momentum=args.momentum,
                                  weight_decay=args.weight_decay),
        seed=args.seed, edge_norm=args.edge_norm, force=args.force, verify=not args.no_verify,
        codec=args.codec, lowering=args.lowering, privacy=args.privacy,
        pretrained=Path(args.pretrained) if args.pretrained else None,
    )
    manifest = export_artifacts(cfg, progress=lambda m: print(f"[export] {m}", file=sys.stderr))
    d = manifest.data
    parity = d["parity"]
    check = (f"gradient parity with eager PyTorch: {parity['global_rel_grad_error']:.1e} "
             f"(worst tensor {parity['max_rel_grad_error']:.1e}); from float64 "
             f"{parity['float64_rel_grad_error']:.1e}, eager float32's own "
             f"{parity['eager_float64_rel_grad_error']:.1e}"
             if parity["checked"] else "parity not checked (--no-verify)")
    print(f"wrote {args.out}: {d['model']['name']} split at {d['split']['point']}, "
          f"batch {d['batch_size']}, cut {d['cut']['shape']}, "
          f"~{d['board']['estimated_train_mb']:.0f} MB of {d['board']['budget_mb']} MB "
          f"({d['board']['name']}); {check}")
    if parity.get("xnnpack_refused"):
        print(f"note: the XNNPACK program failed the parity gate ({parity['xnnpack_refused']}); "
              "this program is the same lowering without XNNPACK (--lowering matmul)")
    size = d["cut"]["codec"]
    bound = "exact" if size["size"] == "exact" else "at most; deflate is data-dependent"
    print(f"codec {size['name']}: {size['message_bytes_per_sample']:.1f} bytes per sample on the "
          f"wire ({bound}; float32 payload {d['cut']['float32_bytes_per_sample']})")
    privacy = d["privacy"]
    if privacy["kind"] != "none":
        eps = privacy["epsilon_per_release"]
        guarantee = (f"; epsilon {eps:.3g} per release at delta {privacy['delta']:g} "
                     "(docs/privacy.md says what it covers)" if eps is not None else "")
        print(f"privacy {privacy['kind']} {privacy['scale']:g} applied on the board{guarantee}")
        if privacy["kind"] == "adversarial":
            print("note: in benchmarks/privacy.py the adversarial defence did not lower what an "
                  "attacker rebuilds and cost the exit accuracy; check with `toolkit attack` "
                  "(docs/privacy.md)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from toolkit.core.models import MODELS, get_spec
    from toolkit.plan.planner import PlanConfig, make_plan, render

    models = args.model.split(",") if args.model else list(MODELS)
    for m in models:
        get_spec(m)  # refuse a bad name before profiling the others
    plans = []
    for m in models:
        cfg = PlanConfig(
            model=m, board=args.board, link_kbps=args.link_kbps,
            link_down_kbps=args.link_kbps_down, link_latency_ms=args.link_latency_ms,
            batch=args.batch, samples=args.samples,
            bits=args.bits, input_shape=args.input_shape, num_classes=args.num_classes,
            threads=args.threads, repeats=args.repeats, max_seconds=args.max_profile_s,
            profile_cache=Path(args.profile_cache) if args.profile_cache else None,
            edge_speed=args.edge_speed, cloud_speedup=args.cloud_speedup,
        )
        plans.append(make_plan(cfg, show_progress=True,
                               log=lambda msg: print(f"[plan] {msg}", file=sys.stderr)))
    if args.json:
        print(json.dumps(plans[0] if len(plans) == 1 else plans, indent=2))
    else:
        print("\n\n".join(render(p) for p in plans))
    return 0


def cmd_attack(args: argparse.Namespace) -> int:
    from toolkit.core.errors import HiertrainError
    from toolkit.privacy.attack import AttackConfig
    from toolkit.privacy.audit import AuditConfig, audit, describe

    for name in ("public", "heldout", "epochs"):
        if getattr(args, name) < 1:
            raise HiertrainError(f"--{name} must be at least 1, got {getattr(args, name)}")
    result = audit(AuditConfig(
        artifacts=Path(args.artifacts), data=args.data,
        weights=Path(args.weights) if args.weights else None, public=args.public,
        heldout=args.heldout, attack=AttackConfig(epochs=args.epochs),
        grid=Path(args.grid) if args.grid else None,
    ), progress=lambda m: print(f"[attack] {m}", file=sys.stderr))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(describe(result))
    return 0


def cmd_broker(args: argparse.Namespace) -> int:
    from toolkit.lab.broker import run_broker

    run_broker(args.host, args.port)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from toolkit.lab.demo import DemoConfig, run_demo

    run_demo(DemoConfig(
        run_dir=Path(args.run_dir) if args.run_dir else None, data=args.data,
        broker=args.broker, epochs=args.epochs, edges=args.edges, backend=args.backend,
    ))
    return 0


def _split_map(text: str) -> dict[str, str]:
    try:
        return dict(item.split("=", 1) for item in text.split(",") if item)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected model=split[,model=split], got {text!r}") from None


def _bench_links(args: argparse.Namespace):
    """``--links`` (UP/DOWN pairs) or ``--rates`` (symmetric), not both; the default sweep."""
    from toolkit.core.errors import HiertrainError
    from toolkit.lab.bench import BenchConfig, parse_links

    if args.links is not None and args.rates is not None:
        raise HiertrainError("give --links (UP/DOWN pairs) or --rates (symmetric), not both")
    if args.links is not None:
        return parse_links(args.links)
    if args.rates is not None:
        return parse_links(",".join(f"{r:g}" for r in args.rates))
    return BenchConfig.links


def cmd_bench(args: argparse.Namespace) -> int:
    from toolkit.lab.bench import BenchConfig, reductions, run_bench

    rows = run_bench(BenchConfig(
        out=Path(args.out), work_dir=Path(args.work_dir) if args.work_dir else None,
        models=tuple(args.models.split(",")), splits=args.splits,
        modes=tuple(args.modes.split(",")), links=_bench_links(args), latency_ms=args.latency_ms,
        codec=args.codec, extra_codecs=tuple(c for c in args.extra_codecs.split(",") if c),
        batch=args.batch, samples=args.samples, max_link_s=args.max_link_s,
        accuracy_samples=args.accuracy_samples, accuracy_epochs=args.accuracy_epochs,
        eval_limit=args.eval_limit, lr=args.lr, data=args.data, broker=args.broker,
        schedules=tuple(args.schedules.split(",")),
        split_grad_bits=tuple(int(b) for b in args.split_grad_bits), resume=args.resume,
        report_only=args.report_only, edge_backend=args.edge_backend, lowering=args.lowering,
        cloud_threads=args.cloud_threads, cloud_device=args.cloud_device, repeats=args.repeats,
        input_shape=args.input_shape,
    ))
    for e in reductions(rows):
        vs = ", ".join(f"{e[k] * 100:.0f} % vs {k.removeprefix('reduction_vs_')}"
                       for k in ("reduction_vs_split", "reduction_vs_split_g8",
                                 "reduction_vs_cloud") if e[k] is not None)
        shape = "x".join(map(str, e["input_shape"]))
        print(f"{e['model']} ({shape}, {e['split']}) at {e['link']} Mbit/s: HT {e['ht_s']:.1f} s"
              f" (mean of {e['repeats']}; {vs})")
    print(f"written to {Path(args.out) / 'lowbitrate.json'}")
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    import logging

    from toolkit.deploy.gateway import GatewayConfig, run_gateway

    logging.basicConfig(level=logging.INFO, format="gateway: %(message)s", stream=sys.stderr)
    from toolkit.core.security import security_from_args

    stats = run_gateway(GatewayConfig(serial=args.serial, baud=args.baud, broker=args.broker,
                                      once=args.once, idle_timeout=args.idle_timeout,
                                      security=security_from_args(args)))
    print(json.dumps(stats))
    return 0


def cmd_flash(args: argparse.Namespace) -> int:
    from toolkit.deploy.flash import FlashConfig, flash

    result = flash(FlashConfig(port=args.port, baud=args.baud, artifacts=Path(args.artifacts),
                               board=args.board, timeout=args.timeout))
    print(json.dumps(result))
    return 0


def cmd_bundle(args: argparse.Namespace) -> int:
    from toolkit.deploy.bundle import build_bundle

    out = build_bundle(board=args.board, artifacts=Path(args.artifacts), out=Path(args.out),
                       wheel=not args.no_wheel)
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Every flag has help; the shared formatter appends each default, so help never repeats
    it, and a flag whose default is None says what leaving it unset means."""
    p = new_parser(
        prog="toolkit", description="hiertrain build-time toolkit: models, export, demo"
    )
    sub = p.add_subparsers(dest="command", required=True)

    def common_model_args(sp: argparse.ArgumentParser, *aliases: str) -> None:
        sp.add_argument("--num-classes", type=int, default=10, help="number of output classes")
        sp.add_argument("--input-shape", *aliases, type=_shape, default=None,
                        help="input shape C,H,W; unset: the model's own (3,32,32 for the "
                             "built-ins, 3,224,224 for torchvision's)")

    sp = sub.add_parser("models", help="list models, split points and their costs")
    common_model_args(sp)
    sp.add_argument("--model", default=None,
                    help="comma-separated models to show, e.g. torchvision:resnet50 or "
                         "mypkg.nets:make_net; unset: the built-ins")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_models)

    sp = sub.add_parser("boards", help="list board profiles")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_boards)

    sp = sub.add_parser("export", help="export the edge training program and artifacts")
    sp.add_argument("--model", required=True,
                    help="a built-in model ('toolkit models' lists them), torchvision:<arch> "
                         "(e.g. torchvision:mobilenet_v3_small) or package.module:factory "
                         "returning your nn.Module; docs/models.md")
    sp.add_argument("--split", default=None,
                    help="split point: a stage of a built-in model, or a module path "
                         "(features.3, layer2); unset: the model's default split")
    sp.add_argument("--pretrained", default=None, metavar="FILE",
                    help="initial weights: a local state dict of the whole model (e.g. "
                         "torchvision's .pth); tensors whose shapes differ (a classifier for "
                         "other classes) keep their initial values and are named")
    sp.add_argument("--board", default="rpi4", help="board profile name or .yaml path")
    sp.add_argument("--batch", type=int, default=None,
                    help="training batch size; unset: the board's (32 with --personalise)")
    sp.add_argument("--out", required=True, help="artifacts directory to write")
    sp.add_argument("--force", action="store_true", help="replace an existing --out")
    common_model_args(sp)
    sp.add_argument("--mean", type=_floats, default=None,
                    help="per-channel input mean, comma-separated; unset: the model's "
                         "(CIFAR-10's) when the input has 3 channels")
    sp.add_argument("--std", type=_floats, default=None,
                    help="per-channel input std, comma-separated; unset: as for --mean")
    sp.add_argument("--exit-channels", type=int, default=None,
                    help="channels of the early-exit head's convolution; unset: the model's "
                         "(32 with --personalise)")
    sp.add_argument("--exit-kernel", type=int, default=3,
                    help="kernel size of the early-exit head's convolution")
    sp.add_argument("--exit-stride", type=int, default=1,
                    help="stride of the early-exit head's convolution")
    sp.add_argument("--exit-pool", type=int, default=2,
                    help="the early-exit head averages to a POOLxPOOL grid before its linear "
                         "layer (1: global average pooling); in HT a grid keeps spatial "
                         "information in what the exit trains the edge to send "
                         "(docs/lowbitrate.md, 'Accuracy at convergence')")
    sp.add_argument("--lr", type=float, default=0.05,
                    help="edge SGD learning rate, baked into the training program")
    sp.add_argument("--momentum", type=float, default=0.9, help="edge SGD momentum")
    sp.add_argument("--weight-decay", type=float, default=5e-4, help="edge SGD weight decay")
    sp.add_argument("--seed", type=int, default=0, help="seed of the initial weights")
    sp.add_argument("--codec", default="int8",
                    help="activation codec on the wire: int8, int4, int2, "
                         "int8+deflate, int4+deflate, int2+deflate or float32")
    sp.add_argument("--privacy", default="none",
                    help="defence applied to the cut on the board: none, gaussian:SCALE, "
                         "laplace:SCALE (options ,clip=C) or adversarial:WEIGHT (option "
                         ",width=K); docs/privacy.md")
    sp.add_argument("--edge-norm", choices=("batch", "group"), default=None,
                    help="normalisation in the edge segment; unset: the model's")
    sp.add_argument("--no-verify", action="store_true",
                    help="skip the gradient-parity check of the lowered program")
    sp.add_argument("--lowering", choices=("xnnpack", "matmul", "portable"), default="xnnpack",
                    help="training program: convolutions as matrix products run by XNNPACK "
                         "(falls back to matmul without XNNPACK), the same on "
                         "ExecuTorch's own kernels (any runtime), or ExecuTorch's portable "
                         "convolution kernels (slowest); docs/export.md, 'Speed'")
    sp.add_argument("--personalise", action="store_true",
                    help="multi-exit personalisation program: frozen backbone, trainable exits "
                         "(docs/personalise.md)")
    sp.add_argument("--checkpoint", default=None,
                    help="with --personalise (needed there): pretrained backbone state dict "
                         "(full_model.pt of a hiertrain run, or the model's own state dict)")
    sp.add_argument("--exits", default=None,
                    help="with --personalise: comma-separated stages to attach exits after; "
                         "unset: every stage but the classifier")
    sp.set_defaults(func=cmd_export)

    sp = sub.add_parser("plan", help="predict epoch time per split point and mode; pick a split")
    sp.add_argument("--model", default=None,
                    help="model name, or several comma-separated; unset: every model")
    sp.add_argument("--board", default="rpi4", help="board profile name or .yaml path")
    sp.add_argument("--link-kbps", type=float, default=None,
                    help="link rate in kbit/s (the uplink, edge to cloud); unset: the board's")
    sp.add_argument("--link-kbps-down", type=float, default=None,
                    help="downlink rate in kbit/s (cloud to edge: split learning's gradients); "
                         "unset: the same as the uplink")
    sp.add_argument("--link-latency-ms", type=float, default=None,
                    help="one-way link latency in ms; unset: the board's")
    sp.add_argument("--batch", type=int, default=None,
                    help="training batch size; unset: the board's")
    sp.add_argument("--samples", type=int, default=50_000,
                    help="training samples per epoch (50000: CIFAR-10)")
    sp.add_argument("--bits", type=int, choices=(2, 4, 8, 32), default=8,
                    help="activation code width; 32 = raw float32")
    common_model_args(sp, "--input-size")
    sp.add_argument("--threads", type=int, default=1, help="torch threads while profiling")
    sp.add_argument("--repeats", type=int, default=3, help="timed runs per measurement")
    sp.add_argument("--max-profile-s", type=float, default=120.0,
                    help="stop repeating measurements after this many seconds")
    sp.add_argument("--profile-cache", default=None,
                    help="JSON file to reuse profiles from and add new ones to; unset: "
                         "profile afresh and keep nothing")
    sp.add_argument("--edge-speed", type=float, default=None,
                    help="board speed relative to this machine; unset: the board profile's "
                         "cpu.relative_speed, else its GFLOP/s over this machine's")
    sp.add_argument("--cloud-speedup", type=float, default=1.0,
                    help="cloud speed relative to this machine")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser("attack", help="how well a decoder rebuilds images from the cut your "
                        "artifacts publish (docs/privacy.md)")
    sp.add_argument("artifacts", help="directory written by toolkit export")
    sp.add_argument("--data", default=None,
                    help="images of the same domain: digits, a CIFAR-10 copy or an image folder "
                         "(train split: the attacker's public images; test split: rebuilt)")
    sp.add_argument("--weights", default=None,
                    help="edge weights to attack (edge_weights-<device>.pt of a run); unset: the "
                         "exported initial weights")
    sp.add_argument("--public", type=int, default=2000, help="public images to train on")
    sp.add_argument("--heldout", type=int, default=256, help="held-out images to rebuild")
    sp.add_argument("--epochs", type=int, default=8, help="attacker training epochs")
    sp.add_argument("--grid", default=None, help="PNG of originals against reconstructions")
    sp.add_argument("--json", default=None, help="write the scores to this JSON file")
    sp.set_defaults(func=cmd_attack)

    sp = sub.add_parser("broker", help="run the embedded MQTT broker (amqtt) in the foreground")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on")
    sp.add_argument("--port", type=int, default=1883, help="TCP port to listen on")
    sp.set_defaults(func=cmd_broker)

    sp = sub.add_parser("demo", help="hierarchical training end to end on bundled data")
    sp.add_argument("--run-dir", default=None,
                    help="keep the run here; unset: a temporary directory")
    sp.add_argument("--data", default=None,
                    help="cifar-10-batches-py folder or ImageFolder tree; unset: scikit-learn's "
                         "bundled digits")
    sp.add_argument("--broker", default=None,
                    help="external broker URL (mqtt://host[:port]); unset: start the embedded "
                         "broker")
    sp.add_argument("--epochs", type=int, default=3, help="training epochs")
    sp.add_argument("--edges", type=int, default=2, help="edge-runtime processes to start")
    sp.add_argument("--backend", choices=("executorch", "torch"), default="executorch",
                    help="the edges' training engine: the exported ExecuTorch program, or "
                         "eager PyTorch")
    sp.set_defaults(func=cmd_demo)

    sp = sub.add_parser("bench", help="HT vs split learning vs cloud training on shaped links")
    sp.add_argument("--out", default="benchmarks/results", help="where results and plots go")
    sp.add_argument("--work-dir", default=None, help="run dirs; unset: OUT/lowbitrate-runs")
    sp.add_argument("--models", default="vgg16,resnet18", help="models, comma-separated")
    sp.add_argument("--splits", type=_split_map, default={},
                    help="split point per model, model=split,...; model=plan: the split "
                         "`toolkit plan` recommends for each link; models not named: "
                         "vgg16=stage2, resnet18=layer3, smallcnn=block1, else the model's "
                         "default")
    sp.add_argument("--modes", default="ht,split,cloud",
                    help="training modes to compare, comma-separated")
    sp.add_argument("--links", default=None, metavar="UP/DOWN,...",
                    help="links to measure, uplink/downlink in Mbit/s, comma-separated (e.g. "
                         "0.5/0.5,2/2,2/20,10/50; one number: the same both ways); unset: "
                         "0.5,2,10,50 symmetric")
    sp.add_argument("--rates", type=_floats, default=None,
                    help="symmetric links in Mbit/s, comma-separated (--links 2 = --rates 2)")
    sp.add_argument("--latency-ms", type=float, default=20.0, help="one-way link latency")
    sp.add_argument("--codec", default="int8", help="activation codec for ht and split")
    sp.add_argument("--extra-codecs", default="",
                    help="more codecs for ht accuracy runs, comma-separated")
    sp.add_argument("--batch", type=int, default=32, help="training batch size")
    sp.add_argument("--samples", type=int, default=512, help="runtime runs: samples (at most)")
    sp.add_argument("--max-link-s", type=float, default=150.0,
                    help="runtime runs: fewer samples at slow rates so split's link time <= S")
    sp.add_argument("--accuracy-samples", type=int, default=4096,
                    help="accuracy runs: training samples per epoch")
    sp.add_argument("--accuracy-epochs", type=int, default=2, help="accuracy runs: epochs")
    sp.add_argument("--eval-limit", type=int, default=1000, help="held-out samples evaluated")
    sp.add_argument("--lr", type=float, default=0.01, help="SGD learning rate of every run")
    sp.add_argument("--data", default=None,
                    help="dataset; unset: a CIFAR-10 copy ($HIERTRAIN_CIFAR10) if there is one, "
                         "else scikit-learn's digits")
    sp.add_argument("--broker", choices=("auto", "mosquitto", "embedded"), default="auto",
                    help="broker to start: auto takes mosquitto when installed, else the "
                         "embedded one")
    sp.add_argument("--schedules", default="runtime,accuracy",
                    help="which runs: runtime (shaped links) and/or accuracy (longer, "
                         "unshaped), comma-separated")
    sp.add_argument("--report-only", action="store_true",
                    help="run nothing: redo predictions, tables and plots from OUT/lowbitrate.json")
    sp.add_argument("--resume", action="store_true",
                    help="keep the runs already in OUT/lowbitrate.json, run only the others")
    sp.add_argument("--split-grad-bits", type=_floats, default=(32,),
                    help="split learning's gradients: 32 (float32, classic) and/or 8, e.g. 32,8")
    sp.add_argument("--edge-backend", choices=("executorch", "torch"), default="executorch",
                    help="the ht edge's engine: the exported ExecuTorch program (what a user "
                         "gets) or eager PyTorch; split learning's edge runs torch either way, "
                         "the cloud mode's trains nothing")
    sp.add_argument("--lowering", choices=("xnnpack", "matmul", "portable"), default=None,
                    help="the export's convolution lowering; unset: toolkit export's default "
                         "(xnnpack) with an ExecuTorch edge, portable with --edge-backend torch")
    sp.add_argument("--cloud-threads", type=int, default=None,
                    help="the cloud trainer's torch threads; unset: the cores left after the "
                         "edge's one (1 on a 2-core machine); more is refused")
    sp.add_argument("--cloud-device", default="auto",
                    help="the cloud trainer's --device: auto (a GPU when torch sees one), cpu, "
                         "cuda[:N]")
    sp.add_argument("--repeats", type=int, default=3,
                    help="runtime runs: repeats per point (mean, std, min, max reported)")
    sp.add_argument("--input-shape", type=_shape, default=None,
                    help="model input C,H,W, e.g. 3,224,224: the data resized to it as uint8 "
                         "frames; unset: the data's own (3,32,32, or 1,32,32 for digits)")
    sp.set_defaults(func=cmd_bench)

    sp = sub.add_parser("gateway", help="bridge a device's serial line to an MQTT broker")
    sp.add_argument("--serial", required=True, help="/dev/ttyUSB0 or serial:///dev/...?baud=N")
    sp.add_argument("--baud", type=int, default=115200, help="serial line speed in bit/s")
    sp.add_argument("--broker", required=True, help="mqtt://host[:port]")
    sp.add_argument("--once", action="store_true", help="exit when the device says goodbye")
    sp.add_argument("--idle-timeout", type=float, default=None,
                    help="give up if no device greets within this many seconds; unset: wait "
                         "forever")
    add_security_args(sp, signing=False)
    sp.set_defaults(func=cmd_gateway)

    sp = sub.add_parser("flash", help="push artifacts to a board in provisioning mode (serial)")
    sp.add_argument("--port", required=True, help="serial port, e.g. /dev/ttyACM0")
    sp.add_argument("--baud", type=int, default=115200, help="serial line speed in bit/s")
    sp.add_argument("--artifacts", required=True, help="'toolkit export' output directory")
    sp.add_argument("--board", default=None,
                    help="board profile (name or .yaml) to send along as board.yaml; unset: "
                         "send none")
    sp.add_argument("--timeout", type=float, default=600.0,
                    help="give up after this many seconds")
    sp.set_defaults(func=cmd_flash)

    sp = sub.add_parser("bundle", help="tarball for a Linux board: artifacts, config, systemd")
    sp.add_argument("--board", required=True, help="board profile name or .yaml path")
    sp.add_argument("--artifacts", required=True, help="'toolkit export' output directory")
    sp.add_argument("--out", required=True, help="e.g. edge-bundle.tar.gz")
    sp.add_argument("--no-wheel", action="store_true",
                    help="leave out the hiertrain wheel built from this source tree (the board "
                         "installs hiertrain from a package index instead)")
    sp.set_defaults(func=cmd_bundle)

    from toolkit.cli.keys import add_keys_parser
    from toolkit.cli.personal import add_bake_parser

    add_bake_parser(sub)
    add_keys_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run(argv, build_parser)


if __name__ == "__main__":
    sys.exit(main())
