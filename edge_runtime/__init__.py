"""hiertrain edge runtime: trains the edge segment on the device, streams int8 cut
activations to the cloud over MQTT, and runs hierarchical (early-exit) inference.

Entry points: ``edge-runtime train|infer`` (``edge_runtime.cli``), or
``run_training(TrainConfig(...))`` / ``run_inference(InferConfig(...))``.

The names below are imported on first use (PEP 562): ``edge-runtime --help`` and
argument errors should not wait for torch and torchvision to import.
"""

from __future__ import annotations

import importlib
from typing import Any

BACKENDS: tuple[str, ...] = ("executorch", "torch")
"""``executorch``: the exported program, as on a board; ``torch``: eager, same math."""

_EXPORTS = {
    "EdgeBackend": "edge_runtime.backends",
    "StepResult": "edge_runtime.backends",
    "make_backend": "edge_runtime.backends",
    "InferConfig": "edge_runtime.infer",
    "run_inference": "edge_runtime.infer",
    "Publisher": "edge_runtime.publisher",
    "TrainConfig": "edge_runtime.train",
    "run_training": "edge_runtime.train",
}

__all__ = ["BACKENDS", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
