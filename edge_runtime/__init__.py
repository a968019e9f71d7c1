"""hiertrain edge runtime: trains the edge segment on the device, streams int8 cut
activations to the cloud over MQTT, and runs hierarchical (early-exit) inference.

Entry points: ``edge-runtime train|infer|cluster`` (``edge_runtime.cli``), or
``run_training(TrainConfig(...))`` / ``run_inference(InferConfig(...))`` /
``run_cluster(ClusterConfig(...))``.
``TrainConfig.mode`` (``--mode``) picks ht or a baseline: ``split`` (classic split
learning, ``edge_runtime.split_learning``) or ``cloud`` (raw-image upload,
``edge_runtime.upload``).

The names below are imported on first use (PEP 562): ``edge-runtime --help`` and
argument errors should not wait for torch and torchvision to import.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BACKENDS": "edge_runtime.config",
    "ClusterConfig": "edge_runtime.cluster_run",
    "run_cluster": "edge_runtime.cluster_run",
    "EdgeBackend": "edge_runtime.backends",
    "StepResult": "edge_runtime.backends",
    "make_backend": "edge_runtime.backends",
    "InferConfig": "edge_runtime.config",
    "run_inference": "edge_runtime.infer",
    "Publisher": "edge_runtime.publisher",
    "TrainConfig": "edge_runtime.config",
    "run_training": "edge_runtime.train",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'edge_runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
