"""Static figures of an edge segment: parameters, FLOPs, cut size, training memory.

These feed ``toolkit models``, the board-budget check in the exporter and the
planner. Memory is an *estimate* made before the (slow) export so that an
oversized program is refused early; the exporter also records ExecuTorch's
planned arena for the real program.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from toolkit.core.models import build_model, get_spec
from toolkit.core.models.exits import ExitHeadConfig, build_exit_head
from toolkit.core.models.split import cut_shape, split_model

FLOAT_BYTES = 4
# Optimizer state per parameter: weight, gradient, momentum buffer.
_PARAM_COPIES = 3
# Each activation is stored for backward and has a gradient of the same size.
_ACT_COPIES = 2


@dataclass(frozen=True)
class SplitStats:
    split: str
    edge_params: int
    exit_params: int
    edge_flops: int
    exit_flops: int
    cut_shape: tuple[int, ...]
    cut_float32_bytes: int
    cut_int8_bytes: int
    activation_floats: int

    def train_memory_mb(self, batch: int) -> float:
        params = (self.edge_params + self.exit_params) * FLOAT_BYTES * _PARAM_COPIES
        acts = self.activation_floats * batch * FLOAT_BYTES * _ACT_COPIES
        return (params + acts) / 2**20

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cut_shape"] = list(self.cut_shape)
        return d


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def _activation_floats(module: nn.Module, x: torch.Tensor) -> int:
    """Floats produced by every leaf module for one sample (what backward keeps)."""
    total = x.numel()
    hooks = []

    def hook(_m, _inp, out):
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel()

    for m in module.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(hook))
    try:
        module(x)
    finally:
        for h in hooks:
            h.remove()
    return total


def split_stats(
    model_name: str,
    split: str,
    *,
    num_classes: int = 10,
    input_shape: tuple[int, int, int] | None = None,
    exit_cfg: ExitHeadConfig | None = None,
) -> SplitStats:
    spec = get_spec(model_name)
    shape = tuple(input_shape or spec.input_shape)
    exit_cfg = exit_cfg or ExitHeadConfig(channels=spec.exit_channels)
    model = build_model(model_name, num_classes=num_classes, input_shape=shape)
    seg = split_model(model, model_name, split)
    cs = cut_shape(seg.edge, shape)
    head = build_exit_head(cs[0], num_classes, exit_cfg)
    both = nn.Sequential(seg.edge, head).eval()
    x = torch.zeros(1, *shape)
    with FlopCounterMode(display=False) as edge_counter:
        cut = seg.edge(x)
    with FlopCounterMode(display=False) as exit_counter:
        head(cut)
    n = 1
    for d in cs:
        n *= d
    return SplitStats(
        split=split,
        edge_params=count_params(seg.edge),
        exit_params=count_params(head),
        edge_flops=int(edge_counter.get_total_flops()),
        exit_flops=int(exit_counter.get_total_flops()),
        cut_shape=cs,
        cut_float32_bytes=n * FLOAT_BYTES,
        cut_int8_bytes=n,
        activation_floats=_activation_floats(both, x),
    )


def model_table(
    num_classes: int = 10, input_shape: tuple[int, int, int] | None = None,
    names: list[str] | None = None,
) -> list[dict]:
    """``toolkit models --json``: a list of models, each with ``name`` and ``splits``
    (``names``: these models, e.g. ``torchvision:resnet50``; unset: the built-ins)."""
    from toolkit.core.models import MODELS

    rows = []
    for name in names or list(MODELS):
        spec = get_spec(name)
        shape = tuple(input_shape or spec.input_shape)
        full = build_model(name, num_classes=num_classes, input_shape=shape)
        rows.append({
            "name": name,
            "description": spec.description,
            "input_shape": list(shape),
            "params": count_params(full),
            "default_split": spec.default_split,
            "splits": [
                split_stats(name, s, num_classes=num_classes, input_shape=shape).to_dict()
                for s in spec.splits
            ],
        })
    return rows
