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
the setup, the status protocol and the report here and run their own loops, chosen in
``edge_runtime.modes``: ``edge_runtime.ht_loop``, ``edge_runtime.split_learning`` and
``edge_runtime.upload``; what the loops share is in ``edge_runtime.session``. Every report has
``mode``, ``samples``, ``bytes_up``, ``bytes_down``, ``wall_s``, ``exit_accuracy``
and ``full_accuracy`` (None on the edge: the cloud trainer measures it).

The final edge weights are also saved locally, ``<state_dir>/edge_weights-<device>.pt``
(``torch.save`` of the state dict; ``state_dir`` defaults to the current
directory), for ``edge-runtime infer --weights PATH``.

Delivery and resume (``ht``; docs/delivery.md): the publisher's outbox is an on-disk
:class:`~edge_runtime.spool.Spool` that keeps each batch until the cloud trainer's ack on
``hiertrain/<run>/<device>/ack`` says it is trained and checkpointed; the loop checkpoints
itself (``edge_runtime.resume``) every ``checkpoint_every`` batches, and ``--resume``
continues from there. After "done", the edge waits up to ``confirm_timeout`` s until the
cloud acked every batch in its spool (``edge_runtime.confirm``); batches still unconfirmed
then end the run with :class:`RunIncompleteError` (exit code 5), after the report is
written, the spool kept for ``--resume``.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edge_runtime.backends import EdgeBackend, make_backend
from edge_runtime.board import check_batch
from edge_runtime.config import TrainConfig
from edge_runtime.fleet_average import check_options as check_fleet_average
from edge_runtime.link import connect_edge
from edge_runtime.modes import mode_loop
from edge_runtime.session import (
    flush_outbox,
    link_totals,
    lr_schedule,
    publish_done,
    publish_status,
    report_failure,
    schedule_extra,
    weights_path,
)
from toolkit.core.artifacts.boards import load_board
from toolkit.core.artifacts.manifest import Manifest, load_manifest
from toolkit.core.data.datasets import Dataset, is_image_folder, load_dataset, normalize, shard
from toolkit.core.data.live import LiveConfig, LiveFolder
from toolkit.core.data.skew import LabelSkew, skewed_shard
from toolkit.core.data.source import InMemory, TrainingData
from toolkit.core.data.stream import Decode, FolderStream
from toolkit.core.errors import HiertrainError, RunIncompleteError
from toolkit.core.lr_schedule import LrSchedule
from toolkit.core.protocol.codec import parse_codec
from toolkit.core.protocol.messages import Status
from toolkit.core.protocol.modes import check_mode
from toolkit.core.protocol.quant import QuantScheme
from toolkit.core.protocol.topics import validate_id
from toolkit.core.security import redact
from toolkit.core.transport import LinkShape

log = logging.getLogger("edge_runtime")

# flush_outbox, publish_done and weights_path moved to edge_runtime.session; still importable
__all__ = ["TrainConfig", "flush_outbox", "load_training_data", "open_training_data",
           "parse_shard", "publish_done", "resolve_backend", "run_training", "weights_path"]


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
    normalized: bool = True, skew: str | None = None,
) -> Dataset:
    """This device's shard of the train split, normalised as the model was exported
    (``normalized=False``: the loader's ``[0, 1]`` images, which ``--mode cloud`` uploads);
    ``skew``: a label-skewed shard (``toolkit.core.data.skew``, ``--shard-skew``)."""
    index, count = parse_shard(shard_spec)
    label_skew = LabelSkew.parse(skew) if skew else None
    ds = load_dataset(source, "train", input_shape=manifest.input_shape, limit=limit, seed=seed)
    if label_skew is not None:
        ds = skewed_shard(ds, index, count, label_skew)
    elif count > 1:
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


def open_training_data(manifest: Manifest, cfg: TrainConfig, *, normalized: bool = True
                       ) -> TrainingData:
    """This device's shard of the train split as the loops iterate it: an image folder is
    streamed from disk (``toolkit.core.data.stream``, docs/data.md), any other source is
    loaded whole (:func:`load_training_data`)."""
    if cfg.live:
        return _open_live(manifest, cfg, normalized)
    if not is_image_folder(cfg.data):
        return InMemory(load_training_data(manifest, cfg.data, cfg.shard, limit=cfg.limit,
                                           seed=cfg.seed, normalized=normalized,
                                           skew=cfg.shard_skew),
                        cfg.augment, normalized=normalized)
    if cfg.shard_skew:
        raise HiertrainError("--shard-skew splits data sets loaded whole (digits, .npz, CIFAR "
                             "batches), not streamed image folders; drop it")
    norm = manifest.data["model"]["normalization"] if normalized else {}
    data = FolderStream(cfg.data, input_shape=manifest.input_shape, mean=norm.get("mean"),
                        std=norm.get("std"), augment=cfg.augment, limit=cfg.limit,
                        seed=cfg.seed, shard=parse_shard(cfg.shard), workers=cfg.workers)
    if data.max_label() >= manifest.num_classes:
        raise HiertrainError(
            f"{data.name} has labels up to {data.max_label()} but the artifacts were exported "
            f"for {manifest.num_classes} classes; re-export with --num-classes "
            f"{data.max_label() + 1}")
    if len(data) < manifest.batch_size:
        raise HiertrainError(
            f"{data.name} has {len(data)} training samples on this device, fewer than one batch "
            f"of {manifest.batch_size}; use more data, fewer shards or a smaller exported batch")
    return data


def _open_live(manifest: Manifest, cfg: TrainConfig, normalized: bool) -> TrainingData:
    if not cfg.data:
        raise HiertrainError("--live needs --data DIR, the directory the frames arrive in")
    if cfg.resume:
        raise HiertrainError("--live trains on frames as they arrive and cannot --resume; "
                             "drop --resume")
    if cfg.shard != "0/1" or cfg.limit is not None or cfg.shard_skew:
        raise HiertrainError("--shard, --shard-skew and --limit do not apply to --live; drop "
                             "them")
    c, h, w = manifest.input_shape
    if c not in (1, 3):
        raise HiertrainError(f"the model expects {c} input channels; frames give 1 or 3")
    norm = manifest.data["model"]["normalization"] if normalized else {}
    decode = Decode("L" if c == 1 else "RGB", (h, w), norm.get("mean"), norm.get("std"),
                    cfg.augment)
    return LiveFolder(cfg.data, decode, LiveConfig(labels=cfg.labels, replay=cfg.replay,
                                                   idle_timeout=cfg.idle_timeout),
                      num_classes=manifest.num_classes, seed=cfg.seed)


def run_training(cfg: TrainConfig, backend: EdgeBackend | None = None) -> dict[str, Any]:
    """Train, publish, report; returns the summary dict (also written to ``cfg.report``).

    ``backend`` replaces the one ``cfg.backend`` names (``edge-runtime cluster`` passes its
    tiled cluster step)."""
    t0 = time.monotonic()
    run = validate_id(cfg.run_id, "run id")
    device = validate_id(cfg.device_id, "device id")
    if cfg.epochs < 1:
        raise HiertrainError(f"epochs must be >= 1, got {cfg.epochs}")
    LrSchedule(cfg.lr_schedule)  # an unknown name fails here, before any loading
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
    profile = load_board(cfg.board) if cfg.board else None
    manifest = load_manifest(cfg.artifacts)  # verifies every artifact's sha256
    if manifest.privacy.kind != "none" and mode != "ht":
        raise HiertrainError(
            f"these artifacts were exported with --privacy {manifest.privacy.spec()}, which "
            f"applies to --mode ht only: --mode {mode} would send the cut (split) or the "
            "images (cloud) without it; use --mode ht or export with --privacy none")
    if profile is not None and (warning := check_batch(profile, manifest.batch_size)):
        log.warning("%s", warning)
    codec = parse_codec(cfg.codec or manifest.codec_name)
    scheme = QuantScheme.from_dict(manifest.data["quantization"])
    if cfg.max_batches is not None and cfg.max_batches < 1:
        raise HiertrainError(f"--max-batches must be >= 1, got {cfg.max_batches}")
    if cfg.live and mode != "ht":
        raise HiertrainError(f"--live applies to --mode ht only, not {mode}; drop it")
    if cfg.live and cfg.epochs != 1:
        raise HiertrainError("--live trains one open-ended pass over the frames as they come; "
                             "drop --epochs (it ends after --idle-timeout or --max-batches)")
    if cfg.max_batches is not None and mode != "ht":
        raise HiertrainError(f"--max-batches applies to --mode ht only, not {mode}; drop it")
    if cfg.live and cfg.lr_schedule != "constant":
        raise HiertrainError(f"--lr-schedule {cfg.lr_schedule} needs a known number of batches; "
                             "a --live source has none: drop --lr-schedule")
    check_fleet_average(cfg.fleet_average, cfg.fleet_average_wait, mode=mode, live=cfg.live)
    ds = open_training_data(manifest, cfg, normalized=mode != "cloud")
    schedule = lr_schedule(cfg, 0 if cfg.live else len(ds), manifest.batch_size)
    if backend is None and backend_name:
        backend = make_backend(backend_name, manifest)
    log.info("device %s: %d samples of %s, mode %s, %s backend, batch %d", device, len(ds),
             ds.name, mode, backend.name if backend else "no", manifest.batch_size)

    link = connect_edge(cfg.broker, run, device, role="edge", timeout=cfg.connect_timeout,
                        will=True, shape=shape, security=cfg.security)
    try:
        publish_status(link, Status(role="edge", device=device, run=run, state="online",
                                     extra={"backend": backend.name if backend else "none",
                                            "samples": len(ds), "mode": mode,
                                            **schedule_extra(schedule)}))
        setup_s = time.monotonic() - t0
        started_unix = time.time()
        summary = mode_loop(mode)(cfg, manifest, codec, scheme, ds, backend, link, run,
                                   device)
        summary["setup_s"] = round(setup_s, 3)
        summary["data"] = ds.describe()  # streamed or in memory, workers, augmentation
        summary["machine"] = platform.machine()  # the board's architecture, e.g. aarch64
        # Wall-clock stamps (not monotonic): toolkit bench lines them up with the
        # cloud trainer's on the same machine to time a whole run.
        summary["started_unix"] = started_unix
        summary["finished_unix"] = time.time()
        summary = {"mode": mode, **summary, **link_totals(summary, link)}
    except BaseException as exc:
        report_failure(link, run, device, exc)
        link.close()
        raise
    link.close()
    if cfg.report:
        path = Path(cfg.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        config = redact(_jsonable(asdict(cfg)))
        path.write_text(json.dumps({**summary, "config": config}, indent=2) + "\n")
    why = (summary.get("delivery") or {}).get("incomplete")
    if why:  # batches the cloud has not confirmed: not a success (docs/delivery.md)
        incomplete = RunIncompleteError(why)
        incomplete.summary = summary  # type: ignore[attr-defined]  # for --json
        raise incomplete
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


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}
