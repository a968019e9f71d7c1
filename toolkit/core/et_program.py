"""Loading ExecuTorch programs safely from bytes.

ExecuTorch's ``*_from_buffer`` loaders do not copy or own the buffer: if the
``bytes`` object is garbage-collected the program reads freed memory (seen
here as segmentation faults and, worse, silently wrong numbers). Every load in
hiertrain goes through these wrappers, which keep the buffer alive as long as
the module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch

# torch warns about an executorch enum at import; harmless and alarming to users.
logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


@contextlib.contextmanager
def stderr_silenced():
    """The runtime's CPU probe prints C++ diagnostics to fd 2 on first load."""
    try:
        fd = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(fd, 2)
    finally:
        os.close(fd)


def registered_backends() -> list[str]:
    """Delegate backends this ExecuTorch runtime can run (e.g. ``XnnpackBackend``)."""
    with warnings.catch_warnings(), stderr_silenced():
        warnings.simplefilter("ignore")
        from executorch.extension.pybindings.portable_lib import (
            _get_registered_backend_names,
        )

        return list(_get_registered_backend_names())


class TrainingProgram:
    """An ExecuTorch training program: ``forward_backward``, gradients, parameters."""

    def __init__(self, data: bytes):
        self._data = bytes(data)  # owned: the runtime points into it
        self._first = True
        with warnings.catch_warnings(), stderr_silenced():
            warnings.simplefilter("ignore")
            from executorch.extension.training import (
                _load_for_executorch_for_training_from_buffer,
            )

            self.module = _load_for_executorch_for_training_from_buffer(self._data)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainingProgram:
        return cls(Path(path).read_bytes())

    def forward_backward(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        """One forward + backward; ``inputs`` as exported (``x, y`` for the edge step)."""
        if self._first:  # the thread pool starts (and prints its CPU probe) on first run
            self._first = False
            with stderr_silenced():
                return self.module.forward_backward("forward", tuple(inputs))
        return self.module.forward_backward("forward", tuple(inputs))

    def named_gradients(self) -> dict[str, torch.Tensor]:
        return self.module.named_gradients()

    def named_parameters(self) -> dict[str, torch.Tensor]:
        """The program's own parameter tensors (writable in place); valid after one step."""
        return self.module.named_parameters()

    def sgd(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
            nesterov: bool = False):
        from executorch.extension.training import get_sgd_optimizer

        return get_sgd_optimizer(self.named_parameters(), lr, momentum, 0.0, weight_decay,
                                 nesterov)


class InferenceProgram:
    """An ExecuTorch forward-only program."""

    def __init__(self, data: bytes):
        self._data = bytes(data)
        with warnings.catch_warnings(), stderr_silenced():
            warnings.simplefilter("ignore")
            from executorch.extension.pybindings.portable_lib import (
                _load_for_executorch_from_buffer,
            )

            self.module = _load_for_executorch_from_buffer(self._data)
        self._first = True

    @classmethod
    def from_file(cls, path: str | Path) -> InferenceProgram:
        return cls(Path(path).read_bytes())

    def run(self, *inputs: torch.Tensor) -> list[torch.Tensor]:
        # Only the first run prints the CPU probe; silencing fd 2 costs four syscalls and
        # an open() (~10 us), a fifth of a small early-exit segment's call.
        if self._first:
            self._first = False
            with stderr_silenced():
                return list(self.module.run_method("forward", tuple(inputs)))
        return list(self.module.run_method("forward", tuple(inputs)))
