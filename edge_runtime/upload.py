"""The ``cloud`` baseline on the edge (``--mode cloud``): upload the raw images, compute nothing.

Each batch of the same shard, in the same order an ht edge would train on,
is published on the ``act`` topic with its labels: the loader's ``[0, 1]``
images, losslessly (``toolkit.core.protocol.images``: one byte a pixel when the images are
on a ``u / L`` grid, as uint8 sources and digits are, float32 otherwise). The
cloud trainer normalises them with the manifest and trains the whole network.
Like ht, the edge never waits for the cloud; only the link can hold it back
(``publish_wait_s``).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from edge_runtime.config import TrainConfig
from edge_runtime.progress import progress_bar
from edge_runtime.publisher import Publisher
from edge_runtime.session import flush_outbox, lr_schedule, publish_done, schedule_extra
from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.data.source import TrainingData
from toolkit.core.protocol.codec import IMAGE_CODEC, BatchMeta, Codec
from toolkit.core.protocol.messages import Status
from toolkit.core.protocol.quant import QuantScheme
from toolkit.core.protocol.topics import act_topic, status_topic
from toolkit.core.transport import Link

log = logging.getLogger("edge_runtime")

MODE = "cloud"


def upload_loop(cfg: TrainConfig, manifest: Manifest, codec: Codec, scheme: QuantScheme,
                ds: TrainingData, backend: None, link: Link, run: str, device: str
                ) -> dict[str, Any]:
    """Publish ``cfg.epochs`` epochs of images; returns the edge report.

    The images go losslessly whatever ``codec`` says: the codec is for cut
    activations, and this baseline has none.
    """
    bs = manifest.batch_size
    per_epoch = len(ds) // bs
    schedule = lr_schedule(cfg, len(ds), bs)  # the cloud trains everything, on this schedule
    topic = act_topic(run, device)
    seq = samples = raw_batches = 0
    history: list[dict[str, Any]] = []
    publisher = Publisher(link, maxsize=cfg.outbox)
    start = time.monotonic()
    try:
        last_batch_unix: float | None = None
        for epoch in range(cfg.epochs):
            t_epoch = time.monotonic()
            bar = progress_bar(cfg.quiet, total=per_epoch,
                               desc=f"{device} upload {epoch + 1}/{cfg.epochs}", unit="batch",
                               leave=True)
            with bar:
                for i, (x, y) in enumerate(ds.batches(bs, epoch=epoch, seed=cfg.seed)):
                    raw_batches += not IMAGE_CODEC.on_grid(x)
                    publisher.submit(topic, IMAGE_CODEC.encode(
                        x, y, BatchMeta(run, device, seq, epoch, i)), kind="act")
                    seq += 1
                    samples += len(y)
                    last_batch_unix = time.time()  # toolkit bench: end of training
                    bar.update(1)
            history.append({"epoch": epoch, "batches": per_epoch,
                            "seconds": round(time.monotonic() - t_epoch, 3)})
            publisher.submit(status_topic(run, device), Status(
                role="edge", device=device, run=run, state="training", epoch=epoch,
                batches_published=seq, samples_published=samples, last_seq=seq - 1,
                extra={"mode": MODE, **schedule_extra(schedule)}).encode(), retain=True,
                kind="status")
        flush_outbox(publisher, link)
    finally:
        publisher.close()
    if raw_batches:
        log.warning("%d of %d batches were not on a uint8 grid (resized images?) and went as "
                    "float32, 4 bytes a pixel", raw_batches, seq)
    wall_s = time.monotonic() - start
    stats = publisher.stats
    act = stats.by_kind.get("act")
    act_bytes = act.bytes if act else 0
    publish_done(link, run, device, epochs=cfg.epochs, seq=seq, samples=samples,
                 exit_accuracy=None, extra={
                     "mode": MODE, "wall_s": round(wall_s, 3), "bytes_sent": link.bytes_sent,
                     "publish_wait_s": round(stats.publish_wait_s, 4), "epochs": cfg.epochs,
                     **schedule_extra(schedule)})
    return {
        "device": device,
        "run": run,
        "epochs": cfg.epochs,
        "batches_published": seq,
        "samples_published": samples,
        "exit_accuracy": None,
        "bytes_sent": link.bytes_sent,
        "act_bytes_sent": act_bytes,
        "payload_bytes_per_sample": act_bytes / max(samples, 1),
        "float32_batches": raw_batches,
        "wall_s": wall_s,
        "last_batch_unix": last_batch_unix,
        "train_s": 0.0,
        "publish_wait_s": stats.publish_wait_s,
        "batches_per_s": seq / max(wall_s, 1e-9),
        "backend": "none",
        "history": history,
        **schedule_extra(schedule),
    }
