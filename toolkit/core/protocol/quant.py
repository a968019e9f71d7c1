"""Activation codecs for the cut-layer activation: the one source of truth for quantization.

The edge device sends the activation of the cut layer to the cloud every
training step, so its size is the bandwidth bill. This module turns a float
activation into integer codes plus a few parameters (:func:`quantize`) and
back (:func:`dequantize`); ``toolkit.core.protocol.wire`` only serialises what this module
produces, and the edge runtime and the cloud trainer must both go through it so
that they can never disagree about the arithmetic.

Why the default scheme (``DEFAULT_SCHEME``: int8, per channel, affine) is what it is:

* **Dynamic, per-batch scales.** The range is measured on every batch. A fixed
  scale chosen up front either clips (activations grow as training proceeds)
  or wastes most of the code range (activations shrink); a dynamic scale costs
  a few bytes per batch and follows the drift.
* **Per channel.** Channels of a cut-layer activation routinely differ by
  orders of magnitude; one scale for the whole tensor would quantize the quiet
  channels to a handful of levels, or to zero.
* **Affine (asymmetric).** The cut layer usually follows a ReLU, so the values
  are >= 0. An affine code maps [min, max] = [0, max] onto all 256 levels;
  a symmetric int8 code spends the negative half on values that never occur,
  leaving 7 effective bits.

Arithmetic (``qmin = -2**(bits-1)``, ``qmax = 2**(bits-1) - 1``)::

    affine:     lo = min(min(x), 0)     hi = max(max(x), 0)
                scale = (hi - lo) / (qmax - qmin)
                zero_point = clamp(qmin - round(lo / scale), qmin, qmax)
    symmetric:  scale = max(|min(x)|, |max(x)|) / qmax       zero_point = 0
    encode:     code = clamp(round(x / scale) + zero_point, qmin, qmax)
    decode:     x' = (code - zero_point) * scale              |x - x'| <= scale / 2

``round`` is round-half-to-even (``torch.round``). The range is widened to
include 0 rather than assuming ``min <= 0 <= max``: that makes 0.0 exactly
representable (the code equal to ``zero_point``), so the many exact zeros of a
post-ReLU activation decode to exactly 0.0, and it keeps ``zero_point`` inside
``[qmin, qmax]`` without the clamp ever moving the grid away from the data. The
price is resolution on a channel whose values all sit far from zero, which a
cut layer rarely has.

A constant channel (``max == min``, e.g. a dead all-zero ReLU channel) would
give a zero scale; it gets ``scale = |c|`` (1.0 when ``c == 0``) and
``zero_point = 0`` instead, so it encodes as the code -1, 0 or 1 and
round-trips exactly.

Bits 2, 4 and 8 are valid scheme values; in memory the codes are always one
per ``int8`` (clamped to the narrower range for fewer bits). On the wire,
``toolkit.core.protocol.wire`` (version 2) packs 2- and 4-bit codes 4 and 2 to a byte;
``toolkit.core.protocol.codec`` names the combinations a sender may choose.

NaN or Inf in an activation raises :class:`~toolkit.core.errors.WireError`: it means
training diverged, and encoding it would hide that behind garbage codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from toolkit.core.errors import WireError

GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_channel")
"""Valid ``QuantScheme.granularity`` values; the index is the wire code."""

SUPPORTED_BITS: tuple[int, ...] = (2, 4, 8)
MAX_CHANNEL_AXIS = 7
"""The wire format allows at most 8 dimensions, so axes 0..7."""

_SCHEME_KEYS = ("bits", "granularity", "symmetric", "channel_axis")


@dataclass(frozen=True)
class QuantScheme:
    """How an activation is quantized; a value type, hashable and comparable.

    Validated on construction so that an invalid scheme cannot exist, whether
    it came from code, a config file or a wire message.
    """

    bits: int = 8
    granularity: str = "per_channel"
    symmetric: bool = False
    channel_axis: int = 1

    def __post_init__(self) -> None:
        """Reject values the codec or the wire format cannot represent."""
        if isinstance(self.bits, bool) or self.bits not in SUPPORTED_BITS:
            raise WireError(
                f"quantization bits must be one of {list(SUPPORTED_BITS)}, got {self.bits!r}.",
                reason="scheme",
            )
        if self.granularity not in GRANULARITIES:
            raise WireError(
                f"quantization granularity must be one of {list(GRANULARITIES)}, "
                f"got {self.granularity!r}.",
                reason="scheme",
            )
        if not isinstance(self.symmetric, bool):
            raise WireError(
                f"quantization 'symmetric' must be true or false, got {self.symmetric!r}.",
                reason="scheme",
            )
        if (
            isinstance(self.channel_axis, bool)
            or not isinstance(self.channel_axis, int)
            or not 0 <= self.channel_axis <= MAX_CHANNEL_AXIS
        ):
            raise WireError(
                f"quantization channel_axis must be an integer in 0..{MAX_CHANNEL_AXIS} "
                f"(negative axes are not allowed), got {self.channel_axis!r}.",
                reason="scheme",
            )

    @property
    def qmin(self) -> int:
        """Smallest code, -2**(bits-1)."""
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        """Largest code, 2**(bits-1) - 1."""
        return (1 << (self.bits - 1)) - 1

    @property
    def scheme_id(self) -> str:
        """Short label for logs and reports, e.g. ``"int8-per_channel-affine"``."""
        kind = "symmetric" if self.symmetric else "affine"
        return f"int{self.bits}-{self.granularity}-{kind}"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for JSON/YAML manifests; inverse of :meth:`from_dict`."""
        return {
            "bits": self.bits,
            "granularity": self.granularity,
            "symmetric": self.symmetric,
            "channel_axis": self.channel_axis,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantScheme:
        """Build a scheme from a dict; missing keys take the defaults, unknown keys fail.

        Unknown keys are errors because a typo ("granularty") would otherwise
        silently fall back to the default.
        """
        if not isinstance(d, Mapping):
            raise WireError(
                f"a quantization scheme must be a mapping, got {type(d).__name__}.",
                reason="scheme",
            )
        unknown = sorted(str(k) for k in d if k not in _SCHEME_KEYS)
        if unknown:
            raise WireError(
                f"unknown quantization scheme key(s) {unknown}; valid keys are "
                f"{list(_SCHEME_KEYS)}.",
                reason="scheme",
            )
        return cls(**dict(d))


DEFAULT_SCHEME = QuantScheme()


@dataclass(eq=False)
class QuantizedTensor:
    """Integer codes plus the parameters needed to decode them.

    ``codes`` is int8 with the shape of the original tensor; ``scale`` (float32)
    and ``zero_point`` (int32) have shape ``[C]`` for per-channel schemes (C =
    size of ``scheme.channel_axis``) and ``[1]`` for per-tensor ones.
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    scheme: QuantScheme


def _param_view(param: torch.Tensor, scheme: QuantScheme, ndim: int) -> torch.Tensor:
    """Reshape a ``[C]``/``[1]`` parameter so it broadcasts against the codes."""
    if scheme.granularity == "per_tensor":
        return param.reshape([1] * ndim) if ndim else param.reshape(())
    shape = [1] * ndim
    shape[scheme.channel_axis] = param.numel()
    return param.reshape(shape)


def quantize(x: torch.Tensor, scheme: QuantScheme = DEFAULT_SCHEME) -> QuantizedTensor:
    """Quantize a float activation with per-batch scales (see the module docstring)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise WireError(
            "only floating-point tensors can be quantized, got "
            f"{getattr(x, 'dtype', type(x).__name__)}.",
            reason="dtype",
        )
    if x.numel() == 0:
        raise WireError("cannot quantize an empty tensor.", reason="shape")
    xf = x.detach().to(torch.float32)
    if not bool(torch.isfinite(xf).all()):
        raise WireError(
            "activation contains NaN or Inf; refusing to encode a diverged training step "
            "(check the learning rate and loss scaling).",
            reason="nonfinite",
        )

    if scheme.granularity == "per_channel":
        if scheme.channel_axis >= xf.ndim:
            raise WireError(
                f"channel_axis {scheme.channel_axis} is out of range for a tensor of "
                f"shape {list(xf.shape)}.",
                reason="scheme",
            )
        flat = xf.movedim(scheme.channel_axis, 0).reshape(xf.shape[scheme.channel_axis], -1)
        lo, hi = flat.amin(dim=1), flat.amax(dim=1)
    else:
        lo, hi = xf.amin().reshape(1), xf.amax().reshape(1)

    # Parameters in float64: (hi - lo) of two large float32 values can overflow float32.
    lo64, hi64 = lo.double(), hi.double()
    qmin, qmax = scheme.qmin, scheme.qmax
    if scheme.symmetric:
        scale64 = torch.maximum(lo64.abs(), hi64.abs()) / qmax
    else:
        scale64 = (hi64.clamp(min=0) - lo64.clamp(max=0)) / (qmax - qmin)
    # A scale that underflows float32 would divide by zero; the smallest normal
    # float is coarser than such a range, so every value still lands within scale/2.
    tiny = torch.finfo(torch.float32).tiny
    scale = scale64.to(torch.float32).clamp(min=tiny)

    constant = lo64 == hi64
    const_scale = torch.where(lo64 == 0, torch.ones_like(lo64), lo64.abs()).to(torch.float32)
    scale = torch.where(constant, const_scale, scale)

    if scheme.symmetric:
        zp64 = torch.zeros_like(lo64)
    else:
        zp64 = (qmin - torch.round(lo64.clamp(max=0) / scale.double())).clamp(qmin, qmax)
        zp64 = torch.where(constant, torch.zeros_like(zp64), zp64)
    zero_point = zp64.to(torch.int32)

    s = _param_view(scale, scheme, xf.ndim)
    z = _param_view(zero_point, scheme, xf.ndim).to(torch.float32)
    codes = (torch.round(xf / s) + z).clamp(qmin, qmax).to(torch.int8)
    return QuantizedTensor(codes=codes, scale=scale, zero_point=zero_point, scheme=scheme)


def dequantize(q: QuantizedTensor) -> torch.Tensor:
    """Decode codes back to a float32 tensor: ``(code - zero_point) * scale``."""
    ndim = q.codes.ndim
    s = _param_view(q.scale.to(torch.float32), q.scheme, ndim)
    z = _param_view(q.zero_point, q.scheme, ndim).to(torch.float32)
    return (q.codes.to(torch.float32) - z) * s


def max_abs_error(scheme: QuantScheme, q: QuantizedTensor) -> torch.Tensor:
    """Per-element round-trip error bound, ``scale / 2``, broadcastable to ``q.codes``.

    Holds up to float32 rounding (a few ulps of ``scale``), which callers comparing
    against it should allow for.
    """
    if scheme != q.scheme:
        raise WireError(
            f"scheme {scheme.scheme_id} does not match the tensor's {q.scheme.scheme_id}.",
            reason="scheme",
        )
    return _param_view(q.scale.to(torch.float32), scheme, q.codes.ndim) / 2
