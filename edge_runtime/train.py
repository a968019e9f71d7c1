"""Edge training: local SGD on the edge segment + exit head, cut activations to the cloud.

Per batch: one backend step (ExecuTorch program or eager torch), the cut
activation coded with the manifest's codec, or ``--codec`` (``toolkit.core.protocol.codec``:
quantized with the manifest's scheme at the codec's bits, packed, maybe
deflated), encoded with its labels (``toolkit.core.protocol.wire``) and handed to the
:class:`~edge_runtime.publisher.Publisher`,
whose outbox decouples training from the network. The edge trains its own
layers from its exit head's loss only; it never waits for, nor receives anything
from, the cloud trainer.

Protocol (see the runtime spec): activations on ``act_topic`` with a ``seq``
that counts every published batch of the run from 0; retained weights and a
"training" status at each epoch end; a "done" status after every activation was
acknowledged by the broker; a retained "offline" last will.

Timing fields of the summary: ``wall_s`` runs from the first batch to the
moment every message was acknowledged (loading, exporting and connecting are
excluded, they are in ``setup_s``); ``train_s`` is the time spent in the
backend's steps; ``publish_wait_s`` is the time the loop was blocked on a full
outbox (link back-pressure).

``--mode split`` and ``--mode cloud`` (the baselines, ``toolkit.core.protocol.modes``) share
the setup, the status protocol and the report here and run their own loops:
``edge_runtime.split_learning`` and ``edge_runtime.upload``. Every report has
``mode``, ``samples``, ``bytes_up``, ``bytes_down``, ``wall_s``, ``exit_accuracy``
and ``full_accuracy`` (None on the edge: the cloud trainer measures it).

The final edge weights are also saved locally, ``<state_dir>/edge_weights-<device>.pt``
(``torch.save`` of the state dict; ``state_dir`` defaults to the current
directory), for ``edge-runtime infer --weights PATH``.

Delivery and resume (``ht``; docs/delivery.md): the publisher's outbox is an on-disk
:class:`~edge_runtime.spool.Spool` that keeps each batch until the cloud trainer's ack on
``hiertrain/<run>/cloud/ack`` says it is trained and checkpointed; the loop checkpoints
itself (``edge_runtime.resume``) every ``checkpoint_every`` batches, and ``--resume``
continues from there. After "done", the edge waits up to ``confirm_timeout`` s for the
acks of its last batches (only when it has heard from a trainer at all).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from edge_runtime.backends import EdgeBackend, make_backend
from edge_runtime.config import TrainConfig
from edge_runtime.link import connect_edge
from edge_runtime.publisher import Publisher
from edge_runtime.resume import (
    Progress,
    checkpoint_path,
    load_checkpoint,
    save_checkpoint,
    spool_path,
)
from edge_runtime.spool import Spool
from toolkit.core.artifacts.boards import DEFAULT_SPOOL_MB, load_board
from toolkit.core.artifacts.manifest import MANIFEST_NAME, Manifest, load_manifest, sha256_file
from toolkit.core.data.datasets import Dataset, batches, load_dataset, normalize, shard
from toolkit.core.errors import HiertrainError, WireError
from toolkit.core.protocol.codec import BatchMeta, Codec, parse_codec
from toolkit.core.protocol.messages import Status, decode_ack, encode_weights
from toolkit.core.protocol.modes import check_mode
from toolkit.core.protocol.quant import QuantScheme
from toolkit.core.protocol.topics import (
    ack_topic,
    act_topic,
    status_topic,
    validate_id,
    weights_topic,
)
from toolkit.core.security import redact
from toolkit.core.transport import Link, LinkShape, drain_s, link_summary

log = logging.getLogger("edge_runtime")

__all__ = ["TrainConfig", "load_training_data", "parse_shard", "publish_done", "resolve_backend",
           "run_training", "weights_path"]

FLUSH_TIMEOUT_S = 120.0
STATUS_TIMEOUT_S = 10.0


def weights_path(state_dir: str | Path, device: str) -> Path:
    """Where training leaves the final edge weights of ``device``."""
    return Path(state_dir) / f"edge_weights-{device}.pt"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)`` with ``0 <= i < n``."""
    try:
        index_s, count_s = str(text).split("/")
        index, count = int(index_s), int(count_s)
    except ValueError:
        raise HiertrainError(
            f"bad shard {text!r}: use INDEX/COUNT, e.g. 0/2 for the first of two devices"
        ) from None
    if count < 1 or not 0 <= index < count:
        raise HiertrainError(
            f"bad shard {text!r}: INDEX must be in 0..COUNT-1 and COUNT >= 1, e.g. 1/2"
        )
    return index, count


def load_training_data(
    manifest: Manifest, source: str | None, shard_spec: str, *, limit: int | None, seed: int,
    normalized: bool = True,
) -> Dataset:
    """This device's shard of the train split, normalised as the model was exported
    (``normalized=False``: the loader's ``[0, 1]`` images, which ``--mode cloud`` uploads)."""
    index, count = parse_shard(shard_spec)
    ds = load_dataset(source, "train", input_shape=manifest.input_shape, limit=limit, seed=seed)
    if count > 1:
        ds = shard(ds, index, count)
    if normalized:
        norm = manifest.data["model"]["normalization"]
        ds = Dataset(x=normalize(ds.x, norm["mean"], norm["std"]), y=ds.y, classes=ds.classes,
                     name=ds.name)
    if len(ds) and int(ds.y.max()) >= manifest.num_classes:
        raise HiertrainError(
            f"{ds.name} has labels up to {int(ds.y.max())} but the artifacts were exported for "
            f"{manifest.num_classes} classes; re-export with --num-classes {int(ds.y.max()) + 1}"
        )
    if len(ds) < manifest.batch_size:
        raise HiertrainError(
            f"{ds.name} has {len(ds)} training samples on this device, fewer than one batch of "
            f"{manifest.batch_size}; use more data, fewer shards or a smaller exported batch"
        )
    return ds


def _publish_status(link: Link, status: Status) -> None:
    link.publish(status_topic(status.run, status.device), status.encode(), retain=True,
                 timeout=STATUS_TIMEOUT_S)


def run_training(cfg: TrainConfig, backend: EdgeBackend | None = None) -> dict[str, Any]:
    """Train, publish, report; returns the summary dict (also written to ``cfg.report``).

    ``backend`` replaces the one ``cfg.backend`` names (``edge-runtime cluster`` passes its
    tiled cluster step)."""
    t0 = time.monotonic()
    run = validate_id(cfg.run_id, "run id")
    device = validate_id(cfg.device_id, "device id")
    if cfg.epochs < 1:
        raise HiertrainError(f"epochs must be >= 1, got {cfg.epochs}")
    shape = LinkShape.from_options(cfg.link_kbps, cfg.link_latency_ms)
    try:  # fail before training, not after it, if the weights cannot be saved
        Path(cfg.state_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HiertrainError(f"cannot use --state-dir {cfg.state_dir}: {exc}") from None
    mode = check_mode(cfg.mode)
    if cfg.resume and mode != "ht":
        raise HiertrainError(f"--resume applies to --mode ht only, not {mode}; drop it")
    if cfg.checkpoint_every < 1:
        raise HiertrainError(f"--checkpoint-every must be >= 1, got {cfg.checkpoint_every}")
    if cfg.float_act and mode != "split":
        raise HiertrainError("--float-act only applies to --mode split; drop it")
    if mode == "split" and not cfg.grad_timeout > 0:
        raise HiertrainError(f"--grad-timeout must be > 0 seconds, got {cfg.grad_timeout}")
    backend_name = resolve_backend(cfg.backend, mode)
    manifest = load_manifest(cfg.artifacts)  # verifies every artifact's sha256
    codec = parse_codec(cfg.codec or manifest.codec_name)
    scheme = QuantScheme.from_dict(manifest.data["quantization"])
    ds = load_training_data(manifest, cfg.data, cfg.shard, limit=cfg.limit, seed=cfg.seed,
                            normalized=mode != "cloud")
    if backend is None and backend_name:
        backend = make_backend(backend_name, manifest)
    log.info("device %s: %d samples of %s, mode %s, %s backend, batch %d", device, len(ds),
             ds.name, mode, backend.name if backend else "no", manifest.batch_size)

    link = connect_edge(cfg.broker, run, device, role="edge", timeout=cfg.connect_timeout,
                        will=True, shape=shape, security=cfg.security)
    try:
        _publish_status(link, Status(role="edge", device=device, run=run, state="online",
                                     extra={"backend": backend.name if backend else "none",
                                            "samples": len(ds), "mode": mode}))
        setup_s = time.monotonic() - t0
        started_unix = time.time()
        summary = _mode_loop(mode)(cfg, manifest, codec, scheme, ds, backend, link, run,
                                   device)
        summary["setup_s"] = round(setup_s, 3)
        # Wall-clock stamps (not monotonic): toolkit bench lines them up with the
        # cloud trainer's on the same machine to time a whole run.
        summary["started_unix"] = started_unix
        summary["finished_unix"] = time.time()
        summary = {"mode": mode, **summary, **_link_totals(summary, link)}
    except BaseException as exc:
        _report_failure(link, run, device, exc)
        link.close()
        raise
    link.close()
    if cfg.report:
        path = Path(cfg.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = redact(_jsonable(asdict(cfg)))
        path.write_text(json.dumps({**summary, "config": config}, indent=2) + "\n")
    return summary


def resolve_backend(backend: str | None, mode: str) -> str | None:
    """The edge backend a mode runs on: ``--backend`` (default executorch) for ht, torch for
    split (the exported program has no input for a gradient from the cloud), none for cloud."""
    if mode == "cloud":
        return None
    if mode == "split":
        if backend not in (None, "torch"):
            raise HiertrainError(
                f"--mode split runs the edge on the torch backend, not {backend}: the exported "
                "program cannot take the cloud's gradient; drop --backend or pass --backend torch"
            )
        return "torch"
    return backend or "executorch"


def _mode_loop(mode: str):
    """The training loop of a mode (the baselines live in their own modules)."""
    if mode == "split":
        from edge_runtime.split_learning import split_loop

        return split_loop
    if mode == "cloud":
        from edge_runtime.upload import upload_loop

        return upload_loop
    return _train_loop


def _link_totals(summary: dict[str, Any], link: Link) -> dict[str, Any]:
    """The keys every mode's report carries, for comparing the modes (see docs/runtime.md).

    ``bytes_up``/``bytes_down``: application payload bytes this device sent / received
    over the whole run, everything included (status, weights, gradients).
    """
    return {
        "samples": summary["samples_published"],
        "bytes_up": link.bytes_sent,
        "bytes_down": link.bytes_received,
        "full_accuracy": summary.get("full_accuracy"),  # the cloud measures it: cloud_summary
        "exit_accuracy": summary.get("exit_accuracy"),
    }


def flush_outbox(publisher: Publisher, link: Link) -> None:
    """Wait until everything submitted reached the broker, however slow the link.

    On a shaped (slow) link the bound grows by the time the bytes still queued
    need at its rate: an 11 MB weights upload at 500 kbit/s takes three minutes
    and is not a broker that stopped answering.
    """
    pending = publisher.stats.bytes_submitted - publisher.stats.bytes_acked
    publisher.flush(FLUSH_TIMEOUT_S + drain_s(link, pending))
    link.flush(FLUSH_TIMEOUT_S + drain_s(link))  # a shaped link still holds its buffer


def publish_epoch_weights(publisher: Publisher, backend: EdgeBackend, run: str, device: str,
                          epoch: int, seq: int) -> None:
    """Retained edge weights at an epoch's end: the cloud assembles and scores the full model."""
    meta = {"run": run, "device": device, "epoch": epoch, "last_seq": seq - 1}
    publisher.submit(weights_topic(run, device), encode_weights(backend.state_dict(), meta),
                     retain=True, kind="weights")


def publish_done(link: Link, run: str, device: str, *, epochs: int, seq: int, samples: int,
                 exit_accuracy: float | None, extra: dict[str, Any]) -> None:
    """The retained "done" status: the cloud trains until it has ``seq`` batches of us."""
    _publish_status(link, Status(role="edge", device=device, run=run, state="done",
                                 epoch=epochs - 1, batches_published=seq,
                                 samples_published=samples, last_seq=seq - 1,
                                 exit_accuracy=exit_accuracy, extra=extra))


def _open_spool(cfg: TrainConfig, manifest: Manifest, run: str, device: str) -> Spool:
    """The run's spool, sized by ``--spool-mb`` or the board profile the artifacts were
    exported for (``mqtt.spool_mb``)."""
    mb = cfg.spool_mb
    if mb is None:
        try:
            mb = load_board(manifest.data["board"]["name"]).spool_mb
        except (HiertrainError, KeyError):
            mb = DEFAULT_SPOOL_MB
    if not mb > 0:
        raise HiertrainError(f"--spool-mb must be > 0, got {mb}")
    return Spool(spool_path(cfg.spool_dir or cfg.state_dir, run, device), int(mb * (1 << 20)))


def _start_state(cfg: TrainConfig, manifest: Manifest, backend, spool: Spool, run: str,
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


def _train_loop(cfg: TrainConfig, manifest: Manifest, codec: Codec, scheme: QuantScheme,
                ds: Dataset, backend, link: Link, run: str, device: str) -> dict[str, Any]:
    bs = manifest.batch_size
    per_epoch = len(ds) // bs
    topic = act_topic(run, device)
    spool = _open_spool(cfg, manifest, run, device)
    p = _start_state(cfg, manifest, backend, spool, run, device)
    resumed = {"epoch": p.epoch, "batch": p.batch, "seq": p.seq} if cfg.resume else None
    ckpt = checkpoint_path(cfg.state_dir, run, device)
    sha = sha256_file(manifest.path(MANIFEST_NAME))

    def save() -> None:
        save_checkpoint(ckpt, run=run, device=device, manifest_sha=sha, backend=backend,
                        progress=p)

    publisher = Publisher(link, spool=spool, device=device)

    def on_ack(topic_: str, payload: bytes, props: dict[str, Any]) -> None:
        try:
            ack = decode_ack(payload)
        except WireError as exc:
            log.debug("ignored an ack: %s", exc)
            return
        if ack.run == run:
            publisher.on_ack(ack)

    try:
        link.subscribe(ack_topic(run), on_ack)
    except HiertrainError as exc:  # e.g. an ACL without read access to the acks
        log.warning("no acks from the cloud trainer (%s); batches leave the spool at the "
                    "broker's PUBACK", exc)
        publisher.device = None
    start = time.monotonic()
    confirm_wait_s = 0.0
    confirmed = None
    try:
        last_batch_unix: float | None = None
        for epoch in range(p.epoch, cfg.epochs):
            t_epoch = time.monotonic()
            act_bytes_before = publisher.stats.by_kind.get("act")
            act_bytes_before = act_bytes_before.bytes if act_bytes_before else 0
            first = p.batch if epoch == p.epoch else 0
            bar = tqdm(total=per_epoch, initial=first,
                       desc=f"{device} epoch {epoch + 1}/{cfg.epochs}", unit="batch",
                       disable=cfg.quiet, file=sys.stderr, leave=True)
            with bar:
                for i, (x, y) in enumerate(batches(ds, bs, epoch=epoch, seed=cfg.seed)):
                    if i < first:
                        continue  # trained before the checkpoint this run resumed from
                    t = time.monotonic()
                    res = backend.step(x, y)
                    p.train_s += time.monotonic() - t
                    msg = codec.encode(res.cut, y, BatchMeta(run, device, p.seq, epoch, i),
                                       base=scheme)
                    publisher.submit(topic, msg, kind="act", seq=p.seq)
                    p.seq += 1
                    p.batch = i + 1
                    p.samples += len(y)
                    p.seen += len(y)
                    p.correct += int((res.exit_logits.argmax(dim=1) == y).sum())
                    p.loss_sum += res.loss
                    last_batch_unix = time.time()  # toolkit bench: end of training
                    if p.seq % cfg.checkpoint_every == 0:
                        save()
                    bar.update(1)
                    if i % 10 == 0 or i == per_epoch - 1:
                        sent = publisher.stats.by_kind.get("act")
                        rate = ((sent.bytes if sent else 0) - act_bytes_before) / 1024 / max(
                            time.monotonic() - t_epoch, 1e-6)
                        bar.set_postfix(loss=f"{res.loss:.3f}",
                                        exit_acc=f"{p.correct / max(p.seen, 1):.3f}",
                                        KBps=f"{rate:.0f}", refresh=False)
            p.exit_accuracy = p.correct / max(p.seen, 1)
            p.history.append({"epoch": epoch, "batches": per_epoch,
                              "loss": p.loss_sum / per_epoch,
                              "exit_accuracy": p.exit_accuracy,
                              "seconds": round(time.monotonic() - t_epoch, 3)})
            publish_epoch_weights(publisher, backend, run, device, epoch, p.seq)
            status = Status(role="edge", device=device, run=run, state="training", epoch=epoch,
                            batches_published=p.seq, samples_published=p.samples,
                            last_seq=p.seq - 1, exit_accuracy=p.exit_accuracy)
            publisher.submit(status_topic(run, device), status.encode(), retain=True,
                             kind="status")
            p.epoch, p.batch, p.correct, p.seen, p.loss_sum = epoch + 1, 0, 0, 0, 0.0
            save()
            log.info("epoch %d/%d: loss %.4f, exit accuracy %.3f", epoch + 1, cfg.epochs,
                     p.history[-1]["loss"], p.exit_accuracy)
        flush_outbox(publisher, link)
        wall_s = time.monotonic() - start
        path = weights_path(cfg.state_dir, device)
        torch.save(backend.state_dict(), path)
        stats = publisher.stats
        extra = {"wall_s": round(wall_s, 3), "bytes_sent": link.bytes_sent,
                 "publish_wait_s": round(stats.publish_wait_s, 4),
                 "train_s": round(p.train_s, 3), "backend": backend.name,
                 "epochs": cfg.epochs, "mode": "ht", "codec": codec.name}
        publish_done(link, run, device, epochs=cfg.epochs, seq=p.seq, samples=p.samples,
                     exit_accuracy=p.exit_accuracy, extra=extra)
        if publisher.acks_seen and cfg.confirm_timeout > 0:
            t = time.monotonic()
            confirmed = publisher.wait_confirmed(cfg.confirm_timeout)
            confirm_wait_s = time.monotonic() - t
            if not confirmed:
                log.warning("the cloud trainer did not ack %d batch(es) within %g s; they stay "
                            "in the spool (rerun with --resume to send them again)",
                            len(spool.pending_seqs()), cfg.confirm_timeout)
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
        "delivery": {"resumed": resumed, "confirmed": confirmed,
                     "confirm_wait_s": round(confirm_wait_s, 3), "acks_seen": publisher.acks_seen,
                     "batches_confirmed": stats.confirmed, "resent": stats.resent,
                     "rewinds": stats.rewinds, "replayed_not_resent": stats.skipped,
                     "publish_errors": stats.publish_errors, **spool_stats},
    }


def _report_failure(link: Link, run: str, device: str, exc: BaseException) -> None:
    """Best effort: tell the cloud (retained) why this device stopped."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        text = "interrupted"
    try:
        _publish_status(link, Status(role="edge", device=device, run=run, state="error",
                                     message=text[:500]))
    except Exception:  # noqa: BLE001 -- the original error matters more
        log.warning("could not publish the error status", exc_info=log.isEnabledFor(10))


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
