"""Cloud side of hiertrain: trains the cloud segment on edge activations received over MQTT.

Public API::

    from cloud_trainer import CloudConfig, run_cloud, ServeConfig, serve_cloud
    summary = run_cloud(CloudConfig(artifacts="art", broker="mqtt://127.0.0.1:1883",
                                    run_dir="runs/r1", devices=2))

Modules: ``ingest`` (MQTT handlers, bounded queue, drop counting), ``ledger``
(exactly-once bookkeeping), ``config`` (``CloudConfig``), ``loop`` (the one training
loop, every mode), ``learner`` (models, optimizer, checkpoint, evaluation), ``fleet``
(edge statuses and the done rule), ``modes`` (what differs per ``CloudConfig.mode``:
``ht``, ``split`` -- gradients back to the edges -- and ``upload`` -- ``--mode cloud``,
the whole network on uploaded images -- looked up in ``modes.registry``), ``trainer``
(``run_cloud``: the mode's strategy into the loop), ``evaluate`` / ``metrics``
(held-out accuracy, curves), ``summary`` (final files), ``checkpoint`` (atomic files,
resume), ``cloud_link`` (client ids, the MQTT session), ``infer`` / ``serve``
(hierarchical inference), ``outbox`` (publishing off the training thread), ``cli``.

The names are imported lazily: ``cloud-trainer`` checks its arguments and run
directory before paying seconds for torch, so a typo fails at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloud_trainer.config import CloudConfig
    from cloud_trainer.serve import ServeConfig, serve_cloud
    from cloud_trainer.trainer import run_cloud

__all__ = ["CloudConfig", "ServeConfig", "run_cloud", "serve_cloud"]

_WHERE = {"CloudConfig": "config", "run_cloud": "trainer",
          "ServeConfig": "serve", "serve_cloud": "serve"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"cloud_trainer.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'cloud_trainer' has no attribute {name!r}")
