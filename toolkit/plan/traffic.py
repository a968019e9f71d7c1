"""Bytes each training mode puts on the link per batch, from the wire format's message sizes.

Every figure is ``toolkit.core.protocol.wire.message_size`` of the message the mode sends,
so headers, per-channel scales, labels and the CRC are counted exactly; only
the MQTT and TCP/IP framing around a message is left out (docs/plan.md).

Two sizes are computed here rather than read from ``message_size`` as is:

* **Packed 2- and 4-bit codes.** The version 1 wire format stores one code per
  byte whatever the width; a packed codec stores ``ceil(n * bits / 8)`` bytes.
  :func:`packed_payload` prices that, on top of the int8 message's header, so
  the figures stay right once ``message_size`` learns packing.
* **Raw images (cloud mode).** A uint8 pixel ``p`` is sent exactly as the
  per-tensor int8 code ``p - 128`` with scale 1/255 and zero point -128, so an
  image batch is an int8 message with one scale.
"""

from __future__ import annotations

import math

from toolkit.core.protocol.quant import QuantScheme
from toolkit.core.protocol.wire import RAW_BITS, message_size

_INT8 = QuantScheme(bits=8)
_IMAGE = QuantScheme(bits=8, granularity="per_tensor")


def packed_payload(n: int, bits: int) -> int:
    """Bytes of ``n`` codes of ``bits`` bits each, packed without padding between codes."""
    return math.ceil(n * bits / 8)


def activation_bytes(batch: int, cut_shape: tuple[int, ...], bits: int = 8, *,
                     run_id: str = "", device_id: str = "") -> int:
    """One activation-batch message (codes, scales, labels) of ``batch`` cut activations.

    ``bits`` 8 is the default int8 per-channel scheme, 4 and 2 the same scheme
    with packed codes, 32 raw float32.
    """
    shape = (batch, *cut_shape)
    if bits == RAW_BITS:
        return message_size(shape, None, run_id=run_id, device_id=device_id)
    int8 = message_size(shape, _INT8, run_id=run_id, device_id=device_id)
    n = math.prod(shape)
    return int8 - n + packed_payload(n, bits)


_GRAD_INT8 = QuantScheme(bits=8, granularity="per_channel", symmetric=True)


def gradient_bytes(batch: int, cut_shape: tuple[int, ...], grad_bits: int = 32, *,
                   run_id: str = "", device_id: str = "") -> int:
    """Split learning's reply: the gradient of the cut activation, no labels.

    ``grad_bits`` 32 is raw float32 (classic split learning, the cloud's
    default), 8 the cloud's ``--grad-bits 8`` (int8, per channel, symmetric).
    """
    if grad_bits not in (8, 32):
        raise ValueError(f"gradient bits must be 8 or 32, got {grad_bits}")
    return message_size((batch, *cut_shape), _GRAD_INT8 if grad_bits == 8 else None,
                        run_id=run_id, device_id=device_id, has_labels=False)


def image_bytes(batch: int, input_shape: tuple[int, ...], *,
                run_id: str = "", device_id: str = "") -> int:
    """Cloud mode's upload: ``batch`` uint8 images and their labels."""
    return message_size((batch, *input_shape), _IMAGE, run_id=run_id, device_id=device_id)
