"""The ht training loop (``--mode ht``, this method): local SGD, cut activations to the cloud.

Per batch: one backend step, the cut activation coded and handed to the spooled
publisher; checkpoints every ``checkpoint_every`` batches; retained weights and a
"training" status at each epoch end; "done" when the outbox is flushed, then a
bounded wait until the cloud trainer acked every batch (``edge_runtime.confirm``;
docs/delivery.md).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from edge_runtime.config import TrainConfig
from edge_runtime.confirm import TrainerWatch, wait_for_confirmation
from edge_runtime.fleet_average import count_labels, follower_for
from edge_runtime.progress import progress_bar
from edge_runtime.publisher import Publisher
from edge_runtime.resume import (
    Progress,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    spool_path,
)
from edge_runtime.session import (
    flush_outbox,
    lr_schedule,
    publish_done,
    publish_epoch_weights,
    schedule_extra,
    weights_path,
)
from edge_runtime.spool import Spool
from toolkit.core.artifacts.boards import DEFAULT_SPOOL_MB, load_board
from toolkit.core.artifacts.manifest import MANIFEST_NAME, Manifest, sha256_file
from toolkit.core.classes import SeenClasses, classes_path, save_seen
from toolkit.core.data.source import TrainingData
from toolkit.core.errors import HiertrainError, WireError
from toolkit.core.privacy import cut_transform
from toolkit.core.protocol.codec import BatchMeta, Codec
from toolkit.core.protocol.fleet_average import contribution_meta, new_attempt
from toolkit.core.protocol.messages import CLOUD_DEVICE, Status, decode_ack
from toolkit.core.protocol.quant import QuantScheme
from toolkit.core.protocol.topics import ack_topic, act_topic, status_topic
from toolkit.core.transport import Link, link_summary

log = logging.getLogger("edge_runtime")


def open_spool(cfg: TrainConfig, manifest: Manifest, run: str, device: str) -> Spool:
    """The run's spool, sized by ``--spool-mb``, the ``--board`` profile or the profile the
    artifacts were exported for (``mqtt.spool_mb``)."""
    mb = cfg.spool_mb
    if mb is None and cfg.board:
        mb = load_board(cfg.board).spool_mb
    if mb is None:
        try:
            mb = load_board(manifest.data["board"]["name"]).spool_mb
        except (HiertrainError, KeyError):
            mb = DEFAULT_SPOOL_MB
    if not mb > 0:
        raise HiertrainError(f"--spool-mb must be > 0, got {mb}")
    return Spool(spool_path(cfg.spool_dir or cfg.state_dir, run, device), int(mb * (1 << 20)))


def start_state(cfg: TrainConfig, manifest: Manifest, backend, spool: Spool, run: str,
                 device: str) -> Progress:
    """``--resume``: the checkpoint's progress (the spool keeps what was not acked);
    otherwise a fresh start that forgets an earlier attempt's checkpoint and spool."""
    ckpt = checkpoint_path(cfg.state_dir, run, device)
    sha = sha256_file(manifest.path(MANIFEST_NAME))
    if cfg.resume:
        progress = load_checkpoint(ckpt, run=run, device=device, manifest_sha=sha,
                                   backend=backend)
        if progress is None:
            log.info("no checkpoint in %s: starting afresh", cfg.state_dir)
            return Progress()
        log.info("resuming at epoch %d, batch %d (seq %d); %d batch(es) in the spool, next "
                 "spooled seq %d", progress.epoch + 1, progress.batch, progress.seq,
                 len(spool.pending_seqs()), spool.next_seq)
        return progress
    dropped = spool.clear()
    if dropped:
        log.warning("started afresh: forgot %d unsent message(s) of an earlier attempt in the "
                    "spool (pass --resume to continue it instead)", dropped)
    ckpt.unlink(missing_ok=True)
    return Progress()


def ht_loop(cfg: TrainConfig, manifest: Manifest, codec: Codec, scheme: QuantScheme,
                ds: TrainingData, backend, link: Link, run: str, device: str) -> dict[str, Any]:
    bs = manifest.batch_size
    per_epoch = 0 if cfg.live else len(ds) // bs  # a live source: open-ended, no total
    schedule = lr_schedule(cfg, 0 if cfg.live else len(ds), bs)
    topic = act_topic(run, device)
    spool = open_spool(cfg, manifest, run, device)
    p = start_state(cfg, manifest, backend, spool, run, device)
    resumed = {"epoch": p.epoch, "batch": p.batch, "seq": p.seq} if cfg.resume else None
    p.attempt = p.attempt or new_attempt()  # the fleet's average is made for this attempt
    ckpt = checkpoint_path(cfg.state_dir, run, device)
    sha = sha256_file(manifest.path(MANIFEST_NAME))

    def save() -> None:
        save_checkpoint(ckpt, run=run, device=device, manifest_sha=sha, backend=backend,
                        progress=p)

    publisher = Publisher(link, spool=spool, device=device)
    # classes whose labels have passed (toolkit.core.classes): inference masks the others
    seen = SeenClasses(manifest.num_classes, p.seen_classes)
    # the defence chosen at export (toolkit.core.privacy): applied here, on the board, to the
    # copy that leaves it; the exit head trained on the clean cut inside the step
    protect = cut_transform(manifest.privacy)

    def on_ack(topic_: str, payload: bytes, props: dict[str, Any]) -> None:
        try:
            ack = decode_ack(payload)
        except WireError as exc:
            log.debug("ignored an ack: %s", exc)
            return
        if ack.run == run:
            publisher.on_ack(ack)

    try:
        link.subscribe(ack_topic(run, device), on_ack)
    except HiertrainError as exc:  # e.g. an ACL without read access to the acks
        log.warning("no acks from the cloud trainer (%s); batches leave the spool at the "
                    "broker's PUBACK", exc)
        publisher.device = None
    trainer = TrainerWatch()  # is there a trainer to wait for at the end? (edge_runtime.confirm)
    try:
        link.subscribe(status_topic(run, CLOUD_DEVICE), trainer.on_status)
        trainer.subscribed_at = time.monotonic()
    except HiertrainError as exc:  # unknown then: the end waits up to --confirm-timeout
        log.warning("cannot follow the cloud trainer's status (%s)", exc)
    # --fleet-average: each epoch starts from the fleet's average (edge_runtime.fleet_average)
    follower = follower_for(cfg.fleet_average, cfg.fleet_average_wait, link, run, device,
                            p.attempt, lambda: trainer.averages)
    start = time.monotonic()
    confirm_wait_s = 0.0
    confirmed = None
    incomplete: str | None = None  # why the run ends unconfirmed (exit code 5)
    try:
        last_batch_unix: float | None = None
        for epoch in range(p.epoch, cfg.epochs):
            t_epoch = time.monotonic()
            act_bytes_before = publisher.stats.by_kind.get("act")
            act_bytes_before = act_bytes_before.bytes if act_bytes_before else 0
            first = p.batch if epoch == p.epoch else 0
            bar = progress_bar(cfg.quiet, total=per_epoch or None, initial=first,
                               desc=f"{device} epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                               leave=True)
            with bar:
                # from the batch after the checkpoint this run resumed from: the source
                # starts there without producing (decoding) the batches before it
                for i, (x, y) in enumerate(ds.batches(bs, epoch=epoch, seed=cfg.seed,
                                                      start=first), start=first):
                    t = time.monotonic()
                    for k in seen.update(y):
                        log.info("class %d seen for the first time (batch %d)", k, p.seq)
                        p.seen_classes = seen.sorted()
                    backend.set_lr_factor(schedule.factor(epoch, i))
                    res = backend.step(x, y)
                    p.train_s += time.monotonic() - t
                    msg = codec.encode(protect(res.cut), y, BatchMeta(run, device, p.seq, epoch, i),
                                       base=scheme)
                    publisher.submit(topic, msg, kind="act", seq=p.seq)
                    p.seq += 1
                    p.batch = i + 1
                    p.samples += len(y)
                    p.seen += len(y)
                    p.label_counts = count_labels(p.label_counts, y, manifest.num_classes)
                    p.correct += int((res.exit_logits.argmax(dim=1) == y).sum())
                    p.loss_sum += res.loss
                    last_batch_unix = time.time()  # toolkit bench: end of training
                    if p.seq % cfg.checkpoint_every == 0:
                        save()
                    bar.update(1)
                    if cfg.max_batches is not None and p.seq >= cfg.max_batches:
                        break  # --max-batches: the run ends here, mid-epoch if need be
                    if i % 10 == 0 or i == per_epoch - 1:
                        sent = publisher.stats.by_kind.get("act")
                        rate = ((sent.bytes if sent else 0) - act_bytes_before) / 1024 / max(
                            time.monotonic() - t_epoch, 1e-6)
                        bar.set_postfix(loss=f"{res.loss:.3f}",
                                        exit_acc=f"{p.correct / max(p.seen, 1):.3f}",
                                        KBps=f"{rate:.0f}", refresh=False)
            # --max-batches ended the run inside this epoch (a live epoch has no end)
            stopped = p.batch < per_epoch
            p.exit_accuracy = p.correct / max(p.seen, 1)
            p.history.append({"epoch": epoch, "batches": p.batch,
                              "loss": p.loss_sum / max(p.batch, 1),
                              "exit_accuracy": p.exit_accuracy,
                              "seconds": round(time.monotonic() - t_epoch, 3)})
            publish_epoch_weights(publisher, backend, run, device, epoch, p.seq,
                                  seen_classes=seen.sorted(),
                                  extra=contribution_meta(samples=p.seen, attempt=p.attempt,
                                                          label_counts=p.label_counts))
            status = Status(role="edge", device=device, run=run, state="training", epoch=epoch,
                            batches_published=p.seq, samples_published=p.samples,
                            last_seq=p.seq - 1, exit_accuracy=p.exit_accuracy,
                            extra=schedule_extra(schedule))
            publisher.submit(status_topic(run, device), status.encode(), retain=True,
                             kind="status")
            if stopped:  # the checkpoint keeps the position: --resume continues mid-epoch
                save()
                log.info("stopped after %d batch(es) (--max-batches), in epoch %d at batch %d",
                         p.seq, epoch + 1, p.batch)
                break
            if follower is not None:
                p.history[-1]["fleet_average"] = follower.after_epoch(backend, epoch, cfg.epochs)
            p.epoch, p.batch, p.correct, p.seen, p.loss_sum = epoch + 1, 0, 0, 0, 0.0
            p.label_counts = []
            save()
            log.info("epoch %d/%d: loss %.4f, exit accuracy %.3f", epoch + 1, cfg.epochs,
                     p.history[-1]["loss"], p.exit_accuracy)
        flush_outbox(publisher, link)
        wall_s = time.monotonic() - start
        path = weights_path(cfg.state_dir, device)
        torch.save(backend.state_dict(), path)
        save_seen(classes_path(path), seen)
        stats = publisher.stats
        extra = {"wall_s": round(wall_s, 3), "bytes_sent": link.bytes_sent,
                 "publish_wait_s": round(stats.publish_wait_s, 4),
                 "train_s": round(p.train_s, 3), "backend": backend.name,
                 "epochs": cfg.epochs, "mode": "ht", "codec": codec.name,
                 **schedule_extra(schedule)}
        publish_done(link, run, device, epochs=cfg.epochs, seq=p.seq, samples=p.samples,
                     exit_accuracy=p.exit_accuracy, extra=extra)
        if publisher.device is None:
            pass  # no acks (refused by an ACL, or the no-ack fallback): nothing to confirm
        elif cfg.confirm_timeout > 0:
            outcome = wait_for_confirmation(publisher, spool, trainer, run=run, device=device,
                                            timeout=cfg.confirm_timeout)
            confirmed, confirm_wait_s = outcome.confirmed, outcome.waited_s
            if not confirmed:
                incomplete = (f"{outcome.reason}; they stay in the spool {spool.path}: rerun "
                              "with --resume to send them again")
        elif spool.pending_seqs():
            log.warning("%d batch(es) not confirmed by the cloud trainer yet stay in the spool "
                        "(--confirm-timeout 0: not waiting; --resume sends them again)",
                        len(spool.pending_seqs()))
    finally:
        publisher.close()
        pending = spool.pending_seqs()
        spool_stats = {"spool_path": str(spool.path), "spool_bytes_max": spool.max_bytes,
                       "spool_peak_bytes": spool.peak_bytes, "spool_full_waits": spool.full_waits,
                       "spool_pending": len(pending)}
        spool.close()
    stats = publisher.stats
    act = stats.by_kind.get("act")
    act_bytes = act.bytes if act else 0
    return {
        "device": device,
        "run": run,
        "epochs": cfg.epochs,
        "batches_published": p.seq,
        "samples_published": p.samples,
        "exit_accuracy": p.exit_accuracy,
        "bytes_sent": link.bytes_sent,
        "act_bytes_sent": act_bytes,
        "payload_bytes_per_sample": act_bytes / max(p.samples, 1),
        "float32_bytes_per_sample": manifest.data["cut"]["float32_bytes_per_sample"],
        "wall_s": wall_s,
        "last_batch_unix": last_batch_unix,
        "train_s": p.train_s,
        "publish_wait_s": stats.publish_wait_s,
        "batches_per_s": p.seq / max(wall_s, 1e-9),
        "backend": backend.name,
        "codec": codec.name,
        "weights_path": str(path),
        "link": link_summary(link),
        "history": p.history,
        **schedule_extra(schedule),
        "seen_classes": seen.sorted(),
        "fleet_average": follower.describe() if follower is not None else None,
        "delivery": {"resumed": resumed, "confirmed": confirmed,
                     "confirm_wait_s": round(confirm_wait_s, 3), "acks_seen": publisher.acks_seen,
                     "batches_confirmed": stats.confirmed, "resent": stats.resent,
                     "rewinds": stats.rewinds, "replayed_not_resent": stats.skipped,
                     "publish_errors": stats.publish_errors, "incomplete": incomplete,
                     **spool_stats},
    }
