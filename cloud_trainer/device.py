"""Where the cloud computes: the one module that knows about CUDA, pinned memory and autocast.

Everything device-specific is here so that a review of GPU handling reads one file:
the rest of the trainer asks a :class:`Placement` for the model input of a received
batch (:meth:`Placement.activation`), to move a tensor (:meth:`Placement.put`), for the
autocast context of a step (:meth:`Placement.autocast`) and for the optimizer step
(:meth:`Placement.step`, which applies the fp16 loss scaler when there is one).

Why dequantize on the device: the wire carries int8 codes, a quarter of the float32
bytes, so the host-to-device copy moves the codes (from pinned memory, so the copy can
run asynchronously) and the arithmetic ``(code - zero_point) * scale`` runs where the
model is. On the CPU the same calls are plain tensor operations, which is the path the
test suite runs on a machine without a GPU.

``--amp``: ``bf16`` autocasts forward and loss to bfloat16 (no loss scaling needed;
works on CPU and on Ampere or newer GPUs); ``fp16`` autocasts to float16 with a
``torch.amp.GradScaler`` (CUDA). ``off`` (default) trains in float32 as the edge does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from cloud_trainer.config import AMP_MODES
from toolkit.core.errors import HiertrainError
from toolkit.core.protocol.codec import DecodedBatch
from toolkit.core.protocol.quant import QuantizedTensor, dequantize

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"


def resolve_device(spec: str) -> torch.device:
    """``auto`` is CUDA when torch sees a GPU, else the CPU; ``cuda[:N]`` must exist."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise HiertrainError(f"--device {spec!r} is not a device; use {DEVICE_CHOICES}") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise HiertrainError(f"--device {spec!r}: the cloud trainer runs on {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        why = ("this torch is a CPU-only build" if torch.version.cuda is None
               else "torch sees no GPU (driver, CUDA_VISIBLE_DEVICES?)")
        raise HiertrainError(f"--device {spec}: {why}; use --device cpu or auto")
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise HiertrainError(f"--device {spec}: only {count} GPU(s) here "
                             f"(cuda:0..cuda:{count - 1})")
    return dev


def check_amp(amp: str) -> None:
    if amp not in AMP_MODES:
        raise HiertrainError(f"--amp must be one of {list(AMP_MODES)}, got {amp!r}")


@dataclass
class Placement:
    """A resolved device plus the precision policy of the training step."""

    device: torch.device
    amp: str = "off"
    _scaler: Any = field(default=None, repr=False)

    @classmethod
    def from_options(cls, device: str = "auto", amp: str = "off") -> Placement:
        check_amp(amp)
        dev = resolve_device(device)
        place = cls(dev, amp)
        if amp == "fp16":
            if dev.type != "cuda":
                raise HiertrainError("--amp fp16 needs a GPU (loss scaling); use --amp bf16 "
                                     "on the CPU")
            place._scaler = torch.amp.GradScaler("cuda")
        return place

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def describe(self) -> dict[str, Any]:
        """What a summary says about where the run computed."""
        name = torch.cuda.get_device_name(self.device) if self.is_cuda else "cpu"
        return {"device": str(self.device), "name": name, "amp": self.amp}

    # ---------------------------------------------------------------- tensors
    def put(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the device; from pinned memory (asynchronous copy) when that is a GPU."""
        if t.device == self.device:
            return t
        if self.is_cuda and t.device.type == "cpu":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def activation(self, batch: DecodedBatch) -> torch.Tensor:
        """A received batch's float32 tensor, dequantized on the device (int8 codes travel)."""
        q = batch.message.quantized
        if q is None or not self.is_cuda:
            return self.put(batch.tensor)
        on_dev = QuantizedTensor(codes=self.put(q.codes), scale=self.put(q.scale),
                                 zero_point=self.put(q.zero_point), scheme=q.scheme)
        return dequantize(on_dev)

    def labels(self, batch: DecodedBatch) -> torch.Tensor:
        assert batch.labels is not None
        return self.put(batch.labels)

    # ------------------------------------------------------------------- step
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp == "off":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward_step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """``loss.backward()`` and the optimizer step, through the fp16 scaler when there is one."""
        if self._scaler is None:
            loss.backward()
            optimizer.step()
            return
        self._scaler.scale(loss).backward()
        self._scaler.step(optimizer)
        self._scaler.update()

    def scaler_state(self) -> dict[str, Any] | None:
        return None if self._scaler is None else self._scaler.state_dict()

    def load_scaler_state(self, state: dict[str, Any] | None) -> None:
        if self._scaler is not None and state:
            self._scaler.load_state_dict(state)


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Modules in eval mode inside the block, their own modes restored after it."""
    modes = [(m, m.training) for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.train(mode)
