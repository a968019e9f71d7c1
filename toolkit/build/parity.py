"""Gradient parity between an ExecuTorch training program and eager PyTorch.

Never trust a lowering without this check: ExecuTorch 1.5.1 has produced
silently wrong gradients here (max-pool backward, BatchNorm buffers). The
exporter runs it on every program it writes and records the result.

Two figures. The *global* relative error ``||g - r|| / ||r||`` over all
parameter gradients concatenated is the usual gradient-check measure and the
one held to 1e-4. The *per-tensor* error ``||g_t - r_t|| / max(||r_t||, 1e-3 *
max_s ||r_s||)`` is reported too (floored because some gradients are
mathematically zero: the bias of a conv followed by BatchNorm). Per tensor,
float32 can legitimately differ far more: ExecuTorch's portable kernels sum
sequentially, and a normalisation-layer bias gradient is occasionally a heavily
cancelling sum whose relative error then reaches ~1e-3..1e-2 (the same order
of summation in eager PyTorch gives the same figure; docs/export.md).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from toolkit.core.et_program import TrainingProgram
from toolkit.core.models.edge_program import EdgeTrainStep

FLOOR = 1e-3


Grads = dict[str, torch.Tensor]


def relative_errors(test: Grads, ref: Grads) -> dict[str, float]:
    missing = set(ref) ^ set(test)
    if missing:
        raise ValueError(f"gradient names differ: {sorted(missing)}")
    norms = {k: float(r.double().norm()) for k, r in ref.items()}
    floor = FLOOR * max(norms.values(), default=0.0) or 1e-30
    return {
        k: float((test[k].double() - ref[k].double()).norm()) / max(norms[k], floor)
        for k in ref
    }


@dataclass
class ParityReport:
    loss_et: float
    loss_eager: float
    grad_errors: dict[str, float] = field(default_factory=dict)
    output_errors: list[float] = field(default_factory=list)

    global_error: float = 0.0

    @property
    def max_rel_grad_error(self) -> float:
        return max(self.grad_errors.values(), default=0.0)

    @property
    def loss_abs_error(self) -> float:
        return abs(self.loss_et - self.loss_eager)

    def worst(self) -> str:
        name = max(self.grad_errors, key=self.grad_errors.get)
        return f"{name} (relative error {self.grad_errors[name]:.2e})"


def global_relative_error(test: Grads, ref: Grads) -> float:
    num = sum(float((test[k].double() - ref[k].double()).pow(2).sum()) for k in ref)
    den = sum(float(ref[k].double().pow(2).sum()) for k in ref)
    return (num / den) ** 0.5 if den > 0 else num**0.5


def eager_gradients(step: EdgeTrainStep, x, y) -> tuple[list[torch.Tensor], Grads]:
    ref = copy.deepcopy(step).train()
    ref.zero_grad(set_to_none=True)
    outs = ref(x, y)
    outs[0].backward()
    grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}
    return [o.detach() for o in outs], grads


def check_program(
    program: TrainingProgram, step: EdgeTrainStep, x: torch.Tensor, y: torch.Tensor
) -> ParityReport:
    """Run one ``forward_backward`` of a loaded training program and compare with eager."""
    et_outs = program.forward_backward(x, y)
    et_grads = program.named_gradients()
    ref_outs, ref_grads = eager_gradients(step, x, y)
    return ParityReport(
        loss_et=float(et_outs[0]),
        loss_eager=float(ref_outs[0]),
        grad_errors=relative_errors(et_grads, ref_grads),
        global_error=global_relative_error(et_grads, ref_grads),
        output_errors=[
            float((a - b).abs().max()) if a.numel() else 0.0
            for a, b in zip(et_outs[1:], ref_outs[1:], strict=True)
        ],
    )
