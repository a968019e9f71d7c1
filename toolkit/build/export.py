"""``toolkit export``: everything a board and the cloud need, written atomically.

The artifacts are built in a hidden temporary directory beside ``out`` and
renamed into place only when complete, so a failure (bad input, an op
ExecuTorch cannot lower, a full disk) never leaves a half-written directory
that a board could pick up.
"""

from __future__ import annotations

import copy
import datetime as dt
import importlib.metadata
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toolkit import __version__
from toolkit.core.artifacts.boards import BoardProfile, load_board
from toolkit.core.artifacts.manifest import (
    MANIFEST_NAME,
    SCHEMA_VERSION,
    Manifest,
    sha256_file,
    validate,
)
from toolkit.core.errors import ExportError, HiertrainError
from toolkit.core.models import get_spec
from toolkit.core.models.exits import ExitHeadConfig
from toolkit.core.models.segments import CLOUD_INIT, EDGE_INIT, BuiltSegments, build_segments
from toolkit.core.privacy import DEFAULT_DELTA, Privacy, epsilon, parse_privacy
from toolkit.core.protocol.codec import DEFAULT_CODEC, Codec, parse_codec, size_estimate
from toolkit.core.protocol.quant import DEFAULT_SCHEME, QuantScheme
from toolkit.plan.stats import split_stats

EDGE_TRAIN = "edge_train.pte"
EDGE_INFER = "edge_infer.pte"
# The edge program's gate judges it against float64 (toolkit.build.parity.gate_failure).
# These absolute bars remain for the personalisation program (personal_export.py):
# real lowering bugs give errors of order 1, float32 summation-order noise stays
# below 1e-4, and below 5e-2 for any single tensor (docs/export.md).
PARITY_GATE = 1e-3
PARITY_GATE_TENSOR = 5e-2


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.momentum < 0 or self.weight_decay < 0:
            raise HiertrainError(
                "optimizer needs lr > 0, momentum >= 0 and weight_decay >= 0, got "
                f"lr={self.lr}, momentum={self.momentum}, weight_decay={self.weight_decay}"
            )

    def to_dict(self) -> dict:
        return {"name": "sgd", "lr": self.lr, "momentum": self.momentum,
                "weight_decay": self.weight_decay, "nesterov": self.nesterov}


@dataclass(frozen=True)
class ExportConfig:
    model: str
    out: Path
    split: str | None = None
    board: str = "rpi4"
    batch: int | None = None
    num_classes: int = 10
    input_shape: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    exit: ExitHeadConfig | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    quant: QuantScheme = DEFAULT_SCHEME
    # toolkit.core.protocol.codec name: bits on the wire and entropy coding
    codec: str = DEFAULT_CODEC
    seed: int = 0
    edge_norm: str | None = None
    force: bool = False
    verify: bool = True
    lowering: str = "xnnpack"  # toolkit.build.lowering.LOWERINGS (docs/export.md, "Speed")
    privacy: str = "none"  # toolkit.core.privacy: the defence the board applies to the cut
    # a local state dict of the whole model (torchvision's .pth files are), loaded before the
    # cut; nothing downloads at run time
    pretrained: Path | None = None


def _versions() -> dict:
    import torchvision

    return {
        "hiertrain": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "executorch": importlib.metadata.version("executorch"),
    }


@dataclass(frozen=True)
class _Plan:
    """Every choice the export makes, resolved and checked before the (slow) lowering."""

    board: BoardProfile
    split: str
    shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch: int
    exit_cfg: ExitHeadConfig
    edge_norm: str
    estimate_mb: float
    codec: Codec
    quant: QuantScheme  # the manifest's scheme: cfg.quant with the codec's bits
    privacy: Privacy


def _resolve(cfg: ExportConfig) -> _Plan:
    codec = parse_codec(cfg.codec)
    privacy = parse_privacy(cfg.privacy)
    board = load_board(cfg.board)
    spec = get_spec(cfg.model)
    split = cfg.split or spec.default_split
    if not split:
        raise HiertrainError(
            f"{cfg.model} has no default split point; give --split, e.g. one of: "
            f"{', '.join(spec.splits)} (`toolkit models --model {cfg.model}` shows their costs)"
        )
    shape = tuple(cfg.input_shape or spec.input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise HiertrainError(f"input shape must be C,H,W with positive sizes, got {shape}")
    channels = shape[0]
    mean = tuple(cfg.mean) if cfg.mean else (spec.mean if channels == len(spec.mean) else None)
    std = tuple(cfg.std) if cfg.std else (spec.std if channels == len(spec.std) else None)
    if mean is None or std is None:
        raise HiertrainError(
            f"input has {channels} channels: give --mean and --std with {channels} values each"
        )
    if len(mean) != channels or len(std) != channels or min(std) <= 0:
        raise HiertrainError(
            f"--mean and --std need {channels} values each (std > 0), got {mean} and {std}"
        )
    batch = cfg.batch or board.default_batch
    if batch < 1:
        raise HiertrainError(f"batch size must be at least 1, got {batch}")
    exit_cfg = cfg.exit or ExitHeadConfig(channels=spec.exit_channels)
    stats = split_stats(cfg.model, split, num_classes=cfg.num_classes, input_shape=shape,
                        exit_cfg=exit_cfg)
    estimate = stats.train_memory_mb(batch)
    if estimate > board.budget_mb:
        fits = max(1, int(batch * board.budget_mb / estimate))
        raise ExportError(
            f"{cfg.model} split at {split} with batch {batch} needs ~{estimate:.0f} MB to "
            f"train, over the {board.name} budget of {board.budget_mb} MB; use --batch {fits} "
            "or less, or an earlier split point"
        )
    return _Plan(board=board, split=split, shape=shape, mean=mean, std=std, batch=batch,
                 exit_cfg=exit_cfg, edge_norm=cfg.edge_norm or spec.edge_norm,
                 estimate_mb=estimate, codec=codec,
                 quant=codec.scheme(cfg.quant) if codec.quantized else cfg.quant,
                 privacy=privacy)


def _prepare_out(out: Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise HiertrainError(f"output directory {out} already exists; pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise HiertrainError(f"output path {out} exists and is not a directory")
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as exc:
        raise HiertrainError(f"cannot write to {parent}: {exc.strerror}") from None


def _publish(tmp: Path, out: Path) -> None:
    """Swap the finished directory into place; the old one goes only after the new one is in."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.resolve().parent))
        os.replace(out, old / "x")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _pretrained_record(path: Path | None, built: BuiltSegments) -> dict:
    """Which file the initial weights came from (by hash: the path means nothing on a board)."""
    if path is None:
        return {}
    return {"pretrained": {"file": Path(path).name, "sha256": sha256_file(Path(path)),
                           "not_loaded": list(built.pretrained_skipped or [])}}


def _gate(buffer: bytes, built: BuiltSegments, batches: list) -> tuple:
    """The parity report of a lowered training program and why it fails the gate (or None)."""
    from toolkit.build.parity import check_batches, gate_failure
    from toolkit.core.et_program import TrainingProgram

    try:
        report = check_batches(TrainingProgram(buffer), built.step, batches)
    except RuntimeError as exc:  # e.g. an operator the runtime has no kernel for
        raise ExportError(
            f"the lowered training program does not run in ExecuTorch's runtime "
            f"({str(exc).strip().splitlines()[0]}; its log names the operator); move the "
            "split point before the module that needs it"
        ) from None
    return report, gate_failure(report)


def _tensor(name: str, shape, dtype: str = "float32") -> dict:
    return {"name": name, "shape": [int(s) for s in shape], "dtype": dtype}


def export_artifacts(
    cfg: ExportConfig, progress: Callable[[str], None] = lambda _msg: None
) -> Manifest:
    plan = _resolve(cfg)
    built = build_segments(cfg.model, plan.split, num_classes=cfg.num_classes,
                           input_shape=plan.shape, exit_cfg=plan.exit_cfg, seed=cfg.seed,
                           edge_norm=plan.edge_norm, privacy=plan.privacy,
                           pretrained=cfg.pretrained)
    if built.pretrained_skipped:
        progress(f"pretrained weights from {cfg.pretrained}; left at their initial values "
                 f"(shapes differ, e.g. a classifier for other classes): "
                 f"{', '.join(built.pretrained_skipped)}")
    out = Path(cfg.out)
    tmp = _prepare_out(out, cfg.force)
    try:
        manifest = _write(cfg, plan, built, tmp, progress)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest(data=manifest, root=out)


def _write(cfg: ExportConfig, plan: _Plan, built: BuiltSegments, tmp: Path,
           progress: Callable[[str], None]) -> dict:
    from toolkit.build.lowering import lower_infer, lower_train_step

    batch, shape = plan.batch, plan.shape

    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(batch, *shape, generator=gen)
    y = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    # Lowering traces (and may touch) the modules: it gets copies, so built.step keeps the
    # initial weights and statistics that edge_init.pt and the parity check need.
    progress(f"lowering the training program ({cfg.model}, split {plan.split}, batch {batch})")
    train = lower_train_step(copy.deepcopy(built.step), x, y, lowering=cfg.lowering)

    parity = {"checked": False, "global_rel_grad_error": None, "max_rel_grad_error": None,
              "loss_abs_error": None}
    if cfg.verify:
        from toolkit.build.parity import GATE_BATCHES

        progress("checking gradient parity against eager PyTorch")
        more = [(torch.randn(batch, *shape, generator=gen),
                 torch.randint(0, cfg.num_classes, (batch,), generator=gen))
                for _ in range(GATE_BATCHES - 1)]
        checked = [(x, y), *more]
        report, failure = _gate(train.buffer, built, checked)
        refused = None
        if failure is not None and train.lowering == "xnnpack":
            # An XNNPACK kernel can be less precise than ExecuTorch's own (EfficientNet-B0:
            # 1.4e-3 from float64, the same program without XNNPACK 2.9e-6): the same
            # program without the delegates, checked again, rather than no program.
            refused = failure
            progress(f"the XNNPACK program failed the parity gate ({failure}); lowering "
                     "it again without XNNPACK (--lowering matmul)")
            train = lower_train_step(copy.deepcopy(built.step), x, y, lowering="matmul")
            report, failure = _gate(train.buffer, built, checked)
        if failure is not None:
            raise ExportError(
                f"the lowered training program's gradients are wrong: {failure}; this is an "
                "ExecuTorch lowering bug for a module in this segment, move the split point"
            )
        parity = {"checked": True, "global_rel_grad_error": report.global_error,
                  "max_rel_grad_error": report.max_rel_grad_error,
                  "loss_abs_error": report.loss_abs_error,
                  "float64_rel_grad_error": report.exact_error,
                  "eager_float64_rel_grad_error": report.eager_exact_error}
        if refused is not None:
            parity["xnnpack_refused"] = refused

    progress("lowering the inference program")
    infer = lower_infer(copy.deepcopy(built.infer_module()), x[:1])
    (tmp / EDGE_TRAIN).write_bytes(train.buffer)
    (tmp / EDGE_INFER).write_bytes(infer.buffer)
    torch.save(built.step.state_dict(), tmp / EDGE_INIT)
    torch.save(built.cloud.state_dict(), tmp / CLOUD_INIT)

    stat_layers = built.step.stat_layers()
    cut = list(built.cut_shape)
    outputs = [_tensor("loss", []), _tensor("cut", [batch, *cut]),
               _tensor("exit_logits", [batch, cfg.num_classes])]
    outputs += [_tensor(f"bn_mean:{n}", [m.num_features]) for n, m in stat_layers]
    outputs += [_tensor(f"bn_var:{n}", [m.num_features]) for n, m in stat_layers]
    n_cut = math.prod(cut)
    codec_size = {"name": plan.codec.name,
                  **size_estimate(plan.codec, cut, batch, plan.quant).to_dict()}
    if plan.codec.deflate:
        codec_size["note"] = ("deflate is data-dependent: the figures are the size before "
                              "deflate, an upper bound; post-ReLU activations usually shrink a "
                              "lot further")
    manifest = {
        "schema": "hiertrain.manifest",
        "schema_version": SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seed": cfg.seed,
        "model": {"name": cfg.model, "num_classes": cfg.num_classes, "input_shape": list(shape),
                  "normalization": {"mean": list(plan.mean), "std": list(plan.std)},
                  **_pretrained_record(cfg.pretrained, built)},
        "split": {"point": plan.split, "edge_norm": plan.edge_norm,
                  "edge_stages": [n for n, _ in built.step.edge.named_children()],
                  "cloud_stages": [n for n, _ in built.cloud.named_children()]},
        "exit_head": plan.exit_cfg.to_dict(),
        "cut": {"shape": cut, "dtype": "float32", "float32_bytes_per_sample": 4 * n_cut,
                "int8_bytes_per_sample": n_cut, "codec": codec_size},
        "batch_size": batch,
        "optimizer": cfg.optimizer.to_dict(),
        "quantization": plan.quant.to_dict(),
        "codec": plan.codec.to_dict(),
        "privacy": {**plan.privacy.to_dict(),
                    "epsilon_per_release": epsilon(plan.privacy, n_cut),
                    "delta": DEFAULT_DELTA},
        "programs": {
            "edge_train": {
                "file": EDGE_TRAIN,
                "inputs": [_tensor("x", [batch, *shape]), _tensor("y", [batch], "int64")],
                "outputs": outputs,
                "parameters": train.parameters,
                "planned_arena_bytes": train.planned_arena_bytes,
                "lowering": {"convolutions": train.lowering, "layout": train.layout},
            },
            "edge_infer": {
                "file": EDGE_INFER,
                "inputs": [_tensor("x", [1, *shape])],
                "outputs": [_tensor("cut", [1, *cut]),
                            _tensor("exit_logits", [1, cfg.num_classes])],
                "backend": infer.backend,
                "weights": infer.weights,
            },
        },
        "host_stats": [{"module": n, "channels": m.num_features, "momentum": m.momentum,
                        "eps": m.eps} for n, m in stat_layers],
        "rewrites": [r.to_dict() for r in built.rewrites],
        "board": {"name": plan.board.name, "budget_mb": plan.board.budget_mb,
                  "estimated_train_mb": round(plan.estimate_mb, 1)},
        "parity": parity,
        "artifacts": {
            name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
            for name in (EDGE_TRAIN, EDGE_INFER, EDGE_INIT, CLOUD_INIT)
        },
        "versions": _versions(),
    }
    validate(manifest, "generated manifest")
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
