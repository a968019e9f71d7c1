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

A codec object is the one way to build and to read an activation message, in
both directions, for every sender and receiver (activations, inference
requests, split-learning gradients, and with :data:`IMAGE_CODEC` the lossless
image upload)::

    data = codec.encode(activation, labels, BatchMeta(run, device, seq, epoch, i), base=scheme)
    batch = codec.decode(data)     # DecodedBatch: .tensor (float32), .labels, .meta

Below it, ``toolkit.core.protocol.quant`` does the arithmetic and
``toolkit.core.protocol.wire`` the bytes; nothing else calls them to make or read
a message. Decoding does not depend on the codec it is called on (any codec,
or the module function :func:`decode`, reads every message).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from toolkit.core.errors import HiertrainError
from toolkit.core.protocol import images as _images
from toolkit.core.protocol import wire
from toolkit.core.protocol.quant import DEFAULT_SCHEME, QuantScheme, dequantize, quantize
from toolkit.core.protocol.wire import ActivationBatch, message_size, plain_payload_size

RAW_BITS = 32
ENTROPY_CODERS: tuple[str, ...] = ("none", "deflate")


@dataclass(frozen=True)
class BatchMeta:
    """Whose batch this is and where it sits in training: the routing fields of a message.

    ``seq`` is the sender's per-device sequence number (a gradient carries the
    ``seq`` of its activation); ``epoch`` and ``batch_index`` place the batch in
    the sender's data order.
    """

    run_id: str
    device_id: str
    seq: int
    epoch: int = 0
    batch_index: int = 0


@dataclass(eq=False)
class DecodedBatch:
    """One received message: its meta, its labels, and the tensor as float32.

    ``tensor`` is decoded on first use, so a receiver's network thread only
    parses and checks (:func:`decode`) and the training thread pays for the
    arithmetic. ``message`` is the checked wire form (codes, scales, scheme) for
    the few receivers that need more than the float tensor.
    """

    meta: BatchMeta
    labels: torch.Tensor | None
    message: ActivationBatch

    @property
    def run_id(self) -> str:
        return self.meta.run_id

    @property
    def device_id(self) -> str:
        return self.meta.device_id

    @property
    def seq(self) -> int:
        return self.meta.seq

    @property
    def epoch(self) -> int:
        return self.meta.epoch

    @property
    def batch_index(self) -> int:
        return self.meta.batch_index

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape (batch first), without decoding it."""
        m = self.message
        return tuple(m.quantized.codes.shape if m.quantized is not None
                     else m.raw.shape)  # type: ignore[union-attr]

    @property
    def scheme(self) -> QuantScheme | None:
        """How the tensor was quantized; None for raw float32."""
        return self.message.quantized.scheme if self.message.quantized is not None else None

    @cached_property
    def tensor(self) -> torch.Tensor:
        """The activation (or gradient) as float32, whichever form it was sent in."""
        if self.message.quantized is not None:
            return dequantize(self.message.quantized)
        assert self.message.raw is not None  # wire.decode sets exactly one of the two
        return self.message.raw.to(torch.float32)

    def images(self) -> torch.Tensor:
        """The exact ``[0, 1]`` images of an :data:`IMAGE_CODEC` upload (``tensor`` may
        differ by one float32 ulp); WireError if the message is not in that form."""
        return _images.decode_images(self.message)


def decode(payload: bytes, *, expected_run_id: str | None = None) -> DecodedBatch:
    """Parse and check one activation message, however it was coded.

    Raises :class:`~toolkit.core.errors.WireError` (with a ``reason``) and
    nothing else on malformed input; ``expected_run_id`` drops messages from
    another run (reason ``run_id``). See ``toolkit.core.protocol.wire`` for the checks.
    """
    m = wire.decode(payload, expected_run_id=expected_run_id)
    return DecodedBatch(BatchMeta(m.run_id, m.device_id, m.seq, m.epoch, m.batch_index),
                        m.labels, m)


def _message(meta: BatchMeta, labels: torch.Tensor | None, **form: Any) -> ActivationBatch:
    return ActivationBatch(meta.run_id, meta.device_id, meta.seq, meta.epoch, meta.batch_index,
                           labels=labels, **form)


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

    def encode(
        self,
        tensor: torch.Tensor,
        labels: torch.Tensor | None,
        meta: BatchMeta,
        *,
        base: QuantScheme = DEFAULT_SCHEME,
    ) -> bytes:
        """The wire bytes of one batch: ``tensor`` quantized with ``base`` at this codec's bits
        (or raw float32), packed, and deflated if this codec says so.

        ``labels`` is ``[N]`` integers for training batches and None for
        inference requests and gradients. Raises WireError for anything the
        wire format cannot carry (NaN or Inf included).
        """
        if self.quantized:
            batch = _message(meta, labels, quantized=quantize(tensor, self.scheme(base)))
        else:
            batch = _message(meta, labels, raw=tensor)
        return wire.encode(batch, deflate=self.deflate)

    decode = staticmethod(decode)


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


def codec_for(scheme: QuantScheme) -> Codec:
    """The plain (not deflated) codec with ``scheme``'s bits: what a sender uses whose
    scheme, not a codec name, says how to quantize (inference requests)."""
    return CODECS[f"int{scheme.bits}"]


@dataclass(frozen=True)
class ImageCodec:
    """The lossless image upload of the ``cloud`` baseline (``toolkit.core.protocol.images``):
    one byte a pixel when the batch is on a ``u / L`` grid, raw float32 otherwise.

    The same interface as :class:`Codec`; not in :data:`CODECS`, because it is not
    a choice for cut activations.
    """

    name: str = "uint8-images"

    def encode(self, images: torch.Tensor, labels: torch.Tensor | None,
               meta: BatchMeta) -> bytes:
        """The wire bytes of a batch of ``[0, 1]`` images, exactly recoverable by
        :meth:`DecodedBatch.images`."""
        return wire.encode(_message(meta, labels, **_images.encode_images(images)))

    @staticmethod
    def on_grid(images: torch.Tensor) -> bool:
        """True when :meth:`encode` sends one byte a pixel, False when raw float32."""
        return _images.image_levels(images.detach().to(torch.float32)) is not None

    decode = staticmethod(decode)


IMAGE_CODEC = ImageCodec()


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
