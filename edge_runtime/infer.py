"""Hierarchical inference: answer at the edge's exit when confident, else ask the cloud.

Each test sample (batch 1) runs through the edge segment and exit head. If the
exit's softmax confidence reaches ``threshold`` the edge answers on its own;
otherwise it sends the quantized cut activation as an inference request
(``toolkit.core.protocol.wire``, no labels) with an MQTT 5 response topic and correlation data,
and waits, bounded by ``timeout``, for the cloud's reply. A request the cloud
does not answer in time (or answers with an error) is answered by the exit head
after all, counted as a "fallback" and in ``cloud_timeouts`` (``cloud_errors``);
three timeouts in a row abort the run, since the cloud is evidently not serving.
``exit_rate`` counts only confident exits.

Weights (``InferConfig.weights``): ``None`` uses the manifest's initial weights,
a path loads a file written by ``edge-runtime train`` (``edge_weights-<device>.pt``),
and ``"retained"`` takes the device's retained weights message from the broker.

Classes (``toolkit.core.classes``): a head provisioned ahead for classes that have not
arrived yet never predicts them. Training records the classes its labels covered, beside
a weights file (``edge_weights-<device>.classes.json``) and in the retained weights'
metadata; the exit's logits of every other class are masked before the softmax, so the
confidence is over the seen classes too. Initial weights, or weights without that record,
are not masked.
"""

from __future__ import annotations

import json
import logging
import queue
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from edge_runtime.config import BACKENDS, InferConfig
from edge_runtime.host_state import check_state, initial_state
from edge_runtime.link import connect_edge
from edge_runtime.progress import progress_bar
from toolkit.core.artifacts.manifest import Manifest, load_manifest
from toolkit.core.artifacts.safeload import load_weights
from toolkit.core.classes import SeenClasses, classes_path, load_seen, mask_unseen
from toolkit.core.data.datasets import load_dataset, normalize
from toolkit.core.errors import HiertrainError, RunIncompleteError, WireError
from toolkit.core.privacy import cut_transform
from toolkit.core.protocol.codec import BatchMeta, codec_for
from toolkit.core.protocol.messages import decode_infer_reply, decode_weights
from toolkit.core.protocol.quant import QuantScheme
from toolkit.core.protocol.topics import (
    infer_reply_topic,
    infer_request_topic,
    validate_id,
    weights_topic,
)
from toolkit.core.security import redact
from toolkit.core.transport import Link, LinkShape, link_summary

log = logging.getLogger("edge_runtime")

EDGE_INFER = "edge_infer.pte"
MAX_CONSECUTIVE_TIMEOUTS = 3
RETAINED = "retained"

__all__ = ["InferConfig", "InferEngine", "fetch_retained_weights", "format_table",
           "run_inference"]


class InferEngine:
    """``run(x[1, C, H, W]) -> (cut, exit_logits)`` with given edge weights.

    On ``executorch`` no PyTorch model is built: the program takes the weights as inputs,
    by the names the manifest lists (``edge_runtime.host_state`` says why).
    """

    def __init__(self, backend: str, manifest: Manifest, state: Mapping[str, torch.Tensor],
                 *, seen: SeenClasses | None = None):
        if backend not in BACKENDS:
            raise HiertrainError(
                f"unknown backend {backend!r}; choose one of: {', '.join(BACKENDS)}"
            )
        check_state(initial_state(manifest), state, f"the edge state for {manifest.root}")
        self.backend = backend
        self.mask = seen.mask() if seen is not None else None  # None: every class
        if backend == "executorch":
            from toolkit.core.et_program import InferenceProgram

            self.program = InferenceProgram.from_file(manifest.path(EDGE_INFER))
            names = manifest.data["programs"]["edge_infer"]["weights"]
            self.weights = [state[n].detach().to(torch.float32).contiguous() for n in names]
        else:
            from toolkit.core.models.segments import load_segments  # eager model: torch only

            built = load_segments(manifest)
            built.step.load_state_dict(dict(state))
            self.module = built.infer_module().eval()

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cut and the exit's logits, unseen classes at ``-inf``."""
        if self.backend == "executorch":
            cut, logits = self.program.run(x.contiguous(), *self.weights)[:2]
        else:
            cut, logits = self.module(x)
        return cut, mask_unseen(logits, self.mask)


def _load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise HiertrainError(
            f"weights file {path} does not exist; pass the edge_weights-<device>.pt that "
            "'edge-runtime train' wrote, or --weights retained"
        )
    state = load_weights(path, "weights file")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HiertrainError(f"weights file {path} is not a state dict of tensors")
    return state


def fetch_retained_weights(link: Link, run: str, device: str, timeout: float
                           ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The device's retained weights message, waited for at most ``timeout`` s."""
    inbox: queue.Queue[bytes] = queue.Queue()
    topic = weights_topic(run, device)
    link.subscribe(topic, lambda _t, payload, _p: inbox.put(payload))
    try:
        payload = inbox.get(timeout=timeout)
    except queue.Empty:
        raise HiertrainError(
            f"no retained weights on {topic} at {link.address.url} within {timeout:.0f} s; "
            "train this device first or pass --weights PATH"
        ) from None
    try:
        return decode_weights(payload)
    except WireError as exc:
        raise HiertrainError(f"the retained weights on {topic} are unreadable: {exc}") from None


@dataclass
class _Tally:
    n: int = 0
    correct: int = 0
    latency_s: float = 0.0

    def add(self, ok: bool, latency: float) -> None:
        self.n += 1
        self.correct += int(ok)
        self.latency_s += latency

    def accuracy(self) -> float | None:
        return self.correct / self.n if self.n else None

    def latency_ms(self) -> float | None:
        return 1000 * self.latency_s / self.n if self.n else None


def run_inference(cfg: InferConfig) -> dict[str, Any]:
    """Run hierarchical inference on the test split; returns the result dict."""
    run = validate_id(cfg.run_id, "run id")
    device = validate_id(cfg.device_id, "device id")
    if not 0.0 <= cfg.threshold <= 1.0:
        raise HiertrainError(f"threshold must be in [0, 1], got {cfg.threshold}")
    if cfg.timeout <= 0:
        raise HiertrainError(f"timeout must be > 0 seconds, got {cfg.timeout}")
    shape = LinkShape.from_options(cfg.link_kbps, cfg.link_latency_ms)
    manifest = load_manifest(cfg.artifacts)
    scheme = QuantScheme.from_dict(manifest.data["quantization"])
    ds = load_dataset(cfg.data, "test", input_shape=manifest.input_shape, limit=cfg.limit,
                      seed=cfg.seed)
    norm = manifest.data["model"]["normalization"]
    x_all = normalize(ds.x, norm["mean"], norm["std"])

    meta: dict[str, Any] = {"source": "initial"}
    state: dict[str, torch.Tensor] | None = None
    seen: SeenClasses | None = None
    if cfg.weights is None:
        state = initial_state(manifest)
    elif str(cfg.weights) != RETAINED:
        state = _load_weights_file(Path(cfg.weights))
        meta = {"source": str(cfg.weights)}
        seen = load_seen(classes_path(cfg.weights), manifest.num_classes)

    link = connect_edge(cfg.broker, run, device, role="infer", timeout=cfg.connect_timeout,
                        will=False, shape=shape, security=cfg.security)
    try:
        if state is None:
            wmeta, state = fetch_retained_weights(link, run, device, cfg.timeout)
            meta = {"source": RETAINED, **wmeta}
            if wmeta.get("seen_classes") is not None:
                seen = SeenClasses(manifest.num_classes, wmeta["seen_classes"])
        engine = InferEngine(cfg.backend, manifest, state, seen=seen)
        result = _serve(cfg, link, engine, scheme, x_all, ds.y, run, device,
                            protect=cut_transform(manifest.privacy))
    finally:
        link.close()
    result.update({"weights": meta, "data": ds.name, "backend": cfg.backend,
                   "seen_classes": seen.sorted() if seen is not None else None,
                   "threshold": cfg.threshold, "device": device, "run": run,
                   "link": link_summary(link)})
    if cfg.report:
        path = Path(cfg.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg_d = redact({k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()})
        path.write_text(json.dumps({**result, "config": cfg_d}, indent=2) + "\n")
    return result


def _serve(cfg: InferConfig, link: Link, engine: InferEngine, scheme: QuantScheme,
           x_all: torch.Tensor, y_all: torch.Tensor, run: str, device: str, *,
           protect: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    replies: queue.Queue[tuple[bytes | None, bytes]] = queue.Queue()
    reply_topic = infer_reply_topic(run, device)
    request_topic = infer_request_topic(run, device)
    link.subscribe(reply_topic,
                   lambda _t, payload, props: replies.put((props.get("correlation_data"), payload)))
    local, cloud, fallback = _Tally(), _Tally(), _Tally()
    timeouts = consecutive = cloud_errors = 0
    for i in progress_bar(cfg.quiet, range(len(y_all)), desc=f"{device} infer",
                          unit="sample"):
        t = time.monotonic()
        x, label = x_all[i : i + 1], int(y_all[i])
        cut, logits = engine.run(x)
        probs = torch.softmax(logits.float(), dim=1)[0]
        conf, pred = float(probs.max()), int(probs.argmax())
        if conf >= cfg.threshold:
            local.add(pred == label, time.monotonic() - t)
            continue
        corr = secrets.token_bytes(16)
        # the export's defence applies to a cut sent for an answer as to one sent for training
        msg = codec_for(scheme).encode(protect(cut), None, BatchMeta(run, device, i, 0, i),
                                       base=scheme)
        link.publish(request_topic, msg, qos=1,
                     properties={"response_topic": reply_topic, "correlation_data": corr},
                     timeout=cfg.timeout)
        answer = _await_reply(replies, corr, t + cfg.timeout)
        if answer is None:
            timeouts += 1
            consecutive += 1
            if consecutive >= MAX_CONSECUTIVE_TIMEOUTS:
                raise RunIncompleteError(
                    f"the cloud did not answer {consecutive} inference requests in a row on "
                    f"{request_topic} within {cfg.timeout:.0f} s each; is a cloud trainer "
                    f"serving run {run!r} on {link.address.url}?"
                )
            fallback.add(pred == label, time.monotonic() - t)  # the exit's answer after all
            continue
        consecutive = 0
        if answer.get("error") or not answer.get("pred"):
            cloud_errors += 1
            fallback.add(pred == label, time.monotonic() - t)
            continue
        cloud.add(int(answer["pred"][0]) == label, time.monotonic() - t)
    n = local.n + cloud.n + fallback.n
    return {
        "samples": n,
        "answered_locally": local.n,
        "answered_by_cloud": cloud.n,
        "answered_by_fallback": fallback.n,
        "exit_rate": local.n / n if n else 0.0,
        "local_accuracy": local.accuracy(),
        "cloud_accuracy": cloud.accuracy(),
        "fallback_accuracy": fallback.accuracy(),
        "accuracy": (local.correct + cloud.correct + fallback.correct) / n if n else None,
        "local_latency_ms": local.latency_ms(),
        "cloud_latency_ms": cloud.latency_ms(),
        "overall_latency_ms": (1000 * (local.latency_s + cloud.latency_s + fallback.latency_s) / n
                               if n else None),
        "cloud_timeouts": timeouts,
        "cloud_errors": cloud_errors,
    }


def _await_reply(replies: queue.Queue, corr: bytes, deadline: float) -> dict[str, Any] | None:
    """The reply carrying ``corr``; late replies to earlier requests are dropped."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            got, payload = replies.get(timeout=left)
        except queue.Empty:
            return None
        if got != corr:
            continue
        try:
            return decode_infer_reply(payload)
        except WireError as exc:
            return {"error": str(exc)}


def format_table(r: dict[str, Any]) -> str:
    """The result as a few aligned lines for a terminal."""
    def f(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    n = r["samples"]
    overall_ms = r.get("overall_latency_ms")
    rows = [
        ("edge exit", r["answered_locally"], r["local_accuracy"], r["local_latency_ms"]),
        ("cloud", r["answered_by_cloud"], r["cloud_accuracy"], r["cloud_latency_ms"]),
    ]
    if r["answered_by_fallback"]:
        rows.append(("fallback", r["answered_by_fallback"], r["fallback_accuracy"], None))
    rows.append(("overall", n, r["accuracy"], overall_ms))
    lines = [f"hierarchical inference on {r.get('data', '?')}: threshold {r['threshold']:.2f}, "
             f"{r['backend']} backend, weights: {r['weights'].get('source')}",
             f"  {'answered by':<11} {'samples':>8} {'accuracy':>9} {'mean latency':>13}"]
    for name, k, acc, ms in rows:
        lines.append(f"  {name:<11} {k:>8} {f(acc, '.3f'):>9} {f(ms, '.2f'):>10} ms")
    lines.append(f"  exit rate {r['exit_rate']:.3f}; cloud timeouts {r['cloud_timeouts']}, "
                 f"cloud errors {r['cloud_errors']} (those fall back to the exit)")
    return "\n".join(lines)
