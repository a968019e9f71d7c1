"""Edge training: local SGD on the edge segment + exit head, cut activations to the cloud.

Per batch: one backend step (ExecuTorch program or eager torch), the cut
activation coded with the manifest's codec, or ``--codec`` (``toolkit.codec``:
quantized with the manifest's scheme at the codec's bits, packed, maybe
deflated), encoded with its labels (``toolkit.wire``) and handed to the
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

``--mode split`` and ``--mode cloud`` (the baselines, ``toolkit.modes``) share
the setup, the status protocol and the report here and run their own loops:
``edge_runtime.split_learning`` and ``edge_runtime.upload``. Every report has
``mode``, ``samples``, ``bytes_up``, ``bytes_down``, ``wall_s``, ``exit_accuracy``
and ``full_accuracy`` (None on the edge: the cloud trainer measures it).

The final edge weights are also saved locally, ``<state_dir>/edge_weights-<device>.pt``
(``torch.save`` of the state dict; ``state_dir`` defaults to the current
directory), for ``edge-runtime infer --weights PATH`` and for resuming.
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
from toolkit.codec import Codec, encode_activation, parse_codec
from toolkit.data import Dataset, batches, load_dataset, normalize, shard
from toolkit.errors import HiertrainError
from toolkit.manifest import Manifest, load_manifest
from toolkit.messages import Status, encode_weights
from toolkit.modes import check_mode
from toolkit.quant import QuantScheme
from toolkit.security import redact
from toolkit.topics import act_topic, status_topic, validate_id, weights_topic
from toolkit.transport import Link, LinkShape, drain_s, link_summary

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


def _train_loop(cfg: TrainConfig, manifest: Manifest, codec: Codec, scheme: QuantScheme,
                ds: Dataset, backend, link: Link, run: str, device: str) -> dict[str, Any]:
    bs = manifest.batch_size
    per_epoch = len(ds) // bs
    topic = act_topic(run, device)
    seq = 0
    samples = 0
    train_s = 0.0
    history: list[dict[str, Any]] = []
    exit_acc = 0.0
    publisher = Publisher(link, maxsize=cfg.outbox)
    start = time.monotonic()
    try:
        last_batch_unix: float | None = None
        for epoch in range(cfg.epochs):
            t_epoch = time.monotonic()
            act_bytes_before = publisher.stats.by_kind.get("act")
            act_bytes_before = act_bytes_before.bytes if act_bytes_before else 0
            correct = 0
            seen = 0
            loss_sum = 0.0
            bar = tqdm(total=per_epoch, desc=f"{device} epoch {epoch + 1}/{cfg.epochs}",
                       unit="batch", disable=cfg.quiet, file=sys.stderr, leave=True)
            with bar:
                for i, (x, y) in enumerate(batches(ds, bs, epoch=epoch, seed=cfg.seed)):
                    t = time.monotonic()
                    res = backend.step(x, y)
                    train_s += time.monotonic() - t
                    msg = encode_activation(run, device, seq, epoch, i, res.cut, y, codec,
                                            scheme)
                    publisher.submit(topic, msg, kind="act")
                    seq += 1
                    samples += len(y)
                    seen += len(y)
                    correct += int((res.exit_logits.argmax(dim=1) == y).sum())
                    loss_sum += res.loss
                    last_batch_unix = time.time()  # toolkit bench: end of training
                    bar.update(1)
                    if i % 10 == 0 or i == per_epoch - 1:
                        sent = publisher.stats.by_kind.get("act")
                        rate = ((sent.bytes if sent else 0) - act_bytes_before) / 1024 / max(
                            time.monotonic() - t_epoch, 1e-6)
                        bar.set_postfix(loss=f"{res.loss:.3f}", exit_acc=f"{correct / seen:.3f}",
                                        KBps=f"{rate:.0f}", refresh=False)
            exit_acc = correct / max(seen, 1)
            history.append({"epoch": epoch, "batches": per_epoch, "loss": loss_sum / per_epoch,
                            "exit_accuracy": exit_acc,
                            "seconds": round(time.monotonic() - t_epoch, 3)})
            publish_epoch_weights(publisher, backend, run, device, epoch, seq)
            status = Status(role="edge", device=device, run=run, state="training", epoch=epoch,
                            batches_published=seq, samples_published=samples, last_seq=seq - 1,
                            exit_accuracy=exit_acc)
            publisher.submit(status_topic(run, device), status.encode(), retain=True,
                             kind="status")
            log.info("epoch %d/%d: loss %.4f, exit accuracy %.3f", epoch + 1, cfg.epochs,
                     history[-1]["loss"], exit_acc)
        flush_outbox(publisher, link)
    finally:
        publisher.close()
    wall_s = time.monotonic() - start
    stats = publisher.stats
    act = stats.by_kind.get("act")
    act_bytes = act.bytes if act else 0

    path = weights_path(cfg.state_dir, device)
    torch.save(backend.state_dict(), path)

    extra = {"wall_s": round(wall_s, 3), "bytes_sent": link.bytes_sent,
             "publish_wait_s": round(stats.publish_wait_s, 4), "train_s": round(train_s, 3),
             "backend": backend.name, "epochs": cfg.epochs, "mode": "ht",
             "codec": codec.name}
    publish_done(link, run, device, epochs=cfg.epochs, seq=seq, samples=samples,
                 exit_accuracy=exit_acc, extra=extra)
    return {
        "device": device,
        "run": run,
        "epochs": cfg.epochs,
        "batches_published": seq,
        "samples_published": samples,
        "exit_accuracy": exit_acc,
        "bytes_sent": link.bytes_sent,
        "act_bytes_sent": act_bytes,
        "payload_bytes_per_sample": act_bytes / max(samples, 1),
        "float32_bytes_per_sample": manifest.data["cut"]["float32_bytes_per_sample"],
        "wall_s": wall_s,
        "last_batch_unix": last_batch_unix,
        "train_s": train_s,
        "publish_wait_s": stats.publish_wait_s,
        "batches_per_s": seq / max(wall_s, 1e-9),
        "backend": backend.name,
        "codec": codec.name,
        "weights_path": str(path),
        "link": link_summary(link),
        "history": history,
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
