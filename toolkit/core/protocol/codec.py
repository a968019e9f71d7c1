"""Named activation codecs: how many bits a cut activation gets and whether it is deflated.

The link from a board to the cloud is often the bottleneck of hierarchical
training, and the cut activation is almost all of what crosses it. A codec is
the one choice a user makes about that traffic (``toolkit export --codec``,
``edge-runtime train --codec``); it combines

* the code width, from ``toolkit.core.protocol.quant`` (2, 4 or 8 bits, or raw float32 for
  baselines and debugging), packed 4, 2 or 1 to a byte by ``toolkit.core.protocol.wire``, and
* lossless entropy coding of those bytes: ``deflate`` (stdlib ``zlib``).
  Post-ReLU activations are mostly exact zeros, which an affine code maps to
  one code value (``qmin``), so the bytes are highly repetitive.

The codec does not change the rest of the quantization scheme: granularity,
symmetry and channel axis come from the manifest's ``quantization`` (by
default per channel, affine). Affine is the right choice below 8 bits for
post-ReLU data: its range is [0, max], so all 2**bits levels go to
non-negative values, where a symmetric 2-bit code would have only 0 and one
positive level.

The receiver needs no configuration: every wire message says how it is coded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from toolkit.core.errors import HiertrainError
from toolkit.core.protocol.quant import DEFAULT_SCHEME, QuantScheme, quantize
from toolkit.core.protocol.wire import ActivationBatch, encode, message_size, plain_payload_size

RAW_BITS = 32
ENTROPY_CODERS: tuple[str, ...] = ("none", "deflate")


@dataclass(frozen=True)
class Codec:
    """One named way to put an activation on the wire.

    ``bits`` is 2, 4 or 8 for quantized codes and 32 for raw float32;
    ``entropy`` is ``"none"`` or ``"deflate"``.
    """

    name: str
    bits: int
    entropy: str = "none"

    @property
    def quantized(self) -> bool:
        """False for the raw float32 codec."""
        return self.bits != RAW_BITS

    @property
    def deflate(self) -> bool:
        return self.entropy == "deflate"

    def scheme(self, base: QuantScheme = DEFAULT_SCHEME) -> QuantScheme:
        """``base`` (granularity, symmetry, channel axis) with this codec's bits."""
        if not self.quantized:
            raise HiertrainError(f"codec {self.name!r} sends raw float32 and has no quantization "
                                 "scheme; pick an intN codec to quantize")
        return dataclasses.replace(base, bits=self.bits)

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``codec`` object."""
        return {"name": self.name, "bits": self.bits, "entropy": self.entropy}

    def encode(self, batch: ActivationBatch) -> bytes:
        """Wire bytes of an already built batch, deflated if this codec says so."""
        return encode(batch, deflate=self.deflate)


CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Codec("int8", 8),
        Codec("int4", 4),
        Codec("int2", 2),
        Codec("int8+deflate", 8, "deflate"),
        Codec("int4+deflate", 4, "deflate"),
        Codec("int2+deflate", 2, "deflate"),
        Codec("float32", RAW_BITS),
    )
}
DEFAULT_CODEC = "int8"
"""What a manifest without a ``codec`` object (exported before codecs existed) means."""


def parse_codec(name: str) -> Codec:
    """The codec called ``name``; a :class:`HiertrainError` listing the valid names otherwise."""
    codec = CODECS.get(str(name).strip().lower())
    if codec is None:
        raise HiertrainError(
            f"unknown codec {name!r}; choose one of: {', '.join(CODECS)}"
        )
    return codec


def encode_activation(
    run_id: str,
    device_id: str,
    seq: int,
    epoch: int,
    batch_index: int,
    tensor: torch.Tensor,
    labels: torch.Tensor | None,
    codec: Codec,
    base_scheme: QuantScheme = DEFAULT_SCHEME,
) -> bytes:
    """Quantize (unless float32), pack and maybe deflate one activation batch: its wire bytes."""
    if codec.quantized:
        batch = ActivationBatch(run_id, device_id, seq, epoch, batch_index,
                                quantized=quantize(tensor, codec.scheme(base_scheme)),
                                labels=labels)
    else:
        batch = ActivationBatch(run_id, device_id, seq, epoch, batch_index, raw=tensor,
                                labels=labels)
    return codec.encode(batch)


@dataclass(frozen=True)
class SizeEstimate:
    """Bytes per sample of a codec at a batch size, before sending anything.

    ``exact`` is False for deflate codecs: their payload depends on the data,
    and the figures are upper bounds (the wire never sends a deflated payload
    longer than the plain one).
    """

    payload_bytes_per_sample: float
    message_bytes_per_sample: float
    exact: bool

    def to_dict(self) -> dict[str, Any]:
        return {"payload_bytes_per_sample": self.payload_bytes_per_sample,
                "message_bytes_per_sample": self.message_bytes_per_sample,
                "size": "exact" if self.exact else "upper_bound"}


def size_estimate(
    codec: Codec,
    cut_shape: tuple[int, ...] | list[int],
    batch: int,
    base_scheme: QuantScheme = DEFAULT_SCHEME,
    *,
    run_id: str = "",
    device_id: str = "",
) -> SizeEstimate:
    """Payload and whole-message bytes per sample of one training batch of ``cut_shape``.

    The message figure includes the header, scales, labels and CRC, with the
    given ids (each id adds its utf-8 length once per message).
    """
    shape = (int(batch), *(int(d) for d in cut_shape))
    scheme = codec.scheme(base_scheme) if codec.quantized else None
    payload = plain_payload_size(shape, scheme)
    message = message_size(shape, scheme, run_id=run_id, device_id=device_id)
    return SizeEstimate(payload_bytes_per_sample=payload / batch,
                        message_bytes_per_sample=message / batch,
                        exact=not codec.deflate)


def float32_bytes_per_sample(cut_shape: tuple[int, ...] | list[int]) -> int:
    """Payload bytes of one raw float32 sample, the baseline every ratio is taken against."""
    return 4 * math.prod(int(d) for d in cut_shape)
