"""The edge training step behind one small interface, on ExecuTorch or eager PyTorch.

Both backends compute the very same function (``toolkit.core.models.edge_program.EdgeTrainStep``
is what ``edge_train.pte`` was lowered from) and apply the same SGD update with the
manifest's hyper-parameters, so a run on a laptop with ``--backend torch`` is the
same experiment as a run of the exported program on a board, up to float32
summation order (tests/test_edge_runtime.py measures how close).

BatchNorm running statistics live on the host in both cases: the training program
normalises with batch statistics and returns them as extra outputs (see
``toolkit.core.models.rewrites.HostStatsBatchNorm2d``), and ``EdgeTrainStep.apply_stats``
(torch) or ``edge_runtime.host_state.HostStats`` (ExecuTorch) folds them into the running
statistics after every step, with the same operations.

The ExecuTorch backend builds no PyTorch model: everything it needs besides the program
comes from the artifacts (``edge_runtime.host_state``), so a board never runs torch's own
convolution or matrix kernels (they die with SIGILL on a Cortex-A72 with the index's torch).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from edge_runtime.config import BACKENDS
from edge_runtime.host_state import HostStats, check_state, initial_state
from edge_runtime.sgd import HostSGD
from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.errors import HiertrainError

if TYPE_CHECKING:
    from toolkit.core.models.edge_program import EdgeTrainStep

EDGE_TRAIN = "edge_train.pte"

log = logging.getLogger("edge_runtime")


@dataclass
class StepResult:
    """What one training step hands to the rest of the runtime."""

    loss: float
    cut: torch.Tensor  # the cut-layer activation, [batch, *cut_shape], detached
    exit_logits: torch.Tensor  # [batch, num_classes], detached


class EdgeBackend(ABC):
    """One SGD step of the edge segment + exit head on a static-shape batch."""

    name: str

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.batch_shape = (manifest.batch_size, *manifest.input_shape)
        opt = manifest.data["optimizer"]
        if opt.get("name", "sgd") != "sgd":
            raise HiertrainError(
                f"{manifest.root}: optimizer {opt.get('name')!r} is not supported by the edge "
                "runtime; re-export with SGD"
            )
        self.lr = float(opt["lr"])
        self.momentum = float(opt.get("momentum", 0.0))
        self.weight_decay = float(opt.get("weight_decay", 0.0))
        self.nesterov = bool(opt.get("nesterov", False))

    def check_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exported program has a static batch; a wrong shape must fail here, readably."""
        if tuple(x.shape) != self.batch_shape:
            raise HiertrainError(
                f"input batch has shape {list(x.shape)} but the artifacts in "
                f"{self.manifest.root} expect {list(self.batch_shape)} (static batch size "
                f"{self.manifest.batch_size}); feed full batches of the exported input shape"
            )
        if tuple(y.shape) != (self.batch_shape[0],):
            raise HiertrainError(
                f"labels have shape {list(y.shape)} but the artifacts expect "
                f"[{self.batch_shape[0]}]; give one label per sample"
            )
        return x.to(torch.float32).contiguous(), y.to(torch.int64).contiguous()

    @abstractmethod
    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """Forward, backward, SGD update, BN running-stat update."""

    @abstractmethod
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Edge weights incl. BN running stats, keyed like ``EdgeTrainStep.state_dict()``."""

    @abstractmethod
    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the edge weights (to resume). Optimizer momentum restarts from zero."""

    def optimizer_state(self) -> dict | None:
        """The optimizer's state (momentum buffers) for a checkpoint; None if unreachable."""
        return None

    def load_optimizer_state(self, state: dict | None) -> None:
        """Restore :meth:`optimizer_state` (None: momentum restarts from zero)."""
        return None

    lr_factor: float = 1.0

    def set_lr_factor(self, factor: float) -> None:
        """Scale the manifest's learning rate (``toolkit.core.lr_schedule``) from the next step."""
        self.lr_factor = factor
        self._apply_lr()

    def _apply_lr(self) -> None:
        optimizer = getattr(self, "optimizer", None)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["lr"] = self.lr * self.lr_factor

    def reset_optimizer(self) -> None:
        """Momentum restarts from zero at the next step (after loading the fleet's average:
        the buffers are the velocity of weights this device no longer has)."""
        raise HiertrainError(f"the {self.name} backend cannot restart its optimizer, so it "
                             "cannot take the fleet's average; drop --fleet-average")


def _load_checked(module: EdgeTrainStep, state: Mapping[str, torch.Tensor], what: str) -> None:
    check_state(module.state_dict(), state, what)
    module.load_state_dict(dict(state))


class TorchBackend(EdgeBackend):
    """Eager ``EdgeTrainStep`` + ``torch.optim.SGD``: for hosts without ExecuTorch, and
    as the reference the ExecuTorch program is checked against.

    Thread count is the caller's business (``torch.set_num_threads``).
    """

    name = "torch"

    def __init__(self, manifest: Manifest) -> None:
        from toolkit.core.models.segments import load_segments  # eager model: torch only

        super().__init__(manifest)
        self.module: EdgeTrainStep = load_segments(manifest, with_proxy=True).step.train()
        self.optimizer = torch.optim.SGD(
            self.module.parameters(), lr=self.lr, momentum=self.momentum,
            weight_decay=self.weight_decay, nesterov=self.nesterov,
        )

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        x, y = self.check_batch(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        outs = self.module(x, y)
        outs[0].backward()
        self.optimizer.step()
        self.module.apply_stats([t.detach() for t in outs[3:]])
        return StepResult(loss=float(outs[0].detach()), cut=outs[1], exit_logits=outs[2])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        _load_checked(self.module, state, "the given edge state")

    def optimizer_state(self) -> dict | None:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: dict | None) -> None:
        if state is not None:
            self.optimizer.load_state_dict(state)

    def reset_optimizer(self) -> None:
        self.optimizer.state.clear()  # the momentum buffers; the next step makes new ones


class ExecuTorchBackend(EdgeBackend):
    """The exported ``edge_train.pte`` in the ExecuTorch runtime, as it runs on a board.

    The program owns the trainable parameters; the host keeps the BN running statistics
    (updated every step from the program's extra outputs) and the rest of the exported
    state. ``state_dict()`` merges the two under the same keys, in the same order, as the
    torch backend's ``EdgeTrainStep.state_dict()``.

    The update is :class:`~edge_runtime.sgd.HostSGD` (torch's SGD, written out) on the
    program's own parameter tensors, in place, with the program's gradients: ExecuTorch's
    SGD binding exposes only ``step``, so its learning rate could not follow a schedule
    nor its momentum be checkpointed (edge_runtime/sgd.py says why not ``torch.optim``).
    """

    name = "executorch"

    def __init__(self, manifest: Manifest) -> None:
        super().__init__(manifest)
        from toolkit.core.et_program import TrainingProgram, registered_backends

        lowering = manifest.data["programs"]["edge_train"].get("lowering", {})
        if (lowering.get("convolutions") == "xnnpack"
                and "XnnpackBackend" not in registered_backends()):
            raise HiertrainError(
                f"{manifest.path(EDGE_TRAIN)} delegates to XNNPACK, which this ExecuTorch "
                "runtime lacks; re-export with `toolkit export --lowering matmul` (same "
                "math on ExecuTorch's own kernels) or use --backend torch"
            )
        self.program = TrainingProgram.from_file(manifest.path(EDGE_TRAIN))
        # Keys, shapes and the values the program does not own (BN statistics, any other
        # buffer); the parameters in here are the exported ones until the first step.
        self.host = initial_state(manifest)
        self.stats = HostStats.from_manifest(manifest, self.host)
        self.optimizer: HostSGD | None = None  # needs named_parameters: after a first run
        self._ran = False

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        outs = self.program.forward_backward(x, y)
        self._ran = True
        return outs

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        x, y = self.check_batch(x, y)
        outs = self._forward_backward(x, y)
        self._ensure_optimizer().step(self.program.named_gradients())
        self.stats.apply(outs[3:])
        return StepResult(loss=float(outs[0]), cut=outs[1], exit_logits=outs[2])

    def _materialize(self) -> None:
        """ExecuTorch exposes the program's parameter tensors only after a first run.

        A throw-away forward_backward on a zero batch creates them; without an
        optimizer step and with the BN statistics discarded it changes nothing.
        """
        if not self._ran:
            x = torch.zeros(self.batch_shape)
            y = torch.zeros(self.batch_shape[0], dtype=torch.int64)
            self._forward_backward(x, y)

    def _ensure_optimizer(self) -> HostSGD:
        if self.optimizer is None:
            self._materialize()
            self.optimizer = HostSGD(
                dict(self.program.named_parameters()), lr=self.lr * self.lr_factor,
                momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.nesterov)
        return self.optimizer

    def optimizer_state(self) -> dict | None:
        return None if self.optimizer is None else self.optimizer.state_dict()

    def reset_optimizer(self) -> None:
        if self.optimizer is not None:  # None: no step yet, no momentum to forget
            self.optimizer.momentum_buffer.clear()

    def load_optimizer_state(self, state: dict | None) -> None:
        if state is None:
            return
        try:
            self._ensure_optimizer().load_state_dict(state)
        except (ValueError, TypeError, AttributeError):
            log.warning("the checkpoint's optimizer state is not this program's (another "
                        "backend, or an older hiertrain): momentum restarts from zero")
            return
        self._apply_lr()  # the schedule's rate, not the checkpoint's

    def state_dict(self) -> dict[str, torch.Tensor]:
        # before the first step the program still holds the exported weights
        params = self.program.named_parameters() if self._ran else {}
        return {k: params.get(k, v).detach().clone() for k, v in self.host.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Load BN stats into the host and copy_ parameters into the program in place.

        Runs a throw-away step first if the program has not run yet (see
        ``_materialize``); the SGD momentum buffers are not part of the state.
        """
        check_state(self.host, state, "the given edge state")
        with torch.no_grad():
            for key, tensor in self.host.items():
                tensor.copy_(state[key].to(tensor.dtype))
        self._materialize()
        params = self.program.named_parameters()
        with torch.no_grad():
            for name, tensor in params.items():
                tensor.copy_(state[name].to(tensor.dtype))


def make_backend(name: str, manifest: Manifest) -> EdgeBackend:
    """``executorch`` (the exported program) or ``torch`` (eager, same math)."""
    if name == "executorch":
        return ExecuTorchBackend(manifest)
    if name == "torch":
        return TorchBackend(manifest)
    raise HiertrainError(f"unknown backend {name!r}; choose one of: {', '.join(BACKENDS)}")
