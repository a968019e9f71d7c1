"""The cloud's MQTT client ids and its link to the broker (session, security, shaping)."""

from __future__ import annotations

import hashlib
import os
import random
from pathlib import Path
from typing import Any

from cloud_trainer.config import CloudConfig
from toolkit.core.transport import LinkShape, open_link, shape_link


def client_id(role: str, run_id: str) -> str:
    """Unique MQTT client id: two processes with one id would keep kicking each other off."""
    return f"hiertrain-{role}-{run_id}-{os.getpid()}-{random.getrandbits(24):06x}"


def session_client_id(run_id: str, run_dir: Path) -> str:
    """The stable client id of a persistent session: one per run and run directory, so a
    restarted trainer finds the session (and the queued batches) its predecessor left."""
    where = hashlib.sha256(str(Path(run_dir).resolve()).encode()).hexdigest()[:10]
    return f"hiertrain-cloud-{run_id}-{where}"


def open_cloud_link(cfg: CloudConfig, run_dir: Path, on_reject: Any = None,
                    worker: int | None = None) -> Any:
    """The trainer's link: a persistent session on MQTT when ``session_expiry`` > 0, a
    receive maximum of ``queue_size`` unacknowledged messages; credentials, TLS and
    signature checks from ``cfg.security``."""
    kw: dict[str, Any] = {}
    if cfg.broker.strip().lower().startswith(("mqtt:", "mqtts:")):
        # flow control by the broker, never by blocking paho's thread (cloud_trainer.ingest)
        kw["receive_maximum"] = cfg.queue_size
        if cfg.session_expiry > 0:
            kw["session_expiry"] = cfg.session_expiry
    cid = (session_client_id(cfg.run_id, run_dir) if "session_expiry" in kw
           else client_id("cloud", cfg.run_id))
    if worker is not None:  # each worker of a group has its own session
        cid = f"{cid}-w{worker}"
    link = open_link(cfg.broker, cid, security=cfg.security, on_reject=on_reject, **kw)
    return shape_link(link, LinkShape.from_options(cfg.link_kbps, cfg.link_latency_ms))
