"""The fast lowering's module rewrites compute what the modules they replace compute.

``toolkit.build.fastconv`` swaps convolutions, ReLUs and 2x2 max-pools for forms
whose joint graph ExecuTorch runs quickly (docs/export.md, "Speed"); the
graph passes of ``toolkit.build.joint_passes`` then remove copies. Here, in float64
eager PyTorch, every rewrite must give the same outputs and the same input and
weight gradients as the original, ties in the max-pool included, and the passes
must leave a joint graph's results unchanged. (The lowered programs themselves
are held to eager PyTorch by tests/test_export_parity.py.)
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from toolkit.build.fastconv import (
    MaskReLU,
    MatmulConv2d,
    MaxPool2x2,
    channel_major_possible,
    convs_to_matmul,
)
from toolkit.build.joint_passes import drop_aliases, sink_expands

CONVS = [
    dict(in_channels=3, out_channels=8, kernel_size=3, padding=1, bias=False),
    dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, bias=True),
    dict(in_channels=4, out_channels=6, kernel_size=1, bias=False),
    dict(in_channels=4, out_channels=5, kernel_size=5, padding=2, bias=True),
    dict(in_channels=4, out_channels=5, kernel_size=3, padding=0, dilation=2),
]


def _grads(module, x, param):
    x = x.clone().requires_grad_(True)
    out = module(x)
    g = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return (out, *torch.autograd.grad(out, [x, *([param] if param is not None else [])], g))


@pytest.mark.parametrize("channel_major", [False, True])
@pytest.mark.parametrize("cfg", CONVS, ids=lambda c: f"k{c['kernel_size']}s{c.get('stride', 1)}")
def test_matmul_conv_matches_conv2d(cfg, channel_major):
    torch.manual_seed(0)
    conv = nn.Conv2d(**cfg).double()
    fast = MatmulConv2d(copy.deepcopy(conv), channel_major=channel_major)
    x = torch.randn(3, cfg["in_channels"], 9, 11, dtype=torch.float64)
    ref = _grads(conv, x, conv.weight)
    if channel_major:
        def run(t):
            return fast(t.permute(1, 0, 2, 3)).permute(1, 0, 2, 3)
    else:
        run = fast
    got = _grads(run, x, fast.weight)
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 3, 8, 10), (2, 3, 7, 9)])
def test_maxpool_routes_ties_like_pytorch(shape):
    torch.manual_seed(1)
    # Rounded ReLU outputs: many windows with equal maxima, zero and positive.
    x = torch.relu(torch.randn(*shape, dtype=torch.float64) * 2).round()
    ref = _grads(nn.MaxPool2d(2), x, None)
    got = _grads(MaxPool2x2(), x, None)
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)


def test_mask_relu_gradient_is_zero_at_zero():
    x = torch.tensor([-1.0, 0.0, 1e-30, 2.0], dtype=torch.float64)
    out, grad = _grads(MaskReLU(), x, None)
    ref_out, ref_grad = _grads(nn.ReLU(), x, None)
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)


def test_channel_major_needs_every_module_to_allow_it():
    from toolkit.core.models.exits import ExitHeadConfig, build_exit_head
    from toolkit.core.models.rewrites import make_exact

    edge = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    head = build_exit_head(4, 10, ExitHeadConfig(channels=4))
    make_exact(edge)
    make_exact(head)
    assert channel_major_possible(edge, head)
    edge.append(nn.GroupNorm(2, 4))  # GroupNorm normalises per sample: NCHW only
    assert not channel_major_possible(edge, head)
    assert convs_to_matmul(edge) == 1


def test_joint_graph_passes_keep_the_results():
    from torch.export import export
    from torch.export.experimental import _export_forward_backward

    class Step(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 4)

        def forward(self, x, y):
            h = self.lin(x)
            h = (h - h.mean(dim=0, keepdim=True)) / h.var(dim=0, keepdim=True).add(1e-5).sqrt()
            return (nn.functional.cross_entropy(h, y),)

    torch.manual_seed(2)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    ep = _export_forward_backward(export(Step(), (x, y), strict=False))
    user = iter((x, y))
    args = [ep.state_dict[s.target] if s.kind.name == "PARAMETER" else next(user)
            for s in ep.graph_signature.input_specs]
    gm = ep.graph_module
    ref = gm(*args)  # loss and the gradients
    n_expand = sum(n.target == torch.ops.aten.expand.default for n in gm.graph.nodes)
    sink_expands(gm)
    drop_aliases(gm)
    after = sum(n.target == torch.ops.aten.expand.default for n in gm.graph.nodes)
    assert n_expand > 0 and after < n_expand
    got = gm(*args)
    assert len(got) == 3
    for a, b in zip(got, ref, strict=True):
        assert torch.equal(a, b)
