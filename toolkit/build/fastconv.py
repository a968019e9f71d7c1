"""Convolutions as matrix products, so that ExecuTorch trains them at gemm speed.

ExecuTorch 1.5.1's portable ``convolution`` and ``convolution_backward`` kernels
are plain nested loops: on the small CNN they took ~87 % of a training step
(ETDump, ``benchmarks/et_speed.py --profile``), and a step ran 20-60x slower
than eager PyTorch. The pip wheel's runtime links ExecuTorch's *optimized*
kernel library, whose ``mm`` is a blocked gemm. XNNPACK takes convolutions only
with static weights, which it packs at load time: a training program, whose
weights change every step, cannot use that.

``MatmulConv2d`` computes the same function as ``nn.Conv2d`` (groups=1, zero
padding) as im2col + one ``mm``: the ``kh * kw`` shifted windows of the
channel-major input (``[C, N, H, W]``) are stacked into a ``[C*kh*kw, N*Ho*Wo]``
matrix that the weight ``[Cout, C*kh*kw]`` multiplies. Autograd derives the
backward from the same primitives (two more ``mm`` for the weight and input
gradients, slice-scatters for col2im); nothing calls ``convolution_backward``.
The weight stays an ordinary parameter of the program, updated in place by
the optimizer, and the ``.pte`` runs on any ExecuTorch runtime (``mm`` is a
portable op too, just slower there).

``to_channel_major`` goes one step further: when every module of the edge step
is layout-agnostic or has a channel-major form, the whole segment runs on
``[C, N, H, W]`` tensors, so the im2col needs no transposes and BatchNorm's
channel-major statistics (``HostStatsBatchNorm2d``) need none either; the
input and the cut are transposed once. Per-conv transposes cost ~45 % of a
step otherwise.

Only the lowered copy is rewritten (``toolkit.build.lowering``): eager PyTorch keeps
``nn.Conv2d``, and the export's parity gate compares the two.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.core.models.exits import GlobalAvgPool, grid_mean
from toolkit.core.models.rewrites import HostStatsBatchNorm2d


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _zero_pad(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Zero padding by concatenation: the backward of ``F.pad`` is a ``constant_pad_nd``
    with negative pads (a crop), which ExecuTorch's kernel refuses; the backward of
    ``cat`` is slicing."""
    c, n, h, w = x.shape
    if ph:
        z = x.new_zeros(c, n, ph, w)
        x = torch.cat([z, x, z], dim=2)
    if pw:
        z = x.new_zeros(c, n, h + 2 * ph, pw)
        x = torch.cat([z, x, z], dim=3)
    return x


def _im2col_mm(xc: torch.Tensor, w2d: torch.Tensor, kh: int, kw: int, ph: int, pw: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Stride-1 convolution of channel-major ``xc`` by ``w2d`` ([Cout, C*kh*kw]):
    returns the output ``[Cout, N, Ho, Wo]`` and the im2col matrix."""
    c, n, h, w = xc.shape
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    if ph or pw:
        xc = _zero_pad(xc, ph, pw)
    if kh == kw == 1:
        cols = xc
    else:
        cols = torch.stack([xc[:, :, i : i + ho, j : j + wo]
                            for i in range(kh) for j in range(kw)], dim=1)
    cols = cols.reshape(c * kh * kw, n * ho * wo)
    return torch.mm(w2d, cols).view(w2d.shape[0], n, ho, wo), cols


# A stride-1 channel-major convolution as an operator with its own backward.
#
# Autograd's backward of the im2col is a col2im: one ``slice_scatter`` per kernel
# tap over the whole padded input. Written as what it is, a transposed
# convolution, the input gradient is the same im2col + ``mm`` applied to the
# output gradient with the flipped, transposed kernel (half the memory traffic,
# all in ops XNNPACK takes); the weight gradient is one ``mm`` with the saved
# im2col matrix. ``torch.export`` keeps a custom op whole in the joint graph with
# the backward registered here; ``DECOMPOSITIONS`` then replaces the forward
# node by its im2col + mm before ExecuTorch sees it.
@torch.library.custom_op("hiertrain::conv2d_cm", mutates_args=())
def conv2d_cm(xc: torch.Tensor, weight: torch.Tensor, ph: int, pw: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(output [Cout, N, Ho, Wo], im2col matrix)`` of a stride-1 convolution."""
    cout, c, kh, kw = weight.shape
    out, cols = _im2col_mm(xc, weight.reshape(cout, c * kh * kw), kh, kw, ph, pw)
    return out, cols.clone()


@conv2d_cm.register_fake
def _conv2d_cm_fake(xc, weight, ph, pw):
    cout, c, kh, kw = weight.shape
    _, n, h, w = xc.shape
    ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
    return xc.new_empty(cout, n, ho, wo), xc.new_empty(c * kh * kw, n * ho * wo)


def _conv2d_cm_setup(ctx, inputs, output):
    _, weight, ph, pw = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.padding = (ph, pw)


def _conv2d_cm_backward(ctx, grad, _grad_cols):
    cols, weight = ctx.saved_tensors
    cout, c, kh, kw = weight.shape
    ph, pw = ctx.padding
    grad_x = grad_w = None
    if ctx.needs_input_grad[0]:
        flipped = weight.flip([2, 3]).transpose(0, 1).reshape(c, cout * kh * kw)
        grad_x, _ = _im2col_mm(grad, flipped, kh, kw, kh - 1 - ph, kw - 1 - pw)
    if ctx.needs_input_grad[1]:
        # (cols @ grad^T)^T rather than grad @ cols^T: the transposed operand is then the
        # small gradient, not the 9x larger im2col matrix, and XNNPACK packs the small
        # one; same products summed in the same order (bit-identical), 1.7x faster here.
        grad_w = torch.mm(cols, grad.reshape(cout, -1).t()).t().reshape(cout, c, kh, kw)
    return grad_x, grad_w, None, None


conv2d_cm.register_autograd(_conv2d_cm_backward, setup_context=_conv2d_cm_setup)


def _conv2d_cm_decomposed(xc, weight, ph, pw):
    cout, c, kh, kw = weight.shape
    return _im2col_mm(xc, weight.reshape(cout, c * kh * kw), kh, kw, ph, pw)


# ReLU whose backward multiplies by a saved 0/1 mask instead of autograd's
# ``where(out <= 0, 0, grad)``: ExecuTorch has only a portable ``le`` and
# ``where`` for that (~25 % of a small-CNN step), while the mask
# ``ceil(clamp(x, 0, 1))`` (exactly 1 where x > 0, else 0: PyTorch's own ReLU
# gradient rule) and the product are ops XNNPACK runs.
@torch.library.custom_op("hiertrain::relu_mask", mutates_args=())
def relu_mask(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(relu(x), mask)`` with ``mask = 1`` where ``x > 0`` and ``0`` elsewhere."""
    return torch.relu(x), torch.ceil(torch.clamp(x, 0.0, 1.0))


@relu_mask.register_fake
def _relu_mask_fake(x):
    return torch.empty_like(x), torch.empty_like(x)


def _relu_mask_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _relu_mask_backward(ctx, grad, _grad_mask):
    (mask,) = ctx.saved_tensors
    return grad * mask


relu_mask.register_autograd(_relu_mask_backward, setup_context=_relu_mask_setup)


def _relu_mask_decomposed(x):
    return torch.relu(x), torch.ceil(torch.clamp(x, 0.0, 1.0))


# 2x2 / stride-2 max-pool without indices (any layout: it pools the last two dims). ExecuTorch's
# portable max_pool2d_with_indices forward took ~40 % of a small-CNN step, and its
# backward is a scatter_add. Here the four taps of every window are made
# contiguous by one transpose and compared with ``maximum``; the backward routes
# each gradient to the *first* tap (row-major) that equals the maximum, which is
# PyTorch's own rule for ties, with 0/1 indicators ``1 - ceil(clamp(max - tap, 0,
# 1))`` (exactly 1 on equality: max - tap >= 0 and is 0 only when equal). All of
# it runs in XNNPACK.
def _taps(x: torch.Tensor) -> torch.Tensor:
    c, n, h, w = x.shape
    ho, wo = h // 2, w // 2
    x = x[:, :, : 2 * ho, : 2 * wo]
    return x.reshape(c, n, ho, 2, wo, 2).permute(3, 5, 0, 1, 2, 4).reshape(4, c, n, ho, wo)


@torch.library.custom_op("hiertrain::maxpool2_cm", mutates_args=())
def maxpool2_cm(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pooled [C, N, H//2, W//2], the four taps [4, C, N, H//2, W//2])``."""
    taps = _taps(x).contiguous()
    return torch.maximum(torch.maximum(taps[0], taps[1]),
                         torch.maximum(taps[2], taps[3])), taps.clone()


@maxpool2_cm.register_fake
def _maxpool2_cm_fake(x):
    c, n, h, w = x.shape
    return x.new_empty(c, n, h // 2, w // 2), x.new_empty(4, c, n, h // 2, w // 2)


def _maxpool2_cm_setup(ctx, inputs, output):
    ctx.save_for_backward(output[0], output[1])
    ctx.in_shape = tuple(inputs[0].shape)


def _maxpool2_cm_backward(ctx, grad, _grad_taps):
    pooled, taps = ctx.saved_tensors
    c, n, h, w = ctx.in_shape
    ho, wo = h // 2, w // 2

    def equal(i):
        return 1.0 - torch.ceil(torch.clamp(pooled - taps[i], 0.0, 1.0))

    first = equal(0)
    rest = 1.0 - first
    second = equal(1) * rest
    rest = rest - second
    third = equal(2) * rest
    fourth = rest - third
    routed = torch.stack([grad * first, grad * second, grad * third, grad * fourth])
    grad_x = routed.reshape(2, 2, c, n, ho, wo).permute(2, 3, 4, 0, 5, 1).reshape(
        c, n, 2 * ho, 2 * wo)
    if (2 * ho, 2 * wo) != (h, w):  # odd sizes: the last row / column never wins
        grad_x = _zero_pad_end(grad_x, h - 2 * ho, w - 2 * wo)
    return grad_x


def _zero_pad_end(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    c, n, h, w = x.shape
    if ph:
        x = torch.cat([x, x.new_zeros(c, n, ph, w)], dim=2)
    if pw:
        x = torch.cat([x, x.new_zeros(c, n, h + ph, pw)], dim=3)
    return x


maxpool2_cm.register_autograd(_maxpool2_cm_backward, setup_context=_maxpool2_cm_setup)


def _maxpool2_cm_decomposed(x):
    taps = _taps(x)
    return torch.maximum(torch.maximum(taps[0], taps[1]),
                         torch.maximum(taps[2], taps[3])), taps


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)`` with the index-free backward above; it pools the last two
    dimensions, so ``[C, N, H, W]`` and ``[N, C, H, W]`` alike."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return maxpool2_cm(x)[0]


def _is_maxpool2x2(mod: nn.Module) -> bool:
    return (isinstance(mod, nn.MaxPool2d) and _pair(mod.kernel_size) == (2, 2)
            and _pair(mod.stride or mod.kernel_size) == (2, 2) and _pair(mod.padding) == (0, 0)
            and _pair(mod.dilation) == (1, 1) and not mod.ceil_mode and not mod.return_indices)


class MaskReLU(nn.Module):
    """``nn.ReLU`` with the mask-product backward (same values, same gradients)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return relu_mask(x)[0]


# For ``ExportedProgram.run_decompositions`` on the joint graph (toolkit.build.lowering).
DECOMPOSITIONS = {torch.ops.hiertrain.conv2d_cm.default: _conv2d_cm_decomposed,
                  torch.ops.hiertrain.relu_mask.default: _relu_mask_decomposed,
                  torch.ops.hiertrain.maxpool2_cm.default: _maxpool2_cm_decomposed}


class MatmulConv2d(nn.Module):
    """``nn.Conv2d`` as im2col + ``mm``, same parameters under the same names.

    ``channel_major``: input and output are ``[C, N, H, W]`` (see ``to_channel_major``);
    otherwise ``[N, C, H, W]`` like ``nn.Conv2d``, at the price of two transposes.
    """

    def __init__(self, conv: nn.Conv2d, channel_major: bool = False):
        super().__init__()
        if not convertible(conv):
            raise ValueError(f"cannot rewrite {conv} as a matrix product")
        self.in_channels = conv.in_channels
        self.out_channels = conv.out_channels
        self.kernel_size = _pair(conv.kernel_size)
        self.stride = _pair(conv.stride)
        self.padding = _pair(conv.padding)
        self.dilation = _pair(conv.dilation)
        self.channel_major = channel_major
        self.weight = conv.weight
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xc = x if self.channel_major else x.permute(1, 0, 2, 3)
        c, n, h, w = xc.shape
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = (
            self.kernel_size, self.stride, self.padding, self.dilation)
        if (sh, sw, dh, dw) == (1, 1, 1, 1) and ph < kh and pw < kw:
            out = conv2d_cm(xc.contiguous(), self.weight, ph, pw)[0]
            if self.bias is not None:
                out = out + self.bias.view(-1, 1, 1, 1)
            return out if self.channel_major else out.permute(1, 0, 2, 3).contiguous()
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if ph or pw:
            xc = _zero_pad(xc, ph, pw)
        if kh == kw == 1:
            cols = xc[:, :, : sh * (ho - 1) + 1 : sh, : sw * (wo - 1) + 1 : sw]
        else:
            cols = torch.stack(
                [
                    xc[:, :, i * dh : i * dh + sh * (ho - 1) + 1 : sh,
                       j * dw : j * dw + sw * (wo - 1) + 1 : sw]
                    for i in range(kh) for j in range(kw)
                ],
                dim=1,
            )
        out = torch.mm(self.weight.reshape(self.out_channels, c * kh * kw),
                       cols.reshape(c * kh * kw, n * ho * wo))
        out = out.view(self.out_channels, n, ho, wo)
        if self.bias is not None:
            out = out + self.bias.view(-1, 1, 1, 1)
        return out if self.channel_major else out.permute(1, 0, 2, 3).contiguous()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, "
                f"channel_major={self.channel_major}")


class ChannelMajorGlobalAvgPool(nn.Module):
    """``GlobalAvgPool`` on ``[C, N, H, W]``: returns ``[N, C * grid * grid]`` like the
    original (the same feature order, so the linear layer's weights are unchanged)."""

    def __init__(self, grid: int = 1):
        super().__init__()
        self.grid = grid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grid == 1:
            return x.mean(dim=(2, 3)).t()
        cells = grid_mean(x, self.grid)  # [C, N, grid * grid]
        return cells.permute(1, 0, 2).flatten(1)


def convertible(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv2d) and conv.groups == 1
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))


def convs_to_matmul(module: nn.Module) -> int:
    """Rewrite ``module`` in place keeping the ``[N, C, H, W]`` layout (each convolution
    transposes its input and output): convertible ``nn.Conv2d``, ``nn.ReLU`` and 2x2
    max-pools. Returns how many convolutions."""
    count = 0
    for name, child in list(module.named_children()):
        if convertible(child):
            setattr(module, name, MatmulConv2d(child))
            count += 1
        elif isinstance(child, nn.ReLU):
            setattr(module, name, MaskReLU())
        elif _is_maxpool2x2(child):
            setattr(module, name, MaxPool2x2())
        else:
            count += convs_to_matmul(child)
    return count


# Modules whose function does not depend on which of the two leading dims is the
# batch: elementwise, or treating (N, C) alike (max-pool), or containers whose
# forward only composes children and adds (torchvision's BasicBlock).
_LAYOUT_FREE = (nn.ReLU, nn.MaxPool2d, nn.Identity, nn.Sequential)
_CONTAINERS = ("BasicBlock",)


def _channel_major_ok(module: nn.Module) -> bool:
    for mod in module.modules():
        if isinstance(mod, nn.Conv2d):
            if not convertible(mod):
                return False
        elif not (isinstance(mod, (*_LAYOUT_FREE, HostStatsBatchNorm2d))
                  or type(mod).__name__ in _CONTAINERS):
            return False
    return True


def channel_major_possible(edge: nn.Module, exit_head: nn.Sequential) -> bool:
    """The edge must be built only from channel-major-able modules; the exit head too, up
    to and including its ``GlobalAvgPool`` (what follows sees ``[N, C]``)."""
    if not _channel_major_ok(edge):
        return False
    head = list(exit_head.children())
    pools = [i for i, m in enumerate(head) if isinstance(m, GlobalAvgPool)]
    if not pools:
        return False
    return all(_channel_major_ok(m) for m in head[: pools[0]]) and not any(
        isinstance(m, GlobalAvgPool) for m in edge.modules())


def to_channel_major(module: nn.Module) -> None:
    """Rewrite in place for ``[C, N, H, W]`` tensors (``channel_major_possible`` first)."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Conv2d):
            setattr(module, name, MatmulConv2d(child, channel_major=True))
        elif isinstance(child, HostStatsBatchNorm2d):
            child.channel_major = True
        elif isinstance(child, GlobalAvgPool):
            setattr(module, name, ChannelMajorGlobalAvgPool(child.grid))
        elif isinstance(child, nn.ReLU):
            setattr(module, name, MaskReLU())
        elif _is_maxpool2x2(child):
            setattr(module, name, MaxPool2x2())
        else:
            to_channel_major(child)
