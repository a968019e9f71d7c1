"""What a published cut reveals, and what each defence costs: reconstruction attacks on CIFAR-10.

Two parts, each row appended to ``benchmarks/results/privacy.json`` as it finishes (a rerun
skips the rows already there with the same settings, so an interrupted run resumes):

``leak``
    For every shipped model, split point and codec (int8, int4, int2; ``+deflate`` is
    lossless, so its attacker sees the same tensor: the row is the int8 attack, checked
    equal): the attacker of ``toolkit.privacy.attack`` against the edge at its exported
    initial weights (``build_segments(..., seed=0)``, as ``toolkit export`` writes
    ``edge_init.pt``). A board publishes its weights every epoch, so the attacker knowing
    them is realistic; later weights are measured in ``tradeoff`` for smallcnn.
``tradeoff``
    smallcnn split at block1 (16x16x16 cut), trained by hierarchical training with each
    defence and strength: the edge runs its exported ExecuTorch program (default lowering)
    with the defence applied as the runtime applies it and the codec's real bytes; the
    cloud segment trains on the decoded messages with the manifest's SGD, as the cloud
    trainer's step does. Transport is in-process (no broker): the bytes are the same, the
    timing is not measured here. Then: full-model and exit accuracy on CIFAR-10 test
    images, and the attacker (with the trained edge's published weights, the defence with
    fresh noise, the codec) on 500 of the board's own training images.

Data: the shared "CIFAR-10 (JPEG copy)" (``toolkit.core.data.datasets.shared_cifar10()``,
or ``$HIERTRAIN_CIFAR10``); the board trains on ``--train`` images, the attacker's public
images are ``--public`` other training images, disjoint from the board's.

    python benchmarks/privacy.py                      # both parts (about an hour here)
    python benchmarks/privacy.py --parts tradeoff     # one part
    python benchmarks/privacy.py --quick              # a smoke run into privacy_quick.json

Outputs: ``privacy.json`` (rows, settings, the command), ``privacy_tradeoff.png`` (task
accuracy against the attacker's PSNR and SSIM, one curve per defence) and
``privacy_grid.png`` (held-out originals against reconstructions).
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from cloud_trainer.evaluate import Evaluator
from cloud_trainer.optim import make_optimizer
from edge_runtime.backends import ExecuTorchBackend
from toolkit.build.export import ExportConfig, export_artifacts
from toolkit.core.artifacts.manifest import load_manifest
from toolkit.core.data.datasets import Dataset, batches, load_dataset, normalize, shared_cifar10
from toolkit.core.models import CIFAR_MEAN, CIFAR_STD, MODELS
from toolkit.core.models.exits import ExitHeadConfig
from toolkit.core.models.segments import build_segments, load_segments
from toolkit.core.privacy import Privacy, cut_transform, epsilon, public_state
from toolkit.core.protocol.codec import BatchMeta, parse_codec
from toolkit.core.protocol.quant import DEFAULT_SCHEME, QuantScheme
from toolkit.privacy.attack import AttackConfig, observed_cuts, run_attack, save_grid

RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "work" / "privacy"
LEAK_CODECS = ("int8", "int4", "int2")
# (defence, codec): the quantization curve first, then one curve per defence
TRADEOFF = (
    [("none", c) for c in ("int8", "int4", "int2")]
    + [(f"gaussian:{s}", "int8") for s in (0.25, 0.5, 1, 2)]
    + [(f"laplace:{s}", "int8") for s in (0.25, 0.5, 1, 2)]
    + [(f"adversarial:{w}", "int8") for w in (0.1, 0.3, 1, 3)]
)
GRID_ROWS = ("none/int8", "none/int2", "gaussian:0.5/int8", "gaussian:2/int8",
             "adversarial:1/int8", "adversarial:3/int8")


def log(msg: str) -> None:
    print(f"[privacy {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ results file
class Results:
    """Rows keyed by (part, key); a row is kept only if its settings match this run's."""

    def __init__(self, path: Path, settings: dict, command: str) -> None:
        self.path = path
        self.settings = settings
        self.data = {"settings": settings, "command": command, "rows": []}
        if path.exists():
            old = json.loads(path.read_text())
            self.data["rows"] = [r for r in old.get("rows", [])
                                 if r.get("settings") == self._settings_of(r["part"])]

    def _settings_of(self, part: str) -> dict:
        return {k: v for k, v in self.settings.items() if k in ("common", part)}

    def has(self, part: str, key: str) -> bool:
        return any(r["part"] == part and r["key"] == key for r in self.data["rows"])

    def add(self, part: str, key: str, row: dict) -> None:
        self.data["rows"].append({"part": part, "key": key,
                                  "settings": self._settings_of(part), **row})
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)

    def rows(self, part: str) -> list[dict]:
        return [r for r in self.data["rows"] if r["part"] == part]


# ------------------------------------------------------------------ data
def cifar_split(args) -> tuple[Dataset, Dataset, Dataset, str]:
    src = shared_cifar10()
    if src is None:
        sys.exit("benchmarks/privacy.py needs the CIFAR-10 copy (../shared/data/cifar10.npz or "
                 "$HIERTRAIN_CIFAR10)")
    full = load_dataset(src, "train")
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0))
    board_idx, public_idx = perm[:args.train], perm[args.train:args.train + args.public]

    def sub(idx) -> Dataset:
        return Dataset(x=full.x[idx].clone(), y=full.y[idx].clone(), classes=full.classes,
                       name=full.name)

    return sub(board_idx), sub(public_idx), full, str(src)


def norm(x: torch.Tensor) -> torch.Tensor:
    return normalize(x, CIFAR_MEAN, CIFAR_STD)


# ------------------------------------------------------------------ leak
def part_leak(args, res: Results, public: Dataset, heldout: Dataset, grid: dict) -> None:
    px, hx = norm(public.x), norm(heldout.x)
    cfg = AttackConfig(epochs=args.leak_attack_epochs)
    for name, spec in MODELS.items():
        for split in spec.splits:
            todo = [c for c in LEAK_CODECS if not res.has("leak", f"{name}/{split}/{c}")]
            if not todo:
                continue
            built = build_segments(name, split, num_classes=10, input_shape=(3, 32, 32),
                                   exit_cfg=ExitHeadConfig(channels=spec.exit_channels))
            edge = built.step.edge
            for codec_name in todo:
                codec = parse_codec(codec_name)
                scheme = codec.scheme(DEFAULT_SCHEME)
                log(f"leak: {name} {split} {codec_name}")
                pc = observed_cuts(edge, px, codec=codec, scheme=scheme)
                hc = observed_cuts(edge, hx, codec=codec, scheme=scheme)
                result, rebuilt = run_attack(pc, px, hc, hx, mean=CIFAR_MEAN, std=CIFAR_STD,
                                             cfg=cfg)
                row = {"model": name, "split": split, "codec": codec_name,
                       "cut_shape": list(built.cut_shape), "weights": "init (seed 0)",
                       **result.to_dict()}
                if codec_name == "int8":  # deflate is lossless: the same tensor, checked
                    d = parse_codec("int8+deflate")
                    same = torch.equal(observed_cuts(edge, hx[:64], codec=d, scheme=scheme),
                                       hc[:64])
                    row["int8+deflate"] = "identical tensor, same attack" if same else "DIFFERS"
                res.add("leak", f"{name}/{split}/{codec_name}", row)
                log(f"  PSNR {result.psnr:.2f} dB, SSIM {result.ssim:.3f} "
                    f"(floor {result.baseline_psnr:.2f} / {result.baseline_ssim:.3f})")
                grid[f"leak {name} {split} {codec_name}"] = rebuilt[:8]


# ------------------------------------------------------------------ trade-off
def export_for(defence: str, codec: str) -> Path:
    out = WORK / f"smallcnn-block1-{defence.replace(':', '_')}-{codec.replace('+', '_')}"
    if not (out / "manifest.json").exists():
        log(f"export {defence} {codec}")
        export_artifacts(ExportConfig(model="smallcnn", out=out, split="block1", batch=64,
                                      board="rpi4", privacy=defence, codec=codec, force=True))
    return out


def train_ht(artifacts: Path, board: Dataset, epochs: int, seed: int = 0) -> dict:
    """The board's ExecuTorch program and the cloud's step, joined by the codec's bytes."""
    manifest = load_manifest(artifacts)
    backend = ExecuTorchBackend(manifest)
    cloud = load_segments(manifest).cloud.train()
    opt = make_optimizer(cloud.parameters(), manifest)
    codec = parse_codec(manifest.codec_name)
    scheme = QuantScheme.from_dict(manifest.data["quantization"])
    protect = cut_transform(manifest.privacy)
    ds = Dataset(x=norm(board.x), y=board.y, classes=board.classes, name=board.name)
    bs = manifest.batch_size
    t0, seq, history = time.monotonic(), 0, []
    for epoch in range(epochs):
        loss_sum = exit_ok = cloud_ok = seen = 0
        for i, (x, y) in enumerate(batches(ds, bs, epoch=epoch, seed=seed)):
            step = backend.step(x, y)
            msg = codec.encode(protect(step.cut), y, BatchMeta("priv", "edge", seq, epoch, i),
                               base=scheme)
            b = codec.decode(msg)
            logits = cloud(b.tensor)
            loss = F.cross_entropy(logits, b.labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seq += 1
            loss_sum += step.loss
            exit_ok += int((step.exit_logits.argmax(1) == y).sum())
            cloud_ok += int((logits.argmax(1) == y).sum())
            seen += len(y)
        history.append({"epoch": epoch, "edge_loss": round(loss_sum / max(1, seen // bs), 4),
                        "exit_train_acc": round(exit_ok / seen, 4),
                        "cloud_train_acc": round(cloud_ok / seen, 4)})
        log(f"  epoch {epoch + 1}/{epochs}: {history[-1]}")
    return {"manifest": manifest, "edge_state": public_state(backend.state_dict()),
            "cloud": cloud, "history": history, "train_s": time.monotonic() - t0,
            "backend": backend.name,
            "lowering": manifest.data["programs"]["edge_train"]["lowering"]["convolutions"]}


def part_tradeoff(args, res: Results, board: Dataset, public: Dataset, src: str,
                  grid: dict) -> None:
    heldout = Dataset(x=board.x[:args.heldout], y=board.y[:args.heldout], classes=board.classes,
                      name=board.name)  # the board's own images: what the attacker wants
    px, hx = norm(public.x), norm(heldout.x)
    cfg = AttackConfig(epochs=args.attack_epochs)
    evaluator = None
    for defence, codec_name in TRADEOFF:
        key = f"{defence}/{codec_name}"
        if res.has("tradeoff", key):
            continue
        log(f"tradeoff: {key}")
        artifacts = export_for(defence, codec_name)
        trained = train_ht(artifacts, board, args.epochs)
        manifest = trained["manifest"]
        if evaluator is None:
            evaluator = Evaluator(manifest, src, limit=args.test)
        step = load_segments(manifest).step
        step.load_state_dict(trained["edge_state"])
        full_acc, exit_acc = evaluator.evaluate(step, trained["cloud"])
        privacy: Privacy = manifest.privacy
        codec = parse_codec(codec_name)
        scheme = QuantScheme.from_dict(manifest.data["quantization"])
        pc = observed_cuts(step.edge, px, codec=codec, scheme=scheme, privacy=privacy,
                           noise_seed=1)
        hc = observed_cuts(step.edge, hx, codec=codec, scheme=scheme, privacy=privacy,
                           noise_seed=2)
        result, rebuilt = run_attack(pc, px, hc, hx, mean=CIFAR_MEAN, std=CIFAR_STD, cfg=cfg)
        n_cut = math.prod(manifest.cut_shape)
        row = {"defence": privacy.kind, "strength": privacy.scale, "spec": privacy.spec(),
               "codec": codec_name, "full_accuracy": round(full_acc, 4),
               "exit_accuracy": round(exit_acc, 4),
               "epsilon_per_release": epsilon(privacy, n_cut),
               "epsilon_run": epsilon(privacy, n_cut, releases=args.epochs),
               "train_s": round(trained["train_s"], 1), "backend": trained["backend"],
               "lowering": trained["lowering"], "history": trained["history"],
               **result.to_dict()}
        res.add("tradeoff", key, row)
        log(f"  full {full_acc:.3f}, exit {exit_acc:.3f}; PSNR {result.psnr:.2f} dB, "
            f"SSIM {result.ssim:.3f}")
        grid[key] = rebuilt[:8]
    grid["originals"] = heldout.x[:8]


# ------------------------------------------------------------------ plots
def plot_tradeoff(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[dict]] = {}
    for r in rows:
        name = "quantization (bits)" if r["defence"] == "none" else r["defence"]
        curves.setdefault(name, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "psnr", "attacker PSNR (dB, lower = more private)"),
                              (axes[1], "ssim", "attacker SSIM (lower = more private)")):
        for name, pts in curves.items():
            if name != "quantization (bits)":
                pts = sorted(pts, key=lambda r: r["strength"])
                base = [r for r in rows if r["defence"] == "none" and r["codec"] == "int8"]
                pts = base + pts
            ax.plot([p[metric] for p in pts], [p["full_accuracy"] for p in pts], "o-",
                    label=name)
            for p in pts:
                tag = p["codec"] if name.startswith("quant") else (
                    "none" if p["defence"] == "none" else f"{p['strength']:g}")
                ax.annotate(tag, (p[metric], p["full_accuracy"]), fontsize=7,
                            textcoords="offset points", xytext=(3, 3))
        if rows:
            ax.axvline(rows[0]["baseline_" + metric], color="grey", ls=":", lw=1,
                       label="attacker without the cut (mean image)")
        ax.set_xlabel(label)
        ax.set_ylabel("full-model test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("smallcnn split at block1, CIFAR-10 (JPEG copy): accuracy against what the "
                 "cut reveals", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_leak_table(res: Results, command: str) -> None:
    """The planner's table (``toolkit.plan.leakage``): int8 rows of the leak part."""
    from toolkit.plan.leakage import LEAKAGE_FILE

    cuts = {f"{r['model']}/{r['split']}": {k: r[k] for k in ("psnr", "ssim", "baseline_psnr",
                                                             "baseline_ssim", "cut_shape")}
            for r in res.rows("leak") if r["codec"] == "int8"}
    if cuts:
        table = {"written_by": command, "data": "CIFAR-10 (JPEG copy), 3x32x32",
                 "weights": "exported initial weights (seed 0)", "codec": "int8",
                 "settings": res.settings, "cuts": cuts}
        LEAKAGE_FILE.write_text(json.dumps(table, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="tradeoff,leak")
    p.add_argument("--train", type=int, default=20000, help="the board's training images")
    p.add_argument("--public", type=int, default=4000, help="the attacker's public images")
    p.add_argument("--heldout", type=int, default=500, help="images the attacker rebuilds")
    p.add_argument("--test", type=int, default=2000, help="test images for accuracy")
    p.add_argument("--epochs", type=int, default=4, help="hierarchical training epochs")
    p.add_argument("--attack-epochs", type=int, default=4)
    p.add_argument("--leak-attack-epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny sizes, privacy_quick.json")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.public, args.heldout, args.test = 640, 320, 64, 256
        args.epochs = args.attack_epochs = args.leak_attack_epochs = 1
    torch.set_num_threads(args.threads)
    out = args.out or RESULTS / ("privacy_quick.json" if args.quick else "privacy.json")
    WORK.mkdir(parents=True, exist_ok=True)
    common = {"train": args.train, "public": args.public, "heldout": args.heldout,
              "attacker": asdict(AttackConfig())}
    settings = {"common": common,
                "tradeoff": {"epochs": args.epochs, "attack_epochs": args.attack_epochs,
                             "test": args.test},
                "leak": {"attack_epochs": args.leak_attack_epochs}}
    command = "python benchmarks/privacy.py " + shlex.join(argv if argv is not None
                                                            else sys.argv[1:])
    res = Results(out, settings, command.strip())
    board, public, full, src = cifar_split(args)
    grid_cache = out.with_name(out.stem + "_grid.pt")
    grid: dict = torch.load(grid_cache) if grid_cache.exists() else {}
    parts = args.parts.split(",")
    if "tradeoff" in parts:
        part_tradeoff(args, res, board, public, src, grid)
        torch.save(grid, grid_cache)
        plot_tradeoff(res.rows("tradeoff"), out.with_name(out.stem + "_tradeoff.png"))
    if "leak" in parts:
        heldout = Dataset(x=board.x[:args.heldout], y=board.y[:args.heldout],
                          classes=board.classes, name=board.name)
        part_leak(args, res, public, heldout, grid)
        torch.save(grid, grid_cache)
        if not args.quick:
            write_leak_table(res, command.strip())
    rows = [("original", grid["originals"])] if "originals" in grid else []
    rows += [(k, grid[k]) for k in GRID_ROWS if k in grid]
    rows += [(k.removeprefix("leak "), v) for k, v in grid.items()
             if k.startswith("leak ") and k.endswith("int8")
             and k.split()[2] in ("block1", "stage2", "layer1", "layer3")]
    if rows:
        save_grid(rows, out.with_name(out.stem + "_grid.png"))
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
