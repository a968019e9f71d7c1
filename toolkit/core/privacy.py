"""Privacy defences on the cut activation: what the board does before a cut leaves it.

An early cut is close to the image: whoever sees the published activations (the
broker, the cloud, anyone on the link) can train a decoder that rebuilds the
frames (``toolkit.privacy``, ``benchmarks/privacy.py`` measure how well). A run
chooses one defence at export (``toolkit export --privacy``); the manifest records
it and the board applies it, nothing else does:

``none``
    today's behaviour, bit for bit.
``gaussian:S[,clip=C]`` / ``laplace:S[,clip=C]``
    each sample's cut is clipped (Gaussian: root-mean-square over its elements to
    at most ``C``; Laplace: mean absolute value to at most ``C``) and noise of
    scale ``S * C`` per element is added, on the board, before quantization.
    Clipping bounds the sensitivity, so the noise gives a per-release
    differential-privacy guarantee (:func:`epsilon`). The exit head trains on
    the clean cut: it never leaves the board.
``adversarial:W[,width=K]``
    the edge's training program also trains a small proxy decoder (width ``K``)
    that tries to rebuild the input from the cut, and the edge gets that
    decoder's reconstruction gradient reversed and scaled by ``W``, in the spirit
    of PriPHiT (arXiv 2408.05092): the cut keeps what the exit needs and loses
    what rebuilds the image. Part of the ExecuTorch program, so the parity gate
    holds it to eager PyTorch (``toolkit.core.models.inversion``).

What epsilon means here, and what it does not cover, is in docs/privacy.md.
This module is pure arithmetic on tensors (no matrix kernels): it runs on a board.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import asdict, dataclass

import torch

from toolkit.core.errors import HiertrainError

KINDS = ("none", "gaussian", "laplace", "adversarial")
NOISE_KINDS = ("gaussian", "laplace")
# The proxy decoder's parameters: trained on the board, never published.
PROXY_PREFIX = "proxy."
DEFAULT_DELTA = 1e-5


@dataclass(frozen=True)
class Privacy:
    """One defence and its strength, as ``toolkit export --privacy`` parsed it."""

    kind: str = "none"
    scale: float = 0.0  # noise: per-element scale in units of clip; adversarial: the weight
    clip: float = 1.0  # noise: the per-sample bound (RMS for gaussian, mean |x| for laplace)
    width: int = 32  # adversarial: channels of the proxy decoder

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise HiertrainError(f"unknown privacy defence {self.kind!r}; choose one of: "
                                 f"{', '.join(KINDS)}")
        if self.kind != "none" and not (self.scale > 0 and math.isfinite(self.scale)):
            raise HiertrainError(f"--privacy {self.kind} needs a positive strength, got "
                                 f"{self.scale}")
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise HiertrainError(f"--privacy clip must be > 0, got {self.clip}")
        if self.width < 1:
            raise HiertrainError(f"--privacy width must be >= 1, got {self.width}")

    @property
    def noise(self) -> bool:
        return self.kind in NOISE_KINDS

    @property
    def adversarial(self) -> bool:
        return self.kind == "adversarial"

    def spec(self) -> str:
        """The ``--privacy`` string that gives this defence back."""
        if self.kind == "none":
            return "none"
        if self.noise:
            return f"{self.kind}:{self.scale:g},clip={self.clip:g}"
        return f"adversarial:{self.scale:g},width={self.width}"

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.noise:
            d.pop("clip")
        if not self.adversarial:
            d.pop("width")
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> Privacy:
        """A manifest's ``privacy`` (manifests written before it existed mean ``none``)."""
        if not d:
            return cls()
        return cls(**{k: d[k] for k in ("kind", "scale", "clip", "width") if k in d})


NONE = Privacy()


def parse_privacy(text: str) -> Privacy:
    """``none``, ``gaussian:0.5``, ``laplace:0.3,clip=2``, ``adversarial:0.5,width=16``."""
    text = text.strip()
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind == "none" and not rest:
        return NONE
    if kind not in KINDS[1:] or not rest:
        raise HiertrainError(
            f"--privacy {text!r}: expected none, gaussian:SCALE, laplace:SCALE or "
            "adversarial:WEIGHT (options: ,clip=C for noise, ,width=K for adversarial)"
        )
    first, *opts = rest.split(",")
    allowed = {"clip"} if kind in NOISE_KINDS else {"width"}
    kw: dict = {}
    try:
        kw["scale"] = float(first)
        for opt in opts:
            key, eq, value = opt.partition("=")
            key = key.strip()
            if not eq or key not in allowed:
                raise HiertrainError(f"--privacy {text!r}: unknown option {opt!r} for {kind} "
                                     f"(it takes: {', '.join(sorted(allowed))})")
            kw[key] = int(value) if key == "width" else float(value)
    except ValueError:
        raise HiertrainError(f"--privacy {text!r}: the strength and options must be "
                             "numbers") from None
    return Privacy(kind=kind, **kw)


def public_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The edge state without the proxy decoder: what may leave the board.

    The proxy is an inversion model of the board's own cut; publishing it would
    hand an attacker a head start.
    """
    return {k: v for k, v in state.items() if not k.startswith(PROXY_PREFIX)}


class CutNoise:
    """Clip each sample's cut and add noise; the board's half of a noise defence.

    The generator is seeded from the operating system, never from the run's
    seed: noise an attacker can regenerate is no noise.
    """

    def __init__(self, privacy: Privacy, seed: int | None = None) -> None:
        if not privacy.noise:
            raise ValueError(f"{privacy.kind} is not a noise defence")
        self.privacy = privacy
        self.gen = torch.Generator().manual_seed(
            secrets.randbits(63) if seed is None else seed)

    def __call__(self, cut: torch.Tensor) -> torch.Tensor:
        p = self.privacy
        flat = cut.detach().float().reshape(cut.shape[0], -1)
        if p.kind == "gaussian":
            size = flat.square().mean(dim=1).sqrt()  # per-sample RMS
        else:
            size = flat.abs().mean(dim=1)
        factor = (p.clip / size.clamp_min(1e-12)).clamp(max=1.0)
        clipped = flat * factor[:, None]
        b = p.scale * p.clip
        if p.kind == "gaussian":
            noise = torch.randn(clipped.shape, generator=self.gen) * b
        else:
            noise = _laplace(clipped.shape, self.gen) * b
        return (clipped + noise).reshape(cut.shape)


def _laplace(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """Unit Laplace by inverse CDF; u stays off -1 so the log never meets 0.

    ``torch.rand`` returns exactly 0 about once in 2**24 draws, a few times per
    epoch on a 16x16x16 cut, and the naive ``log1p(-2|u - 1/2|)`` turns that
    draw into -inf and the whole batch into a refused NaN.
    """
    eps = torch.finfo(torch.float32).eps
    u = torch.rand(shape, generator=gen) * (2 - eps) + (eps - 1)  # [eps-1, 1)
    return -u.sign() * torch.log1p(-u.abs())


def cut_transform(privacy: Privacy):
    """What the board applies to a cut before coding it: identity unless noise is chosen."""
    return CutNoise(privacy) if privacy.noise else (lambda cut: cut)


# ------------------------------------------------------------------ accounting
def _log_ndtr(t: float) -> float:
    """log of the standard normal CDF, stable far into the lower tail."""
    if t > -30:
        return math.log(max(0.5 * math.erfc(-t / math.sqrt(2)), 1e-300))
    return -t * t / 2 - math.log(-t) - 0.5 * math.log(2 * math.pi)


def _gaussian_delta(eps: float, mu: float) -> float:
    """delta(eps) of a mu-GDP mechanism (Dong, Roth, Su 2019; Balle, Wang 2018)."""
    a = _log_ndtr(-eps / mu + mu / 2)
    b = eps + _log_ndtr(-eps / mu - mu / 2)
    return math.exp(a) - math.exp(b) if b < a else 0.0


def epsilon(privacy: Privacy, cut_elements: int, releases: int = 1,
            delta: float = DEFAULT_DELTA) -> float | None:
    """The (epsilon, delta) guarantee of ``releases`` noisy publications of one image's cut.

    Neighbouring inputs are any two images (replace one), so the sensitivity is
    twice the clip bound: Gaussian ``2 * C * sqrt(n)`` in L2, Laplace ``2 * C * n``
    in L1, for a cut of ``n`` elements. Repeated releases compose exactly for
    Gaussian noise (a mu-GDP mechanism k times is sqrt(k)*mu-GDP) and additively
    for Laplace noise. ``None`` for defences that give no such guarantee.
    """
    if not privacy.noise:
        return None
    if releases < 1 or cut_elements < 1:
        raise ValueError("releases and cut_elements must be >= 1")
    noise_scale = privacy.scale * privacy.clip
    if privacy.kind == "laplace":
        return releases * 2 * privacy.clip * cut_elements / noise_scale
    mu = 2 * privacy.clip * math.sqrt(cut_elements) / noise_scale * math.sqrt(releases)
    lo, hi = 0.0, mu * mu / 2 + 40 * mu + 40
    for _ in range(200):
        mid = (lo + hi) / 2
        if _gaussian_delta(mid, mu) > delta:
            lo = mid
        else:
            hi = mid
    return hi
