"""``cloud-trainer serve``: answer hierarchical inference with a trained cloud segment.

No training, no queue of activations: the ingest subscribes to inference
requests only and hands them to the :class:`InferenceServer`, which loads
``cloud_final.pt`` from a finished run directory.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cloud_trainer.checkpoint import CLOUD_FINAL, SUMMARY
from cloud_trainer.cloud_link import client_id
from cloud_trainer.config import MAX_BATCH_FACTOR
from cloud_trainer.infer import InferenceServer
from cloud_trainer.ingest import DeviceRegistry, DropCounter, Ingest
from cloud_trainer.ledger import Ledger
from toolkit.core.artifacts.manifest import load_manifest
from toolkit.core.artifacts.safeload import load_weights
from toolkit.core.classes import SeenClasses
from toolkit.core.errors import HiertrainError
from toolkit.core.models.segments import load_segments
from toolkit.core.protocol import topics
from toolkit.core.protocol.messages import CLOUD_DEVICE, Status
from toolkit.core.security import LinkSecurity
from toolkit.core.transport import LinkShape, link_summary, open_link, shape_link

log = logging.getLogger(__name__)


@dataclass
class ServeConfig:
    artifacts: str | Path
    broker: str
    run_dir: str | Path
    run_id: str = "default"
    duration: float | None = None
    """Stop after this many seconds (None: until ``stop`` is set / Ctrl-C)."""
    connect_timeout: float = 30.0
    quiet: bool = False
    link_kbps: float | None = None
    """Model a slow downlink for the replies (toolkit.core.transport.shaping)."""
    link_latency_ms: float = 0.0
    security: LinkSecurity | None = None
    """Broker credentials, TLS files and the run key (``toolkit.core.security``): each reply is
    signed with the asking device's key, derived from it."""


def load_cloud(artifacts: str | Path, run_dir: str | Path) -> tuple[Any, torch.nn.Module]:
    """The manifest and its cloud segment with the weights of ``run_dir/cloud_final.pt``."""
    manifest = load_manifest(artifacts)
    path = Path(run_dir).expanduser() / CLOUD_FINAL
    if not path.is_file():
        raise HiertrainError(
            f"{path} does not exist; train first (cloud-trainer --run-dir {run_dir} ...) "
            "or point --run-dir at a finished run"
        )
    cloud = load_segments(manifest).cloud
    state = load_weights(path, "cloud weights")
    try:
        cloud.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - unreadable or not this model
        raise HiertrainError(
            f"{path} does not fit the cloud segment of {manifest.root} "
            f"({str(exc).splitlines()[0]}); use the artifacts that run was trained with"
        ) from None
    return manifest, cloud.eval()


def run_seen_classes(run_dir: str | Path, num_classes: int) -> SeenClasses | None:
    """The classes the run trained on (its summary's ``seen_classes``); None: no mask."""
    path = Path(run_dir).expanduser() / SUMMARY
    try:
        seen = json.loads(path.read_text()).get("seen_classes")
    except (OSError, ValueError):
        return None
    return None if seen is None else SeenClasses(num_classes, seen)


def serve_cloud(cfg: ServeConfig, stop: threading.Event | None = None) -> dict[str, Any]:
    """Serve until ``stop`` is set or ``cfg.duration`` passes; returns request counts."""
    topics.validate_id(cfg.run_id, "run id")
    if cfg.security is not None:
        cfg.security.require_run_key("cloud-trainer serve")
    shape = LinkShape.from_options(cfg.link_kbps, cfg.link_latency_ms)
    manifest, cloud = load_cloud(cfg.artifacts, cfg.run_dir)
    stop = stop or threading.Event()
    status_topic = topics.status_topic(cfg.run_id, CLOUD_DEVICE)
    drops = DropCounter()
    link = shape_link(open_link(cfg.broker, client_id("serve", cfg.run_id),
                                security=cfg.security, on_reject=drops.drop), shape)
    link.set_will(status_topic, Status(role="cloud", device=CLOUD_DEVICE, run=cfg.run_id,
                                       state="offline").encode(), retain=True)
    server = InferenceServer(cloud, link, seen=run_seen_classes(cfg.run_dir,
                                                                manifest.num_classes))
    ingest = Ingest(
        cfg.run_id, cut_shape=manifest.cut_shape, num_classes=manifest.num_classes,
        max_batch=MAX_BATCH_FACTOR * manifest.batch_size, ledger=Ledger(),
        registry=DeviceRegistry(), drops=drops, infer_sink=server.submit, train=False,
    )
    ingest.subscribe(link)
    try:
        link.connect(timeout=cfg.connect_timeout)
        # Safe from this thread: in serve mode paho's thread never blocks (submit doesn't).
        link.publish(status_topic, Status(role="cloud", device=CLOUD_DEVICE, run=cfg.run_id,
                                          state="online", extra={"mode": "serve"}).encode(),
                     retain=True)
        log.info("serving inference for run %r on %s", cfg.run_id, link.address.url)
        deadline = None if cfg.duration is None else time.monotonic() + cfg.duration
        while not stop.wait(0.2):
            if deadline is not None and time.monotonic() >= deadline:
                break
        ingest.close()
        server.close()
        try:
            link.publish(status_topic, Status(
                role="cloud", device=CLOUD_DEVICE, run=cfg.run_id, state="offline",
                extra={"mode": "serve", "answered": server.answered}).encode(),
                retain=True, timeout=5.0)
        except HiertrainError as exc:  # the broker went away first: nothing to tell it
            log.warning("could not publish the offline status: %s", exc)
    finally:
        ingest.close()
        server.close()
        link.close()
    return {"answered": server.answered, "refused": server.refused,
            "dropped": drops.snapshot(), "link": link_summary(link)}
