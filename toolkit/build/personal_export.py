"""``toolkit export --personalise``: a frozen backbone with trainable exits, as ExecuTorch programs.

Written atomically like ``toolkit export`` (hidden temporary directory, renamed
into place when complete). The directory holds:

=======================  =====================================================
``personal_train.pte``   ``forward(x[B], y[B], w[B]) -> (loss, *exit_logits,
                         final_logits)``; gradients for the exit heads only
                         (the backbone's weights are constants in the program)
``personal_forward.pte`` ``forward(x[B], *exit_weights) -> (*exit_logits,
                         final_logits)``: pseudo-labels, calibration, evaluation
``personal_seg<k>.pte``  ``forward(a[1], *exit_weights_k) -> (a_next,
                         logits_k)``: early-exit inference one segment at a time;
                         the last segment ends at the backbone's classifier
``personal_full.pte``    ``forward(x[1]) -> final_logits``: the original network,
                         the baseline early exits are measured against
``backbone.pt``          the frozen backbone (state dict of the full model)
``exits_init.pt``        initial exit weights, keyed like the training program
``personal.json``        schema ``hiertrain.personal`` v1
=======================  =====================================================

Exit weights are *inputs* of the forward programs so that the board runs them
with the weights it personalised; the backbone is baked in as constants.

``toolkit bake`` (:func:`bake_personal`) later adds ``baked_seg<k>.pte`` and
``baked.json``: one policy's segments with the personalised exit weights as constants.
The names and the readers of all these files are run-time code and live in
``toolkit.core.artifacts.personal``; this module only writes them.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from toolkit.build.export import (
    PARITY_GATE,
    PARITY_GATE_TENSOR,
    OptimizerConfig,
    _prepare_out,
    _publish,
    _versions,
)
from toolkit.core.artifacts.atomic import atomic_write_bytes
from toolkit.core.artifacts.manifest import Manifest, sha256_file
from toolkit.core.artifacts.personal import (  # noqa: F401 - names the build side shares
    BACKBONE,
    BAKED_MANIFEST,
    BAKED_SCHEMA,
    BAKED_SCHEMA_VERSION,
    EXITS_INIT,
    FORWARD_PTE,
    FULL_PTE,
    PERSONAL_MANIFEST,
    PERSONAL_SCHEMA,
    PERSONAL_SCHEMA_VERSION,
    TRAIN_PTE,
    baked_segment_file,
    choose_exits,
    exit_state_digest,
    is_personal,
    load_personal_manifest,
    load_state_dir,
    resolve_policy,
    segment_file,
    validate_baked,
    validate_personal,
)
from toolkit.core.errors import ExportError, HiertrainError
from toolkit.core.models import get_spec
from toolkit.core.models.personal import (
    MultiExitNet,
    PersonalForward,
    PersonalSpec,
    PersonalTrainStep,
    build_multi_exit,
    default_exit_points,
    exit_state,
    load_backbone,
    load_exit_state,
    load_personal_net,
)


@dataclass(frozen=True)
class PersonalExportConfig:
    model: str
    out: Path
    checkpoint: str | Path | None = None  # None: random backbone (tests of the pipeline only)
    exit_points: tuple[str, ...] | None = None
    exit_channels: int = 32
    batch: int = 32
    num_classes: int = 10
    input_shape: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(
        lr=0.05, momentum=0.9, weight_decay=5e-4))
    seed: int = 0
    force: bool = False
    verify: bool = True


class _ExitWeightsAsInputs(nn.Module):
    """``forward(x, *weights)``: ``module`` run with the given (exit) weights."""

    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__()
        self.module = module
        self.names = names

    def forward(self, x, *weights):
        return torch.func.functional_call(
            self.module, dict(zip(self.names, weights, strict=True)), (x,)
        )


def lower_personal_train(step: PersonalTrainStep, x, y, w) -> bytes:
    """Joint forward/backward graph -> ``.pte``; refuses buffer mutations (see lowering.py)."""
    from executorch.exir import EdgeCompileConfig, to_edge
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    from toolkit.build.lowering import _explain, _quiet

    step.train()
    try:
        with _quiet():
            ep = _export_forward_backward(export(step, (x, y, w), strict=False))
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise ExportError(f"torch.export failed on the personalisation step: {exc}") from exc
    if "BUFFER_MUTATION" in [s.kind.name for s in ep.graph_signature.output_specs]:
        raise ExportError("the personalisation step mutates buffers (a backbone module in "
                          "training mode); the frozen backbone must run in eval mode")
    try:
        with _quiet():
            prog = to_edge(ep, compile_config=EdgeCompileConfig(
                _check_ir_validity=False)).to_executorch()
    except Exception as exc:  # noqa: BLE001
        raise _explain(exc, "personalisation training program") from exc
    return prog.buffer


def lower_with_exit_weights(module: nn.Module, names: list[str], x: torch.Tensor
                            ) -> tuple[bytes, str]:
    """Forward program with ``names`` as inputs after ``x``; XNNPACK if it takes it."""
    from torch.export import export

    from toolkit.build.lowering import _quiet, lower_forward

    module.eval()
    params = dict(module.named_parameters())
    weights = tuple(params[n].detach() for n in names)
    try:
        with _quiet():
            ep = export(_ExitWeightsAsInputs(module, names), (x, *weights), strict=False)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"torch.export failed on a personalised forward program: {exc}") from exc
    return lower_forward(ep, "personalised forward program")


def _resolve_spec(cfg: PersonalExportConfig) -> tuple[PersonalSpec, tuple, tuple]:
    spec = get_spec(cfg.model)
    if spec.kind != "stages":
        raise HiertrainError(
            f"--personalise attaches exits after the stages of a built-in model (smallcnn, "
            f"vgg16, resnet18); {cfg.model} is not one yet: use hierarchical training "
            "(toolkit export without --personalise) for it"
        )
    shape = tuple(cfg.input_shape or spec.input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise HiertrainError(f"input shape must be C,H,W with positive sizes, got {shape}")
    mean = tuple(cfg.mean) if cfg.mean else (spec.mean if shape[0] == len(spec.mean) else None)
    std = tuple(cfg.std) if cfg.std else (spec.std if shape[0] == len(spec.std) else None)
    if mean is None or std is None or len(mean) != shape[0] or len(std) != shape[0]:
        raise HiertrainError(f"input has {shape[0]} channels: give --mean and --std with "
                             f"{shape[0]} values each")
    if cfg.batch < 1:
        raise HiertrainError(f"batch size must be at least 1, got {cfg.batch}")
    points = tuple(cfg.exit_points or default_exit_points(cfg.model))
    return (PersonalSpec(model=cfg.model, num_classes=cfg.num_classes, input_shape=shape,
                         exit_points=points, exit_channels=cfg.exit_channels, seed=cfg.seed),
            mean, std)


def export_personal(cfg: PersonalExportConfig,
                    progress: Callable[[str], None] = lambda _m: None) -> Manifest:
    spec, mean, std = _resolve_spec(cfg)
    backbone = load_backbone(cfg.model, cfg.checkpoint, num_classes=cfg.num_classes,
                             input_shape=spec.input_shape, seed=cfg.seed)
    backbone_state = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    net = build_multi_exit(spec, backbone)
    out = Path(cfg.out)
    tmp = _prepare_out(out, cfg.force)
    try:
        data = _write(cfg, spec, mean, std, net, backbone_state, tmp, progress)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Manifest(data=data, root=out)


def exit_weight_names(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters()]


def _write(cfg: PersonalExportConfig, spec: PersonalSpec, mean, std, net: MultiExitNet,
           backbone_state: dict, tmp: Path, progress: Callable[[str], None]) -> dict:
    b, shape = cfg.batch, spec.input_shape
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(b, *shape, generator=gen)
    y = torch.randint(0, spec.num_classes, (b,), generator=gen)
    w = (torch.rand(b, generator=gen) > 0.3).to(torch.float32)
    step = PersonalTrainStep(net)

    progress(f"lowering the personalisation program ({cfg.model}, exits after "
             f"{', '.join(spec.exit_points)}, batch {b})")
    (tmp / TRAIN_PTE).write_bytes(lower_personal_train(copy.deepcopy(step), x, y, w))
    progress("lowering the batch forward program")
    fwd = PersonalForward(copy.deepcopy(net))
    fwd_names = exit_weight_names(fwd)
    buf, fwd_backend = lower_with_exit_weights(fwd, fwd_names, x)
    (tmp / FORWARD_PTE).write_bytes(buf)
    segments = []
    a = x[:1]
    for k, seg in enumerate(copy.deepcopy(net).segments()):
        progress(f"lowering early-exit segment {k}")
        names = exit_weight_names(seg)
        buf, backend = lower_with_exit_weights(seg, names, a)
        (tmp / segment_file(k)).write_bytes(buf)
        with torch.no_grad():
            a_next, _ = seg.eval()(a)
        segments.append({"file": segment_file(k), "backend": backend, "weights": names,
                         "input_shape": list(a.shape), "output_shape": list(a_next.shape),
                         "exit": spec.exit_points[k] if k < len(spec.exit_points) else None})
        a = a_next
    progress("lowering the full-network baseline")
    buf, full_backend = lower_with_exit_weights(copy.deepcopy(net.backbone), [], x[:1])
    (tmp / FULL_PTE).write_bytes(buf)
    torch.save(backbone_state, tmp / BACKBONE)
    torch.save(exit_state(net), tmp / EXITS_INIT)

    parity: dict = {"checked": False, "global_rel_grad_error": None, "max_rel_grad_error": None,
                    "loss_abs_error": None}
    if cfg.verify:
        progress("checking gradient parity against eager PyTorch")
        report = check_personal_program((tmp / TRAIN_PTE).read_bytes(), step, x, y, w)
        if (report["global_rel_grad_error"] > PARITY_GATE
                or report["max_rel_grad_error"] > PARITY_GATE_TENSOR
                or report["loss_abs_error"] > 1e-4 * max(1.0, abs(report["loss_eager"]))):
            raise ExportError(
                f"the personalisation program's gradients differ from eager PyTorch (global "
                f"relative error {report['global_rel_grad_error']:.2e}); an ExecuTorch lowering "
                "bug in an exit head: try --exit-channels 0"
            )
        parity = {"checked": True, **{k: report[k] for k in (
            "global_rel_grad_error", "max_rel_grad_error", "loss_abs_error")}}

    flops = train_flops(step, x, y, w)
    files = [TRAIN_PTE, FORWARD_PTE, FULL_PTE, BACKBONE, EXITS_INIT]
    files += [s["file"] for s in segments]
    data = {
        "schema": PERSONAL_SCHEMA,
        "schema_version": PERSONAL_SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "backbone": {"model": cfg.model, "checkpoint": None if cfg.checkpoint is None
                     else str(cfg.checkpoint), "frozen": True},
        "spec": spec.to_dict(),
        "normalization": {"mean": list(mean), "std": list(std)},
        "batch_size": b,
        "optimizer": cfg.optimizer.to_dict(),
        "programs": {
            "train": {"file": TRAIN_PTE, "inputs": ["x", "y", "w"],
                      "outputs": ["loss", *[f"exit_logits:{p}" for p in spec.exit_points],
                                  "final_logits"],
                      "parameters": [n for n, _ in step.named_parameters()]},
            "forward": {"file": FORWARD_PTE, "backend": fwd_backend, "weights": fwd_names},
            "segments": segments,
            "full": {"file": FULL_PTE, "backend": full_backend},
        },
        "cost": {"train_step_flops": flops, "trainable_parameters": sum(
            p.numel() for p in step.parameters())},
        "parity": parity,
        "artifacts": {n: {"sha256": sha256_file(tmp / n), "bytes": (tmp / n).stat().st_size}
                      for n in files},
        "versions": _versions(),
    }
    validate_personal(data, "generated personal manifest")
    (tmp / PERSONAL_MANIFEST).write_text(json.dumps(data, indent=2) + "\n")
    return data


def lower_baked_segments(net: MultiExitNet, keep: Sequence[int],
                         input_shape: Sequence[int]) -> list[tuple[bytes, str]]:
    """The early-exit segments of one exit policy lowered with the exit weights *baked in*.

    The shipped ``personal_seg<k>.pte`` take the exit weights as inputs, because the
    board personalises them; XNNPACK does not take convolutions with dynamic weights, so
    a conv exit head runs on the portable kernels, and every exit is evaluated even where
    the policy never lets a sample leave. Once personalisation is over the weights are
    fixed: lowered again as constants (``net.policy_segments(keep)``: skipped exits
    merged into the next segment, nothing after the terminal), the whole segment goes to
    XNNPACK, which packs the weights once. Returns ``(buffer, backend)`` per segment.
    """
    from toolkit.build.lowering import lower_forward

    out = []
    a = torch.zeros(1, *input_shape)
    for k, seg in enumerate(copy.deepcopy(net).eval().policy_segments(keep)):
        seg = seg.eval()
        with torch.no_grad():
            try:
                ep = torch.export.export(seg, (a,))
            except Exception as exc:  # noqa: BLE001
                raise ExportError(f"torch.export failed on baked early-exit segment {k}: "
                                  f"{exc}") from exc
            out.append(lower_forward(ep, f"baked early-exit segment {k}"))
            if seg.emit_activation:
                a = seg(a)[0]
    return out


@dataclass(frozen=True)
class BakeConfig:
    artifacts: str | Path
    weights: str | Path | None = None  # personalise --out dir or exits.pt; None: initial exits
    threshold: float | None = None  # overrides the calibrated policy: one threshold for all


def bake_personal(cfg: BakeConfig, progress: Callable[[str], None] = lambda _m: None) -> dict:
    """``toolkit bake``: lower one policy's segments with its exit weights baked in, into the
    artifacts directory, recorded in ``baked.json``.

    Lowering runs torch.export, which a board should not have to carry; the board's
    ``edge-runtime infer`` finds the baked segments and uses them when they were baked
    for the exit weights and policy it runs with (``toolkit.core.artifacts.personal``).
    The old record is removed first and the new one written last, so a bake that dies
    half-way leaves no record pointing at the wrong programs.
    """
    choice = choose_exits(cfg.artifacts, cfg.weights, cfg.threshold)
    manifest, points, state = choice.manifest, choice.exit_points, choice.state
    policy, source = choice.policy, choice.source
    net = load_personal_net(manifest)
    if state is not None:
        load_exit_state(net, state, "the exit weights")
    keep = policy.keep()
    names = [*points, "final"]
    progress(f"lowering the segments of exits {', '.join(names[k] for k in keep)} with the "
             "exit weights baked in")
    lowered = lower_baked_segments(net, keep, tuple(manifest.data["spec"]["input_shape"]))
    root = Path(cfg.artifacts)
    hint = "check free space and permissions of the artifacts directory"
    (root / BAKED_MANIFEST).unlink(missing_ok=True)
    for old in root.glob("baked_seg*.pte"):
        old.unlink()
    segments = []
    for k, (buf, backend) in enumerate(lowered):
        name = baked_segment_file(k)
        atomic_write_bytes(root / name, buf, what="baked segment", hint=hint)
        segments.append({"file": name, "backend": backend, "exit": names[keep[k]],
                         "sha256": hashlib.sha256(buf).hexdigest(), "bytes": len(buf)})
    data = {
        "schema": BAKED_SCHEMA,
        "schema_version": BAKED_SCHEMA_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "personal_sha256": sha256_file(root / PERSONAL_MANIFEST),
        "exits_digest": exit_state_digest(exit_state(net)),
        "exits_source": source,
        "policy": policy.to_dict(),
        "keep": keep,
        "segments": segments,
        "versions": _versions(),
    }
    validate_baked(data, "generated baked manifest")
    atomic_write_bytes(root / BAKED_MANIFEST, (json.dumps(data, indent=2) + "\n").encode(),
                       what="baked manifest", hint=hint)
    return data


def check_personal_program(buffer: bytes, step: PersonalTrainStep, x, y, w) -> dict:
    """One ``forward_backward`` in ExecuTorch against eager autograd on the same module."""
    from toolkit.build.parity import global_relative_error, relative_errors
    from toolkit.core.et_program import TrainingProgram

    program = TrainingProgram(buffer)
    et = program.module.forward_backward("forward", (x, y, w))
    et_grads = program.named_gradients()
    ref = copy.deepcopy(step).train()
    outs = ref(x, y, w)
    outs[0].backward()
    ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    errs = relative_errors(et_grads, ref_grads)
    return {"global_rel_grad_error": global_relative_error(et_grads, ref_grads),
            "max_rel_grad_error": max(errs.values(), default=0.0),
            "loss_abs_error": abs(float(et[0]) - float(outs[0].detach())),
            "loss_eager": float(outs[0].detach())}


def train_flops(step: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of one forward + backward of ``step`` (torch's FLOP counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    ref = copy.deepcopy(step).train()
    counter = FlopCounterMode(display=False)
    with counter:
        loss = ref(*inputs)[0]
        if loss.requires_grad:
            loss.backward()
    return int(counter.get_total_flops())
