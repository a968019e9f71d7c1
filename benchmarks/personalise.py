"""Benchmark: on-device early-exit personalisation (PersEPhonEE) on CIFAR-10 (JPEG copy).

General data: the CIFAR-10 training set, all ten classes, clean. A backbone (``--model``:
smallcnn, vgg16 or resnet18) is pretrained on it eagerly (SGD, one-cycle, flips and shifts;
``--pretrain-*``, one thread) -- the network a robot ships with -- or reused from
``--backbone-cache`` (a file outside the repository; pretrained there when missing).

Personal distribution: four classes (``--classes``, default cat, deer, dog, horse) seen through a
fixed warm, low-contrast camera tint (``toolkit.core.data.personal``). The robot's local stream is
``--stream`` training images of those classes, ``--labelled`` of them labelled; 20 % of the
local data is held out for calibration; figures are measured on the CIFAR-10 *test* images of
those classes under the same tint.

Measured (written to ``--out``, printed beside the paper's figures):

* ``accuracy_before``: the shipped network on the personal test set;
  ``accuracy_after``: the personalised early-exit network (thresholds calibrated for the deepest
  exit's held-out accuracy), same test set.
* ``train_cost_ratio``: one SGD step of whole-network fine-tuning / one step of exit-only
  personalisation (same batch, same loss, eager PyTorch, median step time); FLOPs ratio beside it.
* ``latency_ratio``: per-sample latency at batch 1 of the original network
  (``personal_full.pte``) / early-exit inference (the policy's segments lowered with the exit
  weights baked in by ``toolkit bake``, into the artifacts directory), both through ExecuTorch
  with the same XNNPACK thread pool (``--et-threads``), interleaved per sample, with thresholds
  calibrated for the original network's held-out accuracy (equal accuracy); the shipped segment
  programs and eager PyTorch beside it, the FLOPs ratio in ``equal_accuracy``, and the
  personalised policy's latency in ``latency_at_accuracy_after``.

Personalisation runs on the eager ``torch`` backend by default (``--backend``): the same module
the ExecuTorch program was lowered from, parity-tested, and ~70x faster on this CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from edge_runtime.calibrate import calibrate, route
from edge_runtime.multi_exit_infer import MultiExitEngine, segment_flops
from edge_runtime.personalise import (
    PersonalBackend,
    PersonaliseConfig,
    load_personal_split,
    load_state_dir,
    run_personalise,
)
from toolkit.build.export import OptimizerConfig
from toolkit.build.personal_export import (
    BakeConfig,
    PersonalExportConfig,
    bake_personal,
    export_personal,
    train_flops,
)
from toolkit.core.data.datasets import load_dataset, normalize, shared_cifar10
from toolkit.core.data.personal import pretrain
from toolkit.core.models import CIFAR_MEAN, CIFAR_STD
from toolkit.core.models.personal import PersonalTrainStep

PAPER = {"accuracy_gain_points": 15.9, "train_cost_ratio": 2.2, "latency_ratio": [2.2, 3.2]}


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def scores(logits, y):
    probs = [torch.softmax(lg.float(), 1) for lg in logits]
    return (torch.stack([p.max(1).values for p in probs]),
            torch.stack([p.argmax(1) == y for p in probs]))


def step_times(step_fn, n: int) -> float:
    """Median seconds of ``n`` calls after two warm-up calls."""
    for _ in range(2):
        step_fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="CIFAR-10 .npz (default: the shared copy)")
    ap.add_argument("--classes", default="3,4,5,7")
    ap.add_argument("--shift", default="tint")
    ap.add_argument("--model", default="smallcnn",
                    help="backbone (smallcnn, vgg16, resnet18); the bigger ones are where "
                         "compute, not per-call overhead, sets the latency")
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--pretrain-limit", type=int, default=None,
                    help="pretrain on a seeded random subset of this many general images")
    ap.add_argument("--pretrain-batch", type=int, default=128)
    ap.add_argument("--pretrain-lr", type=float, default=0.1)
    ap.add_argument("--pretrain-only", action="store_true",
                    help="pretrain (or find) the backbone cache and stop")
    ap.add_argument("--backbone-cache", default=None,
                    help="reuse/keep the pretrained backbone here (outside the repository)")
    ap.add_argument("--stream", type=int, default=None,
                    help="local samples incl. held out (default: all training images of the "
                         "personal classes)")
    ap.add_argument("--lr", type=float, default=0.01, help="exit SGD learning rate")
    ap.add_argument("--pseudo-threshold", type=float, default=0.7)
    ap.add_argument("--labelled", type=float, default=0.1)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--exit-channels", type=int, default=0)
    ap.add_argument("--exits", default=None,
                    help="comma-separated stages to attach exits after (default: every stage "
                         "but the classifier)")
    ap.add_argument("--artifacts", default=None,
                    help="reuse an existing 'toolkit export --personalise' directory")
    ap.add_argument("--backend", default="torch",
                    help="backend of the personalisation runs (default torch: the same module "
                         "ExecuTorch runs, parity-tested; 30-90x faster on this CPU)")
    ap.add_argument("--latency-samples", type=int, default=1000)
    ap.add_argument("--eager-latency-samples", type=int, default=None,
                    help="samples for the eager-PyTorch latency (default: --latency-samples)")
    ap.add_argument("--train-timing-steps", type=int, default=40,
                    help="training steps timed per method (median)")
    ap.add_argument("--no-latency-after", dest="latency_after", action="store_false",
                    help="skip timing the personalised policy (only the equal-accuracy one)")
    ap.add_argument("--et-threads", type=int, default=1,
                    help="ExecuTorch (XNNPACK) thread pool size, like torch's one thread")
    ap.add_argument("--et-step-samples", type=int, default=10,
                    help="ExecuTorch training steps timed (portable kernels: slow on big "
                         "backbones)")
    ap.add_argument("--sweep-labelled", default="0,0.02,0.25",
                    help="also personalise (eager backend, same math) with these labelled "
                         "shares and report accuracy after each ('' to skip)")
    ap.add_argument("--out", default="benchmarks/results/personalise.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    et_threads = _set_et_threads(args.et_threads)
    data = args.data or shared_cifar10()
    if data is None:
        print("error: no CIFAR-10 .npz: pass --data or set $HIERTRAIN_CIFAR10", file=sys.stderr)
        return 2
    classes = tuple(int(c) for c in args.classes.split(","))
    work = Path(tempfile.mkdtemp(prefix="personalise-bench-"))

    # 1. the shipped network
    cache = Path(args.backbone_cache) if args.backbone_cache else work / "backbone.pt"
    cache.parent.mkdir(parents=True, exist_ok=True)
    general = load_dataset(data, "train")
    sidecar = cache.with_suffix(".json")  # how the cached backbone was made
    if cache.is_file():
        log(f"reusing the pretrained backbone {cache}")
        pretrain_info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    else:
        pretrain_info = _pretrain(args, data, cache)
        sidecar.write_text(json.dumps(pretrain_info) + "\n")
    if args.pretrain_only:
        return 0

    # 2. export
    art = Path(args.artifacts) if args.artifacts else work / "art"
    t0 = time.monotonic()
    if args.artifacts:
        from toolkit.core.artifacts.personal import load_personal_manifest

        m = load_personal_manifest(art)
        export_s = None
    else:
        log("exporting the multi-exit personalisation programs")
        m = export_personal(PersonalExportConfig(model=args.model, out=art, checkpoint=cache,
                                                 exit_channels=args.exit_channels,
                                                 exit_points=tuple(args.exits.split(","))
                                                 if args.exits else None,
                                                 batch=args.batch, optimizer=OptimizerConfig(
                                                     lr=args.lr, momentum=0.9,
                                                     weight_decay=5e-4)),
                            progress=log)
        export_s = time.monotonic() - t0
    general_acc = pretrain_info.get("general_test_accuracy")
    if general_acc is None:
        general_test = load_personal_split(m, data, "test", None, "none", None, 0)
        backend0 = PersonalBackend(m, "torch")
        general_acc = float((backend0.forward(general_test.x)[-1].argmax(1)
                             == general_test.y).float().mean())

    # 3. personalise on the board program (ExecuTorch)
    state = work / "state"
    log(f"personalising on {args.backend} ({args.stream} local samples, "
        f"{args.labelled:.0%} labelled, {args.epochs} epochs)")
    rep = run_personalise(PersonaliseConfig(
        artifacts=art, out=state, data=data, classes=classes, shift=args.shift,
        labelled=args.labelled, pseudo_threshold=args.pseudo_threshold,
        epochs=args.epochs, holdout=0.2,
        backend=args.backend, seed=0, limit=args.stream, quiet=False))
    exits, policy_after = load_state_dir(state)

    # 4. accuracy before/after on the personal test set
    test = load_personal_split(m, data, "test", classes, args.shift, None, 0)
    trained = PersonalBackend(m, "torch")
    from toolkit.core.models.personal import load_exit_state

    load_exit_state(trained.net, exits, "exits")
    logits = trained.forward(test.x)
    confs, correct = scores(logits, test.y)
    acc_before = float(correct[-1].float().mean())
    where_after = route(policy_after, confs)
    acc_after = float(correct.gather(0, where_after.view(1, -1)).float().mean())
    per_exit_acc = {n: float(c.float().mean()) for n, c in zip(
        [*policy_after.exit_points, "final"], correct, strict=True)}

    # 5. equal accuracy: thresholds calibrated for the original network's held-out accuracy
    local = load_personal_split(m, data, "train", classes, args.shift, args.stream, 0)
    from toolkit.core.data.personal import split_holdout

    _, held = split_holdout(local, 0.2, 0)
    held_logits = trained.forward(held.x)
    _, held_correct = scores(held_logits, held.y)
    target_eq = float(held_correct[-1].float().mean())
    policy_eq = calibrate(held_logits, held.y, policy_after.exit_points, target_eq)
    where_eq = route(policy_eq, confs)
    acc_eq = float(correct.gather(0, where_eq.view(1, -1)).float().mean())

    flops_seg, flops_full = segment_flops(trained.net, tuple(m.data["spec"]["input_shape"]))
    cum = torch.tensor(flops_seg, dtype=torch.float64).cumsum(0)

    lat_idx = torch.from_numpy(np.random.default_rng(1).permutation(len(test)))

    def bake_for(policy, name: str) -> None:
        """``toolkit bake`` for ``policy``: its segments with the exit weights as constants,
        written into the artifacts (baked.json) for the engine to find."""
        d = work / f"bake-{name}"
        d.mkdir(parents=True, exist_ok=True)
        torch.save(exits, d / "exits.pt")
        (d / "policy.json").write_text(json.dumps(policy.to_dict()) + "\n")
        bake_personal(BakeConfig(artifacts=art, weights=d), progress=log)

    def latency(policy, n, backend, bake=False):
        """Early-exit and original network on the same samples, interleaved per sample.
        ``bake``: the segments ``bake_for`` baked (required); else the shipped ones."""
        eng = MultiExitEngine(m, backend, exits, policy, bake=bake)
        for i in lat_idx[:5].tolist():  # warm-up: first-call costs are not latency
            eng.run(test.x[i:i + 1])
            eng.run_full(test.x[i:i + 1])
        early = full = 0.0
        hits = 0
        for i in lat_idx[:n].tolist():
            x = test.x[i:i + 1]
            t = time.perf_counter()
            k, lg = eng.run(x)
            early += time.perf_counter() - t
            t = time.perf_counter()
            eng.run_full(x)
            full += time.perf_counter() - t
            hits += int(int(lg.argmax()) == int(test.y[i]))
        return {"samples": n, "runtime": backend + (" (exits baked in)" if bake else ""),
                "segments_run": [[*policy.exit_points, "final"][k] for k in eng.route],
                "early_exit_ms": 1000 * early / n,
                "full_network_ms": 1000 * full / n, "latency_ratio": full / early,
                "accuracy_on_these": hits / n}

    n_lat = min(args.latency_samples, len(test))
    log(f"timing early-exit vs full-network inference on {n_lat} random test samples")
    lat_eq_eager = latency(policy_eq, min(args.eager_latency_samples or n_lat, n_lat), "torch")
    lat_eq_shipped = latency(policy_eq, n_lat, "executorch")
    log("baking the equal-accuracy policy's segments (toolkit bake)")
    bake_for(policy_eq, "equal-accuracy")
    lat_eq = latency(policy_eq, n_lat, "executorch", bake=True)
    lat_after = None
    if args.latency_after:
        bake_for(policy_after, "after")
        lat_after = latency(policy_after, n_lat, "executorch", bake=True)

    # 6. training cost: exits only vs the whole network (same batch, same loss)
    log("timing one training step: exits only vs whole-network fine-tuning (eager)")
    xb, yb = test.x[:args.batch], test.y[:args.batch]
    wb = torch.ones(args.batch)
    step = PersonalTrainStep(copy.deepcopy(trained.net)).train()
    opt = torch.optim.SGD(step.parameters(), lr=0.01, momentum=0.9)

    def exit_step():
        opt.zero_grad(set_to_none=True)
        step(xb, yb, wb)[0].backward()
        opt.step()

    whole = _whole_network(trained.net)
    opt_w = torch.optim.SGD(whole.parameters(), lr=0.01, momentum=0.9)

    def whole_step():
        opt_w.zero_grad(set_to_none=True)
        whole(xb, yb, wb)[0].backward()
        opt_w.step()

    et_step_ms = rep["train_step_ms"] if args.backend == "executorch" else None
    if et_step_ms is None and args.et_step_samples > 0:
        et = PersonalBackend(m, "executorch")
        et_step_ms = 1000 * step_times(lambda: et.step(xb, yb, wb), args.et_step_samples)
    t_exit = step_times(exit_step, args.train_timing_steps)
    t_whole = step_times(whole_step, args.train_timing_steps)
    f_exit = train_flops(step, xb, yb, wb)
    f_whole = train_flops(whole, xb, yb, wb)

    sweep = []
    for share in [float(v) for v in args.sweep_labelled.split(",") if v.strip()]:
        log(f"labelled-share sweep: {share:.0%} labelled (eager backend)")
        sdir = work / f"sweep-{share}"
        r = run_personalise(PersonaliseConfig(
            artifacts=art, out=sdir, data=data, classes=classes, shift=args.shift,
            labelled=share, pseudo_threshold=args.pseudo_threshold,
            epochs=args.epochs, holdout=0.2,
            backend="torch", seed=0, limit=args.stream, quiet=True))
        ex, pol = load_state_dir(sdir)
        net_s = PersonalBackend(m, "torch")
        load_exit_state(net_s.net, ex, "exits")
        c_s, ok_s = scores(net_s.forward(test.x), test.y)
        w_s = route(pol, c_s)
        sweep.append({"labelled_share": share, "labelled_samples": r["labelled_samples"],
                      "pseudo_labelled_samples": r["pseudo_labelled_samples"],
                      "accuracy_after": float(ok_s.gather(0, w_s.view(1, -1)).float().mean()),
                      "mean_flops": float(cum[w_s].mean())})

    result = {
        "data": f"{test.name}; general pretraining on {general.name}",
        "personal_scenario": {"classes": list(classes), "class_names": [
            general.classes[c] for c in classes], "shift": args.shift,
            "local_samples": rep["stream_samples"] + rep["heldout_samples"],
            "labelled_share": args.labelled, "pseudo_threshold": args.pseudo_threshold,
            "exit_lr": args.lr, "epochs": args.epochs, "exit_channels": args.exit_channels,
            "test_samples": len(test)},
        "backbone": {**pretrain_info, "model": MODEL_NAMES.get(args.model, args.model),
                     "general_test_accuracy": general_acc},
        "accuracy_before": acc_before,
        "accuracy_after": acc_after,
        "accuracy_gain_points": 100 * (acc_after - acc_before),
        "per_exit_test_accuracy_after": per_exit_acc,
        "policy_after": {"target_accuracy": policy_after.target_accuracy,
                         "thresholds": policy_after.thresholds,
                         "test_share": {n: float((where_after == k).float().mean()) for k, n in
                                        enumerate([*policy_after.exit_points, "final"])},
                         "mean_flops": float(cum[where_after].mean())},
        "equal_accuracy": {"target_accuracy": target_eq, "test_accuracy": acc_eq,
                           "thresholds": policy_eq.thresholds,
                           "test_share": {n: float((where_eq == k).float().mean()) for k, n in
                                          enumerate([*policy_eq.exit_points, "final"])},
                           "mean_flops": float(cum[where_eq].mean()),
                           "flops_ratio": flops_full / float(cum[where_eq].mean()),
                           **lat_eq},
        "latency_ratio": lat_eq["latency_ratio"],
        "latency_ratio_runtime": (f"ExecuTorch (XNNPACK, {et_threads} thread(s)), batch 1: "
                                  "personal_full.pte vs the policy's segments lowered with the "
                                  "exit weights baked in, interleaved per sample"),
        "latency_executorch_shipped_segments": lat_eq_shipped,
        "latency_eager": lat_eq_eager,
        "latency_at_accuracy_after": lat_after,
        "train_cost_ratio": t_whole / t_exit,
        "train_cost": {"exit_step_ms": 1000 * t_exit, "whole_network_step_ms": 1000 * t_whole,
                       "exit_step_flops": f_exit, "whole_network_step_flops": f_whole,
                       "flops_ratio": f_whole / f_exit, "batch": args.batch,
                       "runtime": ("eager PyTorch, 1 thread, median of "
                                   f"{args.train_timing_steps} steps"),
                       "personalise_backend": args.backend,
                       "personalise_step_ms": rep["train_step_ms"],
                       "executorch_exit_step_ms": et_step_ms},
        "personalise_report": {k: rep[k] for k in (
            "stream_samples", "heldout_samples", "labelled_samples", "pseudo_labelled_samples",
            "ignored_samples", "pseudo_label_accuracy", "steps", "train_step_ms",
            "heldout_accuracy_before", "heldout_accuracy_after")},
        "labelled_sweep": {"accuracy_before": acc_before, "runs": sweep,
                           "note": "eager backend (parity-tested against ExecuTorch)"},
        "export_s": export_s,
        "paper": PAPER,
        "machine": f"2-core x86 shared with other jobs; torch 1 thread, ExecuTorch "
                   f"{et_threads} thread(s)",
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"personal distribution: {result['data']}")
    print(f"  accuracy before {acc_before:.3f} -> after {acc_after:.3f} "
          f"({result['accuracy_gain_points']:+.1f} pt; paper: up to +15.9)")
    print(f"  training cost ratio (whole network / exits) {result['train_cost_ratio']:.2f}x "
          f"time, {f_whole / f_exit:.2f}x FLOPs (paper: up to 2.2x)")
    print(f"  latency ratio at equal accuracy ({target_eq:.3f} target, {acc_eq:.3f} reached) "
          f"{lat_eq['latency_ratio']:.2f}x ExecuTorch baked, "
          f"{lat_eq_shipped['latency_ratio']:.2f}x ExecuTorch shipped segments, "
          f"{lat_eq_eager['latency_ratio']:.2f}x eager, "
          f"FLOPs {result['equal_accuracy']['flops_ratio']:.2f}x (paper: 2.2-3.2x)")
    for r in sweep:
        print(f"  {r['labelled_share']:.0%} labelled: accuracy after {r['accuracy_after']:.3f} "
              f"({100 * (r['accuracy_after'] - acc_before):+.1f} pt)")
    print(f"wrote {out}")
    return 0


MODEL_NAMES = {"smallcnn": "smallcnn (16-32-64 channels)",
               "vgg16": "vgg16 (CIFAR-style VGG-16-BN, 5 stages)",
               "resnet18": "resnet18 (CIFAR-style ResNet-18)"}


def _set_et_threads(n: int) -> int:
    """Size ExecuTorch's thread pool (XNNPACK's workers) so both latency paths get the same."""
    from executorch.extension.pybindings import portable_lib

    portable_lib._unsafe_reset_threadpool(n)
    return int(portable_lib._threadpool_get_thread_count())


def _pretrain(args, data, cache: Path) -> dict:
    """Pretrain ``args.model`` eagerly on the general data (one thread) and save it to ``cache``."""
    general = load_dataset(data, "train", limit=args.pretrain_limit, seed=0)
    log(f"pretraining {args.model} on {general.name} ({len(general)} images, "
        f"{args.pretrain_epochs} epochs, batch {args.pretrain_batch}, lr {args.pretrain_lr}, "
        f"1 thread)")
    t0 = time.monotonic()
    net = pretrain(args.model, general, mean=CIFAR_MEAN, std=CIFAR_STD,
                   epochs=args.pretrain_epochs, batch=args.pretrain_batch, lr=args.pretrain_lr,
                   augment=True,
                   progress=lambda e: log(f"  epoch {e + 1} ({time.monotonic() - t0:.0f} s)"))
    pretrain_s = time.monotonic() - t0
    torch.save(net.state_dict(), cache)
    test = load_dataset(data, "test")
    with torch.no_grad():
        xn = normalize(test.x, CIFAR_MEAN, CIFAR_STD)
        pred = torch.cat([net(xn[i:i + 500]).argmax(1) for i in range(0, len(test), 500)])
    acc = float((pred == test.y).float().mean())
    log(f"pretrained in {pretrain_s:.0f} s: {acc:.3f} on the general test set")
    return {"model": args.model, "pretrain_s": pretrain_s, "epochs": args.pretrain_epochs,
            "images": len(general), "batch": args.pretrain_batch, "lr": args.pretrain_lr,
            "augment": "flips and 4-pixel shifts", "general_test_accuracy": acc}


def _whole_network(net):
    """The whole network trainable (backbone parameters, train-mode BatchNorm) plus the exits:
    what fine-tuning everything on the device would cost per step."""
    from torch import nn

    from toolkit.core.models.personal import HEAD_STAGE

    class Whole(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = copy.deepcopy(net.backbone)
            for sub in self.backbone.modules():  # buffers back to parameters
                for name in ("weight", "bias"):
                    b = sub._buffers.get(name)
                    if b is not None:
                        del sub._buffers[name]
                        sub.register_parameter(name, nn.Parameter(b.clone()))
            self.backbone.train()
            self.exits = copy.deepcopy(net.exits)
            self.points = list(net.exit_points)

        def forward(self, x, y, w):
            loss = torch.zeros(())
            denom = torch.clamp_min(w.sum(), 1.0)
            for name, stage in self.backbone.named_children():
                x = stage(x)
                if name in self.exits:
                    loss = loss + (F.cross_entropy(self.exits[name](x), y, reduction="none")
                                   * w).sum() / denom
                if name == HEAD_STAGE:
                    loss = loss + (F.cross_entropy(x, y, reduction="none") * w).sum() / denom
            return (loss,)

    return Whole()


if __name__ == "__main__":
    sys.exit(main())
