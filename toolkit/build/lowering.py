"""ExecuTorch lowering of the edge programs (the only module that imports ``executorch.exir``).

Training program speed (docs/export.md, "Speed"): by default a copy of the step
is rewritten so that convolutions are matrix products (``toolkit.build.fastconv``),
copies are removed from the joint graph (``toolkit.build.joint_passes``), and the
matrix products and memory-bound ops are delegated to XNNPACK with every
operand dynamic; ``lowering="portable"`` keeps ExecuTorch's convolution kernels.

Training program: ``torch.export`` -> joint forward/backward graph -> torch's
own decomposition of ``max_pool2d_with_indices_backward`` (the portable kernel
is wrong) -> edge dialect -> ``.pte``. Inference program: forward only, with
weights and BatchNorm statistics as *inputs* so the board can run it with the
weights it trained, lowered to XNNPACK where XNNPACK takes the ops (with
dynamic weights it takes few) and to the portable kernels otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from dataclasses import dataclass

import torch
from torch import nn
from torch._decomp import get_decompositions

from toolkit.build.fastconv import DECOMPOSITIONS
from toolkit.build.joint_passes import drop_aliases, sink_expands
from toolkit.core.errors import ExportError
from toolkit.core.et_program import stderr_silenced
from toolkit.core.models.edge_program import ChannelMajorTrainStep, EdgeTrainStep

logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)

# The backward ops that the portable kernels compute wrongly, replaced by the
# decomposition torch itself ships for them.
BACKWARD_DECOMPOSITIONS = [torch.ops.aten.max_pool2d_with_indices_backward]

# How the training program computes (``toolkit export --lowering``; docs/export.md,
# "Speed"): "matmul" rewrites convolutions as im2col + mm before lowering
# (toolkit.build.fastconv), runnable by any ExecuTorch runtime; "xnnpack" does the same
# and hands the matrix products and transposes to XNNPACK (the runtime needs the
# XNNPACK backend); "portable" keeps ExecuTorch's convolution kernels (slowest).
LOWERINGS = ("xnnpack", "matmul", "portable")
DEFAULT_LOWERING = "xnnpack"


def _new_empty_strided(self, size, stride, *, dtype=None, layout=None, device=None,
                       pin_memory=None):
    """Autograd's reshape of a non-viewable gradient allocates with ``new_empty_strided``,
    which ExecuTorch has no kernel for; its strides here are the contiguous ones."""
    return torch.empty(size, dtype=dtype or self.dtype, device=device or self.device)


def _empty_permuted(size, physical_layout, *, dtype=None, layout=None, device=None,
                    pin_memory=None):
    """``empty_permuted`` (a fresh buffer in a given memory order; EfficientNet's joint graph
    has it) has no ExecuTorch kernel, and the program then fails at its first run; the
    program's tensors are contiguous, and a fresh buffer holds no values, so a contiguous one
    of the same shape is the same thing to every op that writes it."""
    del physical_layout, layout, pin_memory
    return torch.empty(size, dtype=dtype, device=device)


@contextlib.contextmanager
def _quiet():
    """ExecuTorch and export are loud (experimental-API warnings, pytree notices)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            with contextlib.redirect_stdout(io.StringIO()), stderr_silenced():
                yield
        finally:
            logging.disable(level)


def _explain(exc: Exception, what: str) -> ExportError:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "Missing out variants" in msg:
        return ExportError(
            f"ExecuTorch has no kernel for an op in the {what}: {msg}; move the split point "
            "before the module that uses it"
        )
    return ExportError(f"ExecuTorch could not lower the {what}: {msg}")


@dataclass
class TrainProgram:
    buffer: bytes
    parameters: list[str]
    planned_arena_bytes: int
    lowering: str = "portable"
    layout: str = "nchw"  # "channel_major": the segment ran on [C, N, H, W] tensors


def fast_train_step(step: EdgeTrainStep) -> tuple[EdgeTrainStep, str]:
    """The module the "matmul" lowering exports: convolutions as im2col + mm, and the
    whole segment channel-major when every module allows it. Same function, same
    parameter names; ``step`` itself is left alone. Returns the module and its layout."""
    from toolkit.build.fastconv import channel_major_possible, convs_to_matmul, to_channel_major

    step = copy.deepcopy(step)
    # Only the plain step has a channel-major form: a subclass (the adversarial step) adds
    # modules that ChannelMajorTrainStep would drop.
    if type(step) is EdgeTrainStep and channel_major_possible(step.edge, step.exit):
        to_channel_major(step)
        return ChannelMajorTrainStep(step.edge, step.exit), "channel_major"
    convs_to_matmul(step)
    return step, "nchw"


# The ops the "xnnpack" lowering hands to XNNPACK (names of its partitioner configs):
# the matrix products, and the memory-bound ops around them whose portable kernels
# are slow (transposes, the im2col slices and concatenations, elementwise math,
# the ReLU mask). Operands stay runtime inputs: the elementwise and data-movement
# configs never take a parameter as a constant, and the gemm config is told not
# to (force_non_static_weights_for_f32_linear), so a trained weight is never
# packed. Left to ExecuTorch: reductions (sum, mean: the parity of BatchNorm
# gradients depends on their order), max-pool, the loss.
XNNPACK_OPS = ("MMConfig", "PermuteConfig", "SliceCopyConfig", "CatConfig", "CloneConfig",
               "AddConfig", "SubConfig", "MulConfig", "NegConfig",
               "ReciprocalSquareRootConfig", "ReLUConfig", "ClampConfig", "CeilConfig",
               "MaximumConfig")


def xnnpack_available() -> bool:
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (  # noqa: F401
            XnnpackPartitioner,
        )
    except ImportError:
        return False
    return True


def _delegate_to_xnnpack(edge):
    """Hand the matrix products and transposes of the joint graph to XNNPACK.

    XNNPACK's gemm is 2-3x faster than ExecuTorch's optimized ``mm`` here and its
    transpose ~10x faster than the portable ``permute_copy``; convolutions it takes
    only with static weights, hence ``toolkit.build.fastconv``.
    """
    from executorch.backends.xnnpack.partition import config as xnn_config
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    by_name = {c.__name__: c for c in xnn_config.ALL_PARTITIONER_CONFIGS}
    return edge.to_backend(XnnpackPartitioner(
        configs=[by_name[n] for n in XNNPACK_OPS],
        force_non_static_weights_for_f32_linear=True))


def lower_train_step(
    step: nn.Module, x: torch.Tensor, y: torch.Tensor, *, decompose: bool = True,
    lowering: str = DEFAULT_LOWERING,
) -> TrainProgram:
    """Lower ``step`` with the given convolution ``lowering`` (``LOWERINGS``).

    ``decompose=False`` keeps ExecuTorch's own (wrong) max-pool backward kernel and
    exists only so that a test can show the workaround is still needed."""
    from executorch.exir import EdgeCompileConfig, to_edge
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    if lowering not in LOWERINGS:
        raise ExportError(f"unknown lowering {lowering!r}; choose one of: {', '.join(LOWERINGS)}")
    if lowering == "xnnpack" and not xnnpack_available():
        lowering = "matmul"  # same program without the delegates: runs on any runtime
    layout = "nchw"
    if lowering in ("xnnpack", "matmul"):
        step, layout = fast_train_step(step)
    step.train()
    try:
        with _quiet():
            ep = export(step, (x, y), strict=False)
            ep = _export_forward_backward(ep)
            decomps = {torch.ops.aten.new_empty_strided.default: _new_empty_strided,
                       torch.ops.aten.empty_permuted.default: _empty_permuted,
                       **DECOMPOSITIONS}
            if decompose:
                decomps.update(get_decompositions(BACKWARD_DECOMPOSITIONS))
            ep = ep.run_decompositions(decomps)
            if lowering != "portable":
                sink_expands(ep.graph_module)
                drop_aliases(ep.graph_module)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        raise ExportError(f"torch.export failed on the edge training step: {exc}") from exc
    kinds = [spec.kind.name for spec in ep.graph_signature.output_specs]
    if "BUFFER_MUTATION" in kinds:
        raise ExportError(
            "the edge training step mutates buffers; ExecuTorch's training module would "
            "misalign its gradients (a module with running statistics escaped the rewrites)"
        )
    try:
        with _quiet():
            edge = to_edge(ep, compile_config=EdgeCompileConfig(_check_ir_validity=False))
            if lowering == "xnnpack":
                try:
                    edge = _delegate_to_xnnpack(edge)
                except Exception:  # noqa: BLE001 - the matmul program is the fallback
                    lowering = "matmul"
            prog = edge.to_executorch()
    except Exception as exc:  # noqa: BLE001
        raise _explain(exc, "edge training program") from exc
    sizes = prog.executorch_program.execution_plan[0].non_const_buffer_sizes
    return TrainProgram(
        buffer=prog.buffer,
        parameters=[n for n, p in step.named_parameters() if p.requires_grad],
        planned_arena_bytes=int(sum(sizes)),
        lowering=lowering,
        layout=layout,
    )


class _WeightsAsInputs(nn.Module):
    def __init__(self, module: nn.Module, names: list[str]):
        super().__init__()
        self.module = module
        self.names = names

    def forward(self, x, *weights):
        return torch.func.functional_call(
            self.module, dict(zip(self.names, weights, strict=True)), (x,)
        )


@dataclass
class InferProgram:
    buffer: bytes
    weights: list[str]
    backend: str


def infer_weight_names(module: nn.Module) -> list[str]:
    """Inputs after the image: every parameter, then every floating-point buffer."""
    names = [n for n, _ in module.named_parameters()]
    names += [n for n, b in module.named_buffers() if b.is_floating_point()]
    return names


def lower_infer(module: nn.Module, x: torch.Tensor) -> InferProgram:
    from torch.export import export

    module.eval()
    names = infer_weight_names(module)
    state = {**dict(module.named_parameters()), **dict(module.named_buffers())}
    weights = tuple(state[n].detach() for n in names)
    try:
        with _quiet():
            ep = export(_WeightsAsInputs(module, names), (x, *weights), strict=False)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"torch.export failed on the edge inference program: {exc}") from exc
    buffer, backend = lower_forward(ep, "edge inference program")
    return InferProgram(buffer=buffer, weights=names, backend=backend)


def lower_forward(ep, what: str) -> tuple[bytes, str]:
    """An exported forward program as ``.pte`` bytes: XNNPACK where it lowers, else portable.

    Returns the buffer and the backend that took it (``"xnnpack"`` when any
    part was delegated). Weights that are program inputs stay dynamic, which
    XNNPACK takes for linear layers but not for convolutions.
    """
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    partitioners: list[list] = []
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import (
            XnnpackPartitioner,
        )

        partitioners.append([XnnpackPartitioner()])
    except ImportError:
        pass
    partitioners.append([])
    last: Exception | None = None
    for partitioner in partitioners:
        try:
            with _quiet():
                prog = to_edge_transform_and_lower(
                    ep, partitioner=partitioner,
                    compile_config=EdgeCompileConfig(_check_ir_validity=False),
                ).to_executorch()
        except Exception as exc:  # noqa: BLE001 - fall back to portable
            last = exc
            continue
        delegated = "executorch_call_delegate" in prog.exported_program().graph_module.code
        return prog.buffer, "xnnpack" if delegated else "portable"
    raise _explain(last, what)
