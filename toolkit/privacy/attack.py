"""A reconstruction attacker: how well can someone who sees the published cuts rebuild the images?

The attacker we model is the strongest realistic one (docs/privacy.md):

* it knows the architecture and the split (the manifest is no secret);
* it knows the edge weights: boards publish them every epoch for the cloud to
  score the full model, so anyone who can read the run's topics has them;
* it knows the defence and the codec (both are in the manifest) and has public
  images from the same domain, but not the board's images.

It runs the edge on its public images exactly as the board would (training
mode: batch statistics, as the training program publishes), applies the defence
and the codec round trip, and trains a decoder (``toolkit.core.models.inversion.Decoder``,
wider than the board's proxy) to map what it sees back to the image. The score
is PSNR and SSIM (torchmetrics) of its reconstructions of held-out images,
against the floor of an attacker that knows nothing of the image: the mean
public image.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core.models.inversion import Decoder
from toolkit.core.optional import require
from toolkit.core.privacy import NONE, Privacy, cut_transform
from toolkit.core.protocol.codec import BatchMeta, Codec
from toolkit.core.protocol.quant import QuantScheme


@dataclass(frozen=True)
class AttackConfig:
    """The attacker's budget: decoder size and training schedule."""

    width: int = 64
    depth: int = 2
    epochs: int = 8
    batch: int = 64
    lr: float = 2e-3
    seed: int = 0


@dataclass
class AttackResult:
    psnr: float  # dB, mean over held-out images of per-image PSNR
    ssim: float
    baseline_psnr: float  # the mean public image as every reconstruction
    baseline_ssim: float
    train_loss: float
    public: int
    heldout: int
    seconds: float

    def to_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


@torch.no_grad()
def observed_cuts(edge: nn.Module, x: torch.Tensor, *, codec: Codec, scheme: QuantScheme,
                  privacy: Privacy = NONE, batch: int = 64,
                  noise_seed: int | None = None) -> torch.Tensor:
    """What an eavesdropper decodes for normalised images ``x``: the edge in training mode,
    the board's defence, then the codec's encode and decode (the real wire bytes)."""
    edge.train()  # as published during training: batch statistics
    protect = cut_transform(privacy)
    if privacy.noise and noise_seed is not None:
        from toolkit.core.privacy import CutNoise

        protect = CutNoise(privacy, seed=noise_seed)
    out = []
    for i in range(0, len(x), batch):
        cut = protect(edge(x[i:i + batch]))
        msg = codec.encode(cut, None, BatchMeta("attack", "attacker", i), base=scheme)
        out.append(codec.decode(msg).tensor)
    return torch.cat(out)


def _metrics():
    require("torchmetrics", "privacy", "scoring reconstructions (PSNR, SSIM)")
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    return peak_signal_noise_ratio, structural_similarity_index_measure


def image_scores(rebuilt: torch.Tensor, images: torch.Tensor) -> tuple[float, float]:
    """Mean per-image PSNR (dB) and SSIM of ``[0, 1]`` images."""
    psnr, ssim = _metrics()
    rebuilt = rebuilt.clamp(0, 1)
    p = psnr(rebuilt, images, data_range=1.0, reduction="none", dim=(1, 2, 3))
    s = ssim(rebuilt, images, data_range=1.0)
    return float(p.mean()), float(s)


def train_attacker(cuts: torch.Tensor, targets: torch.Tensor, image_shape: Sequence[int],
                   cfg: AttackConfig = AttackConfig(),
                   progress: Callable[[str], None] = lambda _m: None) -> tuple[Decoder, float]:
    """Fit a decoder from observed cuts to normalised images (MSE, Adam, cosine schedule)."""
    torch.manual_seed(cfg.seed)
    dec = Decoder(tuple(cuts.shape[1:]), tuple(image_shape), width=cfg.width, depth=cfg.depth)
    steps_per_epoch = max(1, len(cuts) // cfg.batch)
    opt = torch.optim.Adam(dec.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.epochs * steps_per_epoch)
    gen = torch.Generator().manual_seed(cfg.seed)
    last = math.nan
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(cuts), generator=gen)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = order[i * cfg.batch:(i + 1) * cfg.batch]
            loss = F.mse_loss(dec(cuts[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        last = total / steps_per_epoch
        progress(f"attacker epoch {epoch + 1}/{cfg.epochs}: mse {last:.4f}")
    return dec.eval(), last


def _denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return x * s + m


@torch.no_grad()
def reconstruct(dec: Decoder, cuts: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                batch: int = 256) -> torch.Tensor:
    """The attacker's ``[0, 1]`` images for observed cuts."""
    out = torch.cat([dec(cuts[i:i + batch]) for i in range(0, len(cuts), batch)])
    return _denormalize(out, mean, std).clamp(0, 1)


def run_attack(public_cuts: torch.Tensor, public_x: torch.Tensor, heldout_cuts: torch.Tensor,
               heldout_x: torch.Tensor, *, mean: Sequence[float], std: Sequence[float],
               cfg: AttackConfig = AttackConfig(),
               progress: Callable[[str], None] = lambda _m: None
               ) -> tuple[AttackResult, torch.Tensor]:
    """Train on the public pairs, score on the held-out ones; ``x`` are normalised images.

    Returns the scores and the held-out reconstructions (``[0, 1]``), for a picture grid.
    """
    t = time.monotonic()
    dec, loss = train_attacker(public_cuts, public_x, public_x.shape[1:], cfg, progress)
    rebuilt = reconstruct(dec, heldout_cuts, mean, std)
    truth = _denormalize(heldout_x, mean, std).clamp(0, 1)
    psnr, ssim = image_scores(rebuilt, truth)
    floor = _denormalize(public_x.mean(dim=0, keepdim=True), mean, std).clamp(0, 1)
    base_psnr, base_ssim = image_scores(floor.expand_as(truth).contiguous(), truth)
    return AttackResult(psnr=psnr, ssim=ssim, baseline_psnr=base_psnr, baseline_ssim=base_ssim,
                        train_loss=loss, public=len(public_x), heldout=len(heldout_x),
                        seconds=time.monotonic() - t), rebuilt


def save_grid(rows: Sequence[tuple[str, torch.Tensor]], path, *, per_row: int = 8) -> None:
    """One labelled row of ``[0, 1]`` images per entry (originals first), as a PNG."""
    require("matplotlib", "all", "drawing the reconstruction grid")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(len(rows), 1, figsize=(per_row * 0.9 + 1.8, len(rows) * 1.0 + 0.2))
    axes = [axes] if len(rows) == 1 else list(axes)
    for ax, (label, imgs) in zip(axes, rows, strict=True):
        grid = make_grid(imgs[:per_row], nrow=per_row, padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(),
                  cmap="gray" if grid.shape[0] == 1 else None)
        ax.set_yticks([])
        ax.set_xticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
