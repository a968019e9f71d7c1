"""Module rewrites that make an edge segment train *exactly* under ExecuTorch.

ExecuTorch 1.5.1 (portable kernels) mis-trains or cannot lower a few common
modules. Each rewrite below replaces one with a form whose forward is the same
function and whose backward ExecuTorch computes exactly; the exporter records
every rewrite in the manifest and the parity tests hold each one to eager
PyTorch. Anything we cannot rewrite is refused with the module's name.

==========================  ==================================================
module                      what the exporter does, and why
==========================  ==================================================
``BatchNorm2d`` (train)     -> ``HostStatsBatchNorm2d``. Root cause of the
                            "wrong BN gradients": with running statistics the
                            joint graph gains BUFFER_MUTATION outputs *before*
                            the loss, and ExecuTorch's training module slices
                            its outputs by position, so every gradient is
                            shifted onto the wrong parameter (and
                            ``_native_batch_norm_legit_functional`` has no out
                            variant). Batch-statistics BN *without* buffers
                            lowers and is exact (the bias of a conv followed by
                            BN has a mathematically zero gradient, which a
                            naive relative-error check mistakes for an error).
                            So the program normalises with batch statistics
                            and returns each layer's batch mean and unbiased
                            variance as extra outputs; the runtime updates the
                            running statistics on the host with PyTorch's own
                            formula. Same math as ``nn.BatchNorm2d``.
``MaxPool2d``               kept; its backward op in the joint graph is
                            replaced by torch's own decomposition (the portable
                            ``max_pool2d_with_indices_backward`` kernel gives
                            wrong gradients). Done in ``export.py``.
``AdaptiveAvgPool2d(1)``    -> ``MeanPool2d`` (``mean`` over H, W, keeping
                            them, so squeeze-excitation still sees
                            ``N x C x 1 x 1``):
                            ``_adaptive_avg_pool2d_backward`` is missing.
``StochasticDepth`` (p > 0) -> ``Identity``, what it computes in eval mode:
                            random row drops would make the program random
                            and unverifiable (EfficientNet's blocks).
``AvgPool2d(k, stride=k)``  -> ``BlockAvgPool`` (reshape + mean):
                            ``avg_pool2d_backward`` is missing.
other pools, Dropout,       refused: no exact backward, or (Dropout) a random
BatchNorm1d/3d, ...         program that no parity test can hold.
==========================  ==================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core.errors import ExportError


def _row_mean(flat: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-channel mean of ``[C, M]`` as a mean of ``rows`` row means (``M = rows x W``).

    ExecuTorch's portable ``mean`` sums sequentially: over one image row (W terms) and
    then over the rows (N x H terms), its float32 error stays that of a short sum, where
    one pass over all N x H x W terms (100k at 224 px) made the batch statistics ~10x
    less accurate than eager PyTorch's, and the ReLU masks they feed flipped where eager's
    did not (mobilenet_v3_small at 224 px: gradients 1.5e-3 from float64, eager's 1e-6).
    The same value in exact arithmetic, so eager and float64 compute it too."""
    c, m = flat.shape
    return flat.view(c, rows, m // rows).mean(dim=2).mean(dim=1, keepdim=True)


class HostStatsBatchNorm2d(nn.Module):
    """BatchNorm2d whose running statistics are updated outside the program.

    In training mode the forward normalises with batch statistics and stores
    ``(mean, unbiased_var)`` of the batch in ``last_stats`` for the training
    program to return; ``update_running_stats`` applies them the way
    ``nn.BatchNorm2d`` does. In eval mode it uses the running statistics.
    """

    def __init__(self, bn: nn.BatchNorm2d):
        super().__init__()
        if not (bn.affine and bn.track_running_stats):
            raise ExportError("only affine BatchNorm2d with running statistics is supported")
        self.num_features = bn.num_features
        self.eps = bn.eps
        self.momentum = 0.1 if bn.momentum is None else bn.momentum
        self.weight = bn.weight
        self.bias = bn.bias
        self.register_buffer("running_mean", bn.running_mean.detach().clone())
        self.register_buffer("running_var", bn.running_var.detach().clone())
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked.detach().clone())
        self.last_stats: tuple[torch.Tensor, torch.Tensor] | None = None
        # Set by toolkit.build.fastconv.to_channel_major on the lowered copy only: the
        # input is then [C, N, H, W] and the two transposes below disappear.
        self.channel_major = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            if self.channel_major:
                raise RuntimeError("channel-major BatchNorm exists for training programs only")
            return F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias,
                False, 0.0, self.eps,
            )
        # Channel-major layout: every reduction (forward statistics and the
        # weight/bias gradients autograd derives) runs over one contiguous
        # dimension, so ExecuTorch and eager PyTorch sum in the same order.
        # Batch-statistics BN gradients are ill-conditioned in float32; with
        # reductions over (N, H, W) the two runtimes order the sums differently
        # and early-layer gradients drift apart by up to ~1e-2 (docs/export.md).
        if self.channel_major:
            c, n, h, w = x.shape
            flat = x.reshape(c, n * h * w)
        else:
            n, c, h, w = x.shape
            flat = x.permute(1, 0, 2, 3).contiguous().view(c, n * h * w)
        m = n * h * w
        mean = _row_mean(flat, n * h)
        centred = flat - mean
        var = _row_mean(centred * centred, n * h)
        self.last_stats = (
            mean.detach().flatten(),
            var.detach().flatten() * (m / max(m - 1, 1)),
        )
        scale = torch.rsqrt(var + self.eps) * self.weight.view(c, 1)
        out = (centred * scale + self.bias.view(c, 1)).view(c, n, h, w)
        return out if self.channel_major else out.permute(1, 0, 2, 3).contiguous()

    @torch.no_grad()
    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        m = self.momentum
        self.running_mean.mul_(1 - m).add_(mean, alpha=m)
        self.running_var.mul_(1 - m).add_(var, alpha=m)
        self.num_batches_tracked.add_(1)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, host_stats=True"


class MeanPool2d(nn.Module):
    """``AdaptiveAvgPool2d(1)`` as a plain mean over H and W (exact ExecuTorch backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class BlockAvgPool(nn.Module):
    """``AvgPool2d(k, stride=k)`` as reshape + mean (exact ExecuTorch backward)."""

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        k = self.k
        x = x[:, :, : h - h % k, : w - w % k]
        return x.reshape(n, c, h // k, k, w // k, k).mean(dim=(3, 5))


@dataclass(frozen=True)
class Rewrite:
    module: str
    original: str
    replacement: str
    reason: str

    def to_dict(self) -> dict:
        return {"module": self.module, "from": self.original, "to": self.replacement,
                "reason": self.reason}


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _replacement(name: str, mod: nn.Module) -> tuple[nn.Module | None, Rewrite | None]:
    kind = type(mod).__name__
    if isinstance(mod, nn.BatchNorm2d):
        return HostStatsBatchNorm2d(mod), Rewrite(
            name, kind, "HostStatsBatchNorm2d",
            "running-stat buffer mutations shift ExecuTorch's gradient outputs; "
            "batch stats are returned and applied on the host",
        )
    if isinstance(mod, nn.AdaptiveAvgPool2d):
        if _pair(mod.output_size) == (1, 1):
            return MeanPool2d(), Rewrite(
                name, kind, "MeanPool2d", "_adaptive_avg_pool2d_backward is missing"
            )
        raise ExportError(
            f"{name}: AdaptiveAvgPool2d({mod.output_size}) has no exact ExecuTorch backward; "
            "use output size 1 or move the split point before it"
        )
    if isinstance(mod, nn.AvgPool2d):
        k, s, p = _pair(mod.kernel_size), _pair(mod.stride or mod.kernel_size), _pair(mod.padding)
        if k[0] == k[1] == s[0] == s[1] and p == (0, 0) and not mod.ceil_mode:
            return BlockAvgPool(k[0]), Rewrite(
                name, kind, "BlockAvgPool", "avg_pool2d_backward is missing"
            )
        raise ExportError(
            f"{name}: AvgPool2d(kernel={mod.kernel_size}, stride={mod.stride}, "
            f"padding={mod.padding}) has no exact ExecuTorch backward; use kernel == stride "
            "without padding, or move the split point before it"
        )
    if isinstance(mod, nn.MaxPool2d):
        if mod.return_indices:
            raise ExportError(f"{name}: MaxPool2d(return_indices=True) is not supported")
        return None, Rewrite(
            name, kind, "MaxPool2d (backward decomposed)",
            "portable max_pool2d_with_indices_backward gives wrong gradients",
        )
    if kind == "StochasticDepth" and getattr(mod, "p", 0) > 0:  # torchvision.ops
        return nn.Identity(), Rewrite(
            name, kind, "Identity",
            "random row drops make the program unverifiable; the edge trains the block as "
            "eval mode runs it",
        )
    if isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm3d, nn.SyncBatchNorm)):
        raise ExportError(f"{name}: {kind} is not supported in the edge segment; use BatchNorm2d")
    if isinstance(mod, (nn.Dropout, nn.Dropout2d, nn.AlphaDropout)) and mod.p > 0:
        raise ExportError(
            f"{name}: {kind}(p={mod.p}) in the edge segment makes the training program "
            "random and unverifiable; set p=0 or move the split point before it"
        )
    if isinstance(mod, (nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.FractionalMaxPool2d)):
        raise ExportError(
            f"{name}: {kind} has no exact ExecuTorch backward; move the split point before it"
        )
    return None, None


EDGE_NORMS = ("batch", "group")


def group_norm_groups(channels: int) -> int:
    """Largest group count <= 32 that divides ``channels`` (32 is the GroupNorm paper's default)."""
    return next(g for g in range(min(32, channels), 0, -1) if channels % g == 0)


def to_group_norm(module: nn.Module, prefix: str = "") -> list[Rewrite]:
    """Replace every BatchNorm2d by a GroupNorm (the ``--edge-norm group`` choice)."""
    done: list[Rewrite] = []
    for name, child in list(module.named_children()):
        full = f"{prefix}{name}"
        if isinstance(child, nn.BatchNorm2d):
            groups = group_norm_groups(child.num_features)
            setattr(module, name, nn.GroupNorm(groups, child.num_features, eps=child.eps))
            done.append(Rewrite(full, "BatchNorm2d", f"GroupNorm({groups})",
                                "--edge-norm group: per-sample statistics, no batch coupling"))
        else:
            done.extend(to_group_norm(child, prefix=f"{full}."))
    return done


def make_exact(module: nn.Module, prefix: str = "") -> list[Rewrite]:
    """Rewrite ``module`` in place so that ExecuTorch trains it exactly; return what changed."""
    done: list[Rewrite] = []
    for name, child in list(module.named_children()):
        full = f"{prefix}{name}"
        new, rewrite = _replacement(full, child)
        if rewrite is not None:
            done.append(rewrite)
        if new is not None:
            setattr(module, name, new)
        elif rewrite is None:
            done.extend(make_exact(child, prefix=f"{full}."))
    return done


def host_stat_layers(module: nn.Module) -> list[tuple[str, HostStatsBatchNorm2d]]:
    """The BatchNorm layers whose statistics a training step returns, in output order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, HostStatsBatchNorm2d)]
