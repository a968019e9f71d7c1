"""Loading ExecuTorch programs safely from bytes.

ExecuTorch's ``*_from_buffer`` loaders do not copy or own the buffer: if the
``bytes`` object is garbage-collected the program reads freed memory (seen
here as segmentation faults and, worse, silently wrong numbers). Every load in
hiertrain goes through these wrappers, which keep the buffer alive as long as
the module.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import os
import sys
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

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


@contextlib.contextmanager
def _quiet():
    """The runtime's entry points warn that the API is experimental on every call, and its
    CPU probe prints to fd 2 on first load."""
    with warnings.catch_warnings(), stderr_silenced():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _exir_init_skipped():
    """ExecuTorch's runtime modules import ``executorch.exir._warnings`` (one decorator),
    and importing any ``executorch.exir`` submodule runs ``executorch/exir/__init__.py``:
    the whole build stack (passes, dialects, a 1 MB YAML parse), 16 s of a 17 s edge
    start-up here and far more on a Pi, for nothing the runtime uses. While the runtime
    is imported, ``executorch.exir`` is a bare package whose ``__init__`` is not run;
    afterwards it is removed again, so a later ``import executorch.exir`` (the build
    side, in the same process) loads the real package. Already imported: nothing to do."""
    if "executorch.exir" in sys.modules:
        yield
        return
    spec = importlib.util.find_spec("executorch.exir")
    if spec is None or not spec.submodule_search_locations:
        yield  # not installed as expected: the imports below fail or load it normally
        return
    bare = types.ModuleType("executorch.exir")
    bare.__path__ = list(spec.submodule_search_locations)
    bare.__spec__ = spec
    sys.modules["executorch.exir"] = bare
    try:
        yield
    finally:
        if sys.modules.get("executorch.exir") is bare:
            del sys.modules["executorch.exir"]
        parent = sys.modules.get("executorch")
        if parent is not None and getattr(parent, "exir", None) is bare:
            delattr(parent, "exir")


class _Runtime(NamedTuple):
    backends: Callable[[], Any]
    load: Callable[[bytes], Any]
    load_training: Callable[[bytes], Any]
    sgd: Callable[..., Any]


_threads: int | None = None


def set_threads(n: int) -> None:
    """Size ExecuTorch's CPU thread pool (XNNPACK's workers) to ``n`` threads.

    Why: the pool is sized to the machine's cores when it is first used, whatever
    ``torch.set_num_threads`` says, so an edge started with ``--threads 1`` ran its
    XNNPACK kernels on every core and competed with the processes beside it. Resizing a
    pool that programs have already used is unsafe (a step hung here), so the size is
    applied when the runtime is first imported, before any program loads; a call after
    that changes nothing and returns quietly.
    """
    global _threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"thread count must be a positive integer, got {n!r}")
    _threads = n


@functools.cache
def _runtime() -> _Runtime:
    """The ExecuTorch runtime entry points (loaders, SGD), imported once, quietly, without
    the build stack (:func:`_exir_init_skipped`); the thread pool sized by
    :func:`set_threads` if it was called."""
    with _quiet(), _exir_init_skipped():
        from executorch.extension.pybindings import portable_lib
        from executorch.extension.training import (
            _load_for_executorch_for_training_from_buffer,
            get_sgd_optimizer,
        )

        if _threads is not None:
            portable_lib._unsafe_reset_threadpool(_threads)

    return _Runtime(backends=portable_lib._get_registered_backend_names,
                    load=portable_lib._load_for_executorch_from_buffer,
                    load_training=_load_for_executorch_for_training_from_buffer,
                    sgd=get_sgd_optimizer)


def registered_backends() -> list[str]:
    """Delegate backends this ExecuTorch runtime can run (e.g. ``XnnpackBackend``)."""
    load = _runtime().backends
    with _quiet():
        return list(load())


class TrainingProgram:
    """An ExecuTorch training program: ``forward_backward``, gradients, parameters."""

    def __init__(self, data: bytes):
        self._data = bytes(data)  # owned: the runtime points into it
        self._first = True
        load = _runtime().load_training
        with _quiet():
            self.module = load(self._data)

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
        return _runtime().sgd(self.named_parameters(), lr, momentum, 0.0, weight_decay,
                                 nesterov)


class InferenceProgram:
    """An ExecuTorch forward-only program."""

    def __init__(self, data: bytes):
        self._data = bytes(data)
        load = _runtime().load
        with _quiet():
            self.module = load(self._data)
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
