"""ExecuTorch training programs compute the same gradients and training run as eager PyTorch.

The exported program is run in the ExecuTorch runtime and compared with the
very same module in eager PyTorch (same weights, same batch): loss and every
parameter gradient to a relative error < 1e-4 (metric in toolkit/build/parity.py),
then 20 SGD steps with momentum and weight decay on both sides, comparing the
loss trajectory, the final weights and the BatchNorm running statistics.
Small batches and inputs keep the portable kernels quick.
"""

from __future__ import annotations

import copy

import pytest
import torch

from toolkit.build.lowering import DEFAULT_LOWERING, lower_train_step
from toolkit.build.parity import (
    GATE_FACTOR,
    ParityReport,
    check_batches,
    check_program,
    eager_gradients,
    gate_failure,
    global_relative_error,
    relative_errors,
)
from toolkit.core.et_program import TrainingProgram
from toolkit.core.models.exits import ExitHeadConfig
from toolkit.core.models.segments import build_segments

# Global relative error over all gradients (and of the loss): the bar.
TOL = 1e-4
# Any single tensor: ExecuTorch's portable kernels sum float32 sequentially, and
# on the occasional batch where a normalisation-layer bias gradient is a heavily
# cancelling sum its relative error spikes to ~1e-3..1e-2 (eager PyTorch summing
# in the same order shows the same figure). docs/export.md, "Float32 accumulation".
TENSOR_TOL = 1e-2
TRAJECTORY_TOL = 1e-3
STEPS = 20
LR, MOMENTUM, WD = 0.02, 0.9, 5e-4

TRAJECTORY_CASES = [
    # model, split, batch, input shape, edge norm
    ("smallcnn", "block1", 4, (3, 32, 32), "batch"),
    ("resnet18", "stem", 2, (3, 16, 16), "batch"),
    ("resnet18", "layer1", 2, (3, 16, 16), "batch"),
    ("vgg16", "stage1", 2, (3, 32, 32), "batch"),
    # Known gap, docs/export.md "Speed": with GroupNorm (the NCHW path of the fast
    # lowering) the 20-step loss trajectory drifts 2.6e-3 from float64 (portable
    # kernels 9e-4, eager float32 3.8e-4); the fast lowering is held to one step below.
    ("vgg16", "stage2", 2, (3, 32, 32), "group", "portable"),
]
# One-step parity only: with batch statistics on batches of 2, VGG-16 stage2's
# ExecuTorch loss trajectory drifts 1.6e-3 from float64 over 20 steps (eager
# float32: 4.5e-6), from occasional per-batch gradient spikes; a known gap,
# documented in docs/export.md, not hidden by a looser bar.
ONE_STEP_CASES = [("vgg16", "stage2", 2, (3, 32, 32), "batch"),
                  ("vgg16", "stage2", 2, (3, 32, 32), "group")]
# The cases above use the default lowering (XNNPACK); these hold the two others:
# the same program on ExecuTorch's own kernels (the fallback without XNNPACK) and
# ExecuTorch's portable convolution kernels (docs/export.md, "Speed").
LOWERING_CASES = [("smallcnn", "block1", 4, (3, 32, 32), "batch", "matmul"),
                  ("smallcnn", "block1", 4, (3, 32, 32), "batch", "portable")]
CASES = TRAJECTORY_CASES + ONE_STEP_CASES + LOWERING_CASES


def _case_id(c) -> str:
    return "-".join([c[0], c[1], c[4], *c[5:]])


def _data(batch, shape, step, seed=0):
    g = torch.Generator().manual_seed(1000 + seed + step)
    return torch.randn(batch, *shape, generator=g), torch.randint(0, 10, (batch,), generator=g)


_LOWERED: dict = {}


def _lowered(params):
    if params not in _LOWERED:
        model, split, batch, shape, norm, *lowering = params
        built = build_segments(model, split, num_classes=10, input_shape=shape,
                               exit_cfg=ExitHeadConfig(channels=16), seed=0, edge_norm=norm)
        x, y = _data(batch, shape, 0)
        program = lower_train_step(copy.deepcopy(built.step), x, y,
                                   lowering=lowering[0] if lowering else DEFAULT_LOWERING)
        _LOWERED[params] = (built.step, program.buffer, batch, shape)
    return _LOWERED[params]


# ResNet-18 to layer1 lowers for ~40 s: also with the long tests (its stem stays here).
_LONG = {("resnet18", "layer1", 2, (3, 16, 16), "batch")}
# The GroupNorm VGG-16 one-step case lowers for ~35 s; it runs with the long tests
# (.ci/run: -m slow) to keep the default suite under ten minutes on two cores.
_CASE_PARAMS = [pytest.param(c, marks=pytest.mark.slow)
                if c == ("vgg16", "stage2", 2, (3, 32, 32), "group") or c in _LONG else c
                for c in CASES]


@pytest.fixture(params=_CASE_PARAMS, ids=_case_id)
def case(request):
    return _lowered(request.param)


# The portable-kernel VGG-16 trajectory is the suite's slowest test (a minute of portable
# convolutions): marked slow, so .ci/run runs it after the default suite.
_TRAJECTORY_PARAMS = [pytest.param(c, marks=pytest.mark.slow) if "portable" in c or c in _LONG
                      else c for c in TRAJECTORY_CASES]


@pytest.fixture(params=_TRAJECTORY_PARAMS, ids=_case_id)
def trajectory_case(request):
    return _lowered(request.param)


def test_one_step_gradients_match_eager(case):
    step, buffer, batch, shape = case
    # the median of three batches, as the exporter judges (parity.check_batches: one ReLU
    # mask flipped by float32 rounding can move one small batch's gradients by ~1e-2)
    report = check_batches(TrainingProgram(buffer), step,
                           [_data(batch, shape, i) for i in (1, 2, 3)])
    assert report.loss_abs_error < TOL * max(1.0, abs(report.loss_eager))
    assert report.global_error < TOL, report.worst()
    assert report.max_rel_grad_error < TENSOR_TOL, report.worst()
    assert len(report.grad_errors) == sum(1 for _ in step.parameters())
    assert max(report.output_errors) < 1e-4
    assert gate_failure(report) is None, gate_failure(report)
    assert 0 < report.eager_exact_error < 1e-4  # eager float32 is itself off float64, a little


def _gate_report(ours: dict, eager: dict, exact: dict) -> ParityReport:
    return ParityReport(loss_et=1.0, loss_eager=1.0,
                        exact_error=global_relative_error(ours, exact),
                        eager_exact_error=global_relative_error(eager, exact),
                        exact_tensor_errors=relative_errors(ours, exact),
                        eager_exact_tensor_errors=relative_errors(eager, exact))


def test_the_gate_scales_with_eager_float32s_own_error_and_still_catches_wrong_gradients():
    built = build_segments("resnet18", "stem", num_classes=10, input_shape=(3, 16, 16),
                           exit_cfg=ExitHeadConfig(channels=16), seed=0)
    x, y = _data(8, (3, 16, 16), 0)
    _, g32 = eager_gradients(built.step, x, y)
    _, g64 = eager_gradients(built.step, x, y, torch.float64)
    assert gate_failure(_gate_report(g32, g32, g64)) is None

    # a deep segment: eager float32 drifts far from float64 (the ResNet-18 layer3 at
    # batch 32: 9.5e-4); a correct program that drifts three times as far passes the gate
    noise = torch.Generator().manual_seed(5)
    def off(grads, rel):
        return {k: v.double() + rel * v.double().norm() / v.numel() ** 0.5
                * torch.randn(v.shape, generator=noise, dtype=torch.float64)
                for k, v in grads.items()}
    eager_deep = off(g64, 1e-3)
    assert gate_failure(_gate_report(off(g64, 3e-3), eager_deep, g64)) is None
    # ...and one that is wrong by more than GATE_FACTOR times eager's error does not
    failure = gate_failure(_gate_report(off(g64, 2 * GATE_FACTOR * 1e-3), eager_deep, g64))
    assert failure is not None and "float64" in failure
    # a single wrong tensor (a kernel bug in one layer) fails, naming it
    wrong = dict(g32)
    name = next(iter(wrong))
    wrong[name] = wrong[name] * 1.5
    failure = gate_failure(_gate_report(wrong, g32, g64))
    assert failure is not None and name in failure
    # NaN never passes
    nan = {k: torch.full_like(v, float("nan")) for k, v in g32.items()}
    assert gate_failure(_gate_report(nan, g32, g64)) is not None


def _eager_run(step, batch, shape, dtype):
    model = copy.deepcopy(step).to(dtype).train()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
    losses = []
    for i in range(STEPS):
        x, y = _data(batch, shape, 10 + i)
        opt.zero_grad()
        out = model(x.to(dtype), y)
        out[0].backward()
        opt.step()
        model.apply_stats([t.detach() for t in out[3:]])
        losses.append(float(out[0].detach()))
    return model, losses


def _drift(losses, weights, ref_losses, ref_weights) -> tuple[float, float]:
    loss = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(losses, ref_losses, strict=True))
    return loss, global_relative_error(weights, ref_weights)


def test_twenty_sgd_steps_match_eager(trajectory_case):
    """20 SGD steps: ExecuTorch stays as close to the exact (float64) trajectory as eager
    float32 does. Training with batch statistics on tiny batches is chaotic: eager float32
    itself drifts from float64 by up to ~1e-3 on VGG-16 here, so the bar is
    max(1e-3, 5 x eager float32's own drift), measured in the same test."""
    step, buffer, batch, shape = trajectory_case
    program = TrainingProgram(buffer)
    host_stats = copy.deepcopy(step)  # the edge runtime keeps BN statistics on the host
    et_losses, et_opt = [], None
    for i in range(STEPS):
        x, y = _data(batch, shape, 10 + i)
        outs = program.forward_backward(x, y)
        if et_opt is None:
            et_opt = program.sgd(LR, MOMENTUM, WD)
        et_opt.step(program.named_gradients())
        host_stats.apply_stats(outs[3:])
        et_losses.append(float(outs[0]))
    eager32, losses32 = _eager_run(step, batch, shape, torch.float32)
    eager64, losses64 = _eager_run(step, batch, shape, torch.float64)

    assert abs(et_losses[0] - losses32[0]) < TOL * max(1.0, abs(losses32[0]))
    w64 = {n: p.detach() for n, p in eager64.named_parameters()}
    w32 = {n: p.detach() for n, p in eager32.named_parameters()}
    loss32, weights32 = _drift(losses32, w32, losses64, w64)
    loss_et, weights_et = _drift(et_losses, program.named_parameters(), losses64, w64)
    assert loss_et <= max(TRAJECTORY_TOL, 5 * loss32), (loss_et, loss32)
    assert weights_et <= max(TRAJECTORY_TOL, 5 * weights32), (weights_et, weights32)
    # Training must actually have moved the weights for the comparison to mean anything.
    assert global_relative_error(w32, dict(step.named_parameters())) > 1e-3
    for (name, a), (_, b) in zip(host_stats.named_buffers(), eager32.named_buffers(),
                                 strict=True):
        assert torch.allclose(a.float(), b.float(), rtol=1e-2, atol=1e-3), name


@pytest.mark.slow  # a watch on an upstream bug, 20 s: .ci/run runs it after the default suite
def test_executorch_maxpool_backward_still_needs_the_decomposition():
    """Guards the workaround: lowered without torch's decomposition, ExecuTorch 1.5.1's
    max-pool backward kernel gives wrong gradients. If this starts failing, ExecuTorch
    fixed the kernel and the decomposition can go (docs/export.md)."""
    built = build_segments("smallcnn", "block2", num_classes=10, input_shape=(3, 16, 16),
                           exit_cfg=ExitHeadConfig(channels=8), seed=0)
    x, y = _data(4, (3, 16, 16), 0)
    # Run a different program first so the arena holds stale values, as in training.
    raw = TrainingProgram(lower_train_step(copy.deepcopy(built.step), x, y,
                                           decompose=False, lowering="portable").buffer)
    raw.forward_backward(x, y)
    raw.forward_backward(*_data(4, (3, 16, 16), 1))
    report_raw = check_program(raw, built.step, x, y)
    fixed = TrainingProgram(lower_train_step(copy.deepcopy(built.step), x, y,
                                             lowering="portable").buffer)
    report_fixed = check_program(fixed, built.step, x, y)
    assert report_fixed.global_error < TOL
    assert report_raw.global_error > 1e-2
    assert gate_failure(report_fixed) is None
    assert gate_failure(report_raw) is not None  # the float64 gate still catches it


@pytest.mark.slow  # lowering ResNet-18 to layer3 at batch 32: about a minute (.ci/run: -m slow)
def test_a_deep_segment_at_a_real_batch_passes_the_float64_gate(tmp_path):
    """The issue's example, refused by the old absolute gate (3.1e-3 against eager float32):
    judged against float64 it passes, and eager float32 is measurably off float64 too."""
    from toolkit.build.export import ExportConfig, export_artifacts

    manifest = export_artifacts(ExportConfig(model="resnet18", split="layer3", batch=32,
                                             out=tmp_path / "rn18"))
    parity = manifest.data["parity"]
    assert parity["checked"]
    assert parity["eager_float64_rel_grad_error"] > 1e-5
    assert parity["float64_rel_grad_error"] <= max(
        GATE_FACTOR * parity["eager_float64_rel_grad_error"], 1e-3)
