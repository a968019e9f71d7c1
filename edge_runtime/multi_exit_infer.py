"""Early-exit inference on a personalised multi-exit network (no cloud, batch 1).

A sample runs one segment at a time (``personal_seg<k>.pte``: the backbone
stages since the previous exit, then exit ``k``) and leaves at the first exit
whose softmax confidence reaches its calibrated threshold
(``edge_runtime.calibrate.ExitPolicy``); the terminal exit answers the rest.
The work after the exit is never done, which is the latency saving. When the
artifacts hold segments baked by ``toolkit bake`` for the same exit weights and
policy (``baked.json``), those run instead: no exit is evaluated that the policy
never lets a sample leave at, and XNNPACK runs the conv exit heads too. Baking
(torch.export and lowering) is build-side work and never runs on the board. The
original network (``personal_full.pte``, backbone only) can be timed on the
same samples for comparison (``compare_full``).

Old single-exit artifacts never get here: ``edge-runtime infer`` dispatches on
the artifacts' manifest (``personal.json``) and keeps its hierarchical path.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from edge_runtime.calibrate import ExitPolicy
from edge_runtime.config import BACKENDS
from edge_runtime.personalise import load_personal_split
from edge_runtime.progress import progress_bar
from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.artifacts.personal import (
    FULL_PTE,
    bake_hint,
    choose_exits,
    exit_state_digest,
    find_baked,
)
from toolkit.core.errors import HiertrainError
from toolkit.core.models.personal import exit_state, load_exit_state, load_personal_net

log = logging.getLogger("edge_runtime")


@dataclass
class MultiExitConfig:
    artifacts: str | Path
    weights: str | Path | None = None  # personalise --out dir or exits.pt; None: initial exits
    data: str | None = None
    classes: tuple[int, ...] | None = None
    shift: str = "none"
    split: str = "test"
    limit: int | None = 200
    threshold: float | None = None  # overrides the calibrated policy: one threshold for all
    backend: str = "executorch"
    compare_full: bool = False
    # executorch: the segments 'toolkit bake' baked for these weights and this policy;
    # None: when there are such segments, True: required, False: the shipped segments
    bake: bool | None = None
    seed: int = 0
    quiet: bool = False
    report: str | Path | None = None


class MultiExitEngine:
    """``run(x[1]) -> (chain position, logits)`` under an exit policy.

    ``executorch`` runs either the shipped segment programs (exit weights as inputs,
    every exit up to the terminal evaluated) or the policy's own segments with the
    exit weights as constants, lowered by ``toolkit bake``
    (:func:`toolkit.build.personal_export.bake_personal`): exits whose threshold is
    ``None`` are skipped, their stages merged into the next segment, and XNNPACK takes
    conv exit heads too. ``bake=None`` uses baked segments when the artifacts hold some
    for these exit weights and exit positions, ``True`` requires them (a one-line error
    naming ``toolkit bake`` if there are none), ``False`` runs the shipped ones. The
    ``torch`` backend always runs the policy's segments (the skipped exits are never
    computed), which is what the baked programs compute.
    """

    def __init__(self, manifest: Manifest, backend: str, state: dict[str, torch.Tensor] | None,
                 policy: ExitPolicy, *, bake: bool | None = None):
        if backend not in BACKENDS:
            raise HiertrainError(f"unknown backend {backend!r}; choose one of: "
                                 f"{', '.join(BACKENDS)}")
        self.backend, self.policy = backend, policy
        self.net = load_personal_net(manifest)
        if state is not None:
            load_exit_state(self.net, state, "the exit weights")
        self.net.eval()
        chain = policy.chain()
        terminal = chain[-1]
        # the exits a sample can leave at: a threshold, or the terminal
        self.keep = policy.keep()
        baked = None
        if backend == "executorch" and bake is not False:
            baked, why = find_baked(manifest, exit_state_digest(exit_state(self.net)), self.keep)
            if baked is None and bake:
                raise HiertrainError(f"no baked segments to use: {why}; {bake_hint(manifest.root)}")
            if baked is None:
                log.info("running the shipped segments (%s)", why)
        self.baked = baked is not None
        shipped = backend == "executorch" and not self.baked
        # shipped programs evaluate every exit up to the terminal; the rest skip null ones
        self.route = chain if shipped else self.keep
        self.route_thresholds = [policy.thresholds[k] if k != terminal else None
                                 for k in self.route]
        self.segments = [s.eval() for s in self.net.policy_segments(self.keep)]
        self.chain = chain
        if backend == "executorch":
            from toolkit.core.et_program import InferenceProgram

            if baked is not None:
                self.programs = [InferenceProgram.from_file(f) for f in baked.files]
                self.weights = [[] for _ in self.programs]
            else:
                full = exit_state(self.net)
                self.programs, self.weights = [], []
                for seg in manifest.data["programs"]["segments"][: terminal + 1]:
                    self.programs.append(
                        InferenceProgram.from_file(manifest.path(seg["file"])))
                    prefix = f"net.exits.{seg['exit']}." if seg["exit"] else ""
                    self.weights.append([full[prefix + n.removeprefix("exit.")].contiguous()
                                         for n in seg["weights"]])
            self.full_program = InferenceProgram.from_file(manifest.path(FULL_PTE))
        self.warm_up(tuple(manifest.data["spec"]["input_shape"]))

    @torch.no_grad()
    def warm_up(self, input_shape: tuple[int, ...]) -> None:
        """Run every segment and the full network once: a program's first call packs the
        XNNPACK weights and allocates, which is loading, not per-sample latency."""
        a = torch.zeros(1, *input_shape)
        for i in range(len(self.route)):
            if self.backend == "executorch":
                outs = self.programs[i].run(a, *self.weights[i])
            else:
                outs = self.segments[i](a)
            a = outs[0]
        self.run_full(torch.zeros(1, *input_shape))

    @torch.no_grad()
    def run(self, x: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Segments in order until an exit is confident enough; the terminal answers the rest."""
        a = x.contiguous()
        last = len(self.route) - 1
        et = self.backend == "executorch"
        for i, k in enumerate(self.route):
            if et:
                outs = self.programs[i].run(a, *self.weights[i])
            else:
                outs = self.segments[i](a)
            logits = outs[-1]
            if i == last:
                return k, logits
            t = self.route_thresholds[i]
            # the same confidence calibration used (edge_runtime.calibrate.route)
            if t is not None and float(torch.softmax(logits.float(), dim=1).max()) >= t:
                return k, logits
            a = outs[0]
        raise AssertionError("the terminal exit always answers")

    @torch.no_grad()
    def run_full(self, x: torch.Tensor) -> torch.Tensor:
        """The original network, as shipped: every stage and the backbone's classifier."""
        if self.backend == "executorch":
            return self.full_program.run(x.contiguous())[0]
        return self.net.backbone(x)


def segment_flops(net, input_shape) -> tuple[list[int], int]:
    """FLOPs (batch 1) of each segment incl. its exit, and of the full backbone."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = []
    a = torch.zeros(1, *input_shape)
    with torch.no_grad():
        for seg in net.segments():
            counter = FlopCounterMode(display=False)
            with counter:
                a, _ = seg.eval()(a)
            flops.append(int(counter.get_total_flops()))
        counter = FlopCounterMode(display=False)
        with counter:
            net.backbone(torch.zeros(1, *input_shape))
    return flops, int(counter.get_total_flops())


def run_multi_exit_inference(cfg: MultiExitConfig) -> dict[str, Any]:
    choice = choose_exits(cfg.artifacts, cfg.weights, cfg.threshold)
    manifest, points, state = choice.manifest, choice.exit_points, choice.state
    policy, source = choice.policy, choice.source
    engine = MultiExitEngine(manifest, cfg.backend, state, policy, bake=cfg.bake)
    ds = load_personal_split(manifest, cfg.data, cfg.split, cfg.classes, cfg.shift, cfg.limit,
                             cfg.seed)
    names = [*points, "final"]
    seg_flops, full_flops = segment_flops(engine.net, tuple(manifest.data["spec"]["input_shape"]))
    per = {names[k]: {"samples": 0, "correct": 0, "latency_s": 0.0} for k in engine.chain}
    full = {"samples": 0, "correct": 0, "latency_s": 0.0}
    flops = 0
    for i in progress_bar(cfg.quiet, range(len(ds)), desc="multi-exit infer", unit="sample"):
        x, label = ds.x[i:i + 1], int(ds.y[i])
        t = time.perf_counter()
        k, logits = engine.run(x)
        dt = time.perf_counter() - t
        e = per[names[k]]
        e["samples"] += 1
        e["correct"] += int(int(logits.argmax()) == label)
        e["latency_s"] += dt
        flops += sum(seg_flops[: k + 1])
        if cfg.compare_full:
            t = time.perf_counter()
            out = engine.run_full(x)
            full["latency_s"] += time.perf_counter() - t
            full["samples"] += 1
            full["correct"] += int(int(out.argmax()) == label)
    n = len(ds)
    total_s = sum(e["latency_s"] for e in per.values())
    result: dict[str, Any] = {
        "data": ds.name, "backend": cfg.backend, "weights": source, "samples": n,
        "baked": engine.baked,
        "accuracy": sum(e["correct"] for e in per.values()) / n,
        "mean_latency_ms": 1000 * total_s / n,
        "mean_depth": sum((names.index(k) + 1) * e["samples"] for k, e in per.items()) / n,
        "mean_flops": flops / n,
        "policy": policy.to_dict(),
        "per_exit": {k: {"samples": e["samples"], "share": e["samples"] / n,
                         "accuracy": e["correct"] / e["samples"] if e["samples"] else None,
                         "mean_latency_ms": (1000 * e["latency_s"] / e["samples"]
                                             if e["samples"] else None)}
                     for k, e in per.items()},
    }
    if cfg.compare_full:
        result["full_network"] = {
            "accuracy": full["correct"] / n, "mean_latency_ms": 1000 * full["latency_s"] / n,
            "flops": full_flops}
        result["latency_ratio"] = full["latency_s"] / total_s if total_s > 0 else None
        result["flops_ratio"] = full_flops / (flops / n)
    if cfg.report:
        path = Path(cfg.report)
        path.parent.mkdir(parents=True, exist_ok=True)
        cfg_d = {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()}
        path.write_text(json.dumps({**result, "config": cfg_d}, indent=2) + "\n")
    return result


def format_result(r: dict[str, Any]) -> str:
    lines = [f"early-exit inference on {r['data']}: {r['backend']} backend, "
             f"weights: {r['weights']}",
             f"  {'exit':<10} {'samples':>8} {'accuracy':>9} {'mean latency':>13}"]
    for name, e in r["per_exit"].items():
        acc = "-" if e["accuracy"] is None else f"{e['accuracy']:.3f}"
        ms = "-" if e["mean_latency_ms"] is None else f"{e['mean_latency_ms']:.3f}"
        lines.append(f"  {name:<10} {e['samples']:>8} {acc:>9} {ms:>10} ms")
    lines.append(f"  {'overall':<10} {r['samples']:>8} {r['accuracy']:>9.3f} "
                 f"{r['mean_latency_ms']:>10.3f} ms  (mean depth {r['mean_depth']:.2f})")
    if "full_network" in r:
        f = r["full_network"]
        lines.append(f"  {'full net':<10} {r['samples']:>8} {f['accuracy']:>9.3f} "
                     f"{f['mean_latency_ms']:>10.3f} ms  (latency ratio {r['latency_ratio']:.2f}x,"
                     f" FLOPs ratio {r['flops_ratio']:.2f}x)")
    return "\n".join(lines)
