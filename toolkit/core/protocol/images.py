"""Raw images on the wire, losslessly: what an edge uploads in the ``cloud`` baseline mode.

The cloud must train on exactly the model input the edge would have used, so
the upload may not be lossy. What travels is the loader's image in ``[0, 1]``
(``toolkit.core.data.datasets``, before normalisation); the cloud trainer normalises it with
the manifest's mean and std, the same function on the same float32 values the
edge would have applied, so both get the identical model input.

Loader images are almost always ``u / L`` for integers ``0 <= u <= L``:
``L = 255`` for every uint8 source (CIFAR-10, ``.npz``, ImageFolder at its
native size), ``L = 16`` for scikit-learn's digits. Such a batch travels as one
byte per pixel in the wire format's 8-bit code path, per tensor::

    codes = u - 128 (int8)      zero_point = -128      scale = float32(1 / L)

and :func:`decode_images` recovers ``u`` exactly from the integer codes and
``L`` from the scale, then computes ``u / L`` with the very operation the
loader and :func:`encode_images` used. :func:`encode_images` checks
``u / L == x`` bit for bit on every batch before choosing this form; a batch on
no such grid (an image resized by the loader) travels as raw float32 instead,
4 bytes per pixel and just as exact. A generic receiver that simply
dequantizes (``(code - zp) * scale``) gets the image to within one float32 ulp.

Senders and receivers use this through ``toolkit.core.protocol.codec.IMAGE_CODEC``
(``encode``) and ``DecodedBatch.images()``, like every other message.
"""

from __future__ import annotations

import torch

from toolkit.core.errors import WireError
from toolkit.core.protocol.quant import QuantizedTensor, QuantScheme
from toolkit.core.protocol.wire import ActivationBatch

LEVELS: tuple[int, ...] = (255, 16, 2, 4, 8, 32, 64, 128)
"""Grids ``u / L`` tried, in order: uint8 sources first, then digits, then powers of two."""

IMAGE_SCHEME = QuantScheme(bits=8, granularity="per_tensor", symmetric=False)
_ZERO_POINT = -128


def image_levels(x: torch.Tensor) -> int | None:
    """The first ``L`` of :data:`LEVELS` with ``round(x * L) / L == x`` exactly, else None."""
    if not x.is_floating_point() or x.dtype != torch.float32:
        return None
    for levels in LEVELS:
        u = torch.round(x * levels)
        if torch.equal(u / levels, x):
            return levels
    return None


def encode_images(x: torch.Tensor) -> dict[str, QuantizedTensor | torch.Tensor]:
    """``quantized=`` (one byte a pixel) or ``raw=`` (float32) keyword for ActivationBatch."""
    x = x.detach().to(torch.float32).contiguous()
    levels = image_levels(x)
    if levels is None:
        return {"raw": x}
    u = torch.round(x * levels)
    codes = (u.to(torch.int32) + _ZERO_POINT).to(torch.int8)
    q = QuantizedTensor(codes=codes, scale=torch.tensor([1.0 / levels], dtype=torch.float32),
                        zero_point=torch.tensor([_ZERO_POINT], dtype=torch.int32),
                        scheme=IMAGE_SCHEME)
    return {"quantized": q}


def decode_images(batch: ActivationBatch) -> torch.Tensor:
    """The exact ``[0, 1]`` images of an upload; WireError if it is not in that form."""
    if batch.raw is not None:
        return batch.raw.to(torch.float32)
    q = batch.quantized
    if q is None:
        raise WireError("the image batch carries no pixels.", reason="payload")
    if q.scheme != IMAGE_SCHEME or q.zero_point.numel() != 1 or int(q.zero_point) != _ZERO_POINT:
        raise WireError(
            f"an image upload must be {IMAGE_SCHEME.scheme_id} with zero point {_ZERO_POINT}, "
            f"got {q.scheme.scheme_id} with zero point {q.zero_point.tolist()}.",
            reason="scheme",
        )
    scale = float(q.scale[0])
    levels = round(1.0 / scale)
    if not 1 <= levels <= 255 or torch.tensor(1.0 / levels, dtype=torch.float32) != q.scale[0]:
        raise WireError(f"an image upload's scale must be 1/L for an integer L in 1..255, got "
                        f"{scale!r}.", reason="scale")
    u = q.codes.to(torch.int32) - _ZERO_POINT
    if int(u.max()) > levels:
        raise WireError(f"image codes exceed {levels} levels.", reason="payload")
    return u.to(torch.float32) / levels
