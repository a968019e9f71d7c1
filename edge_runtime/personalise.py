"""``edge-runtime personalise``: train the exits on the board from local, mostly unlabelled data.

The stream is the device's own samples (``--data`` restricted to ``--classes``
and seen through ``--shift``, the personal scenario of docs/personalise.md); a
fraction ``--labelled`` of them carries a real label. Everything else is
pseudo-labelled by the backbone's own classifier (the frozen "final exit"):

* Pseudo-labels come from a forward pass *before* training, one per sample:
  the backbone is frozen, so its prediction for a sample never changes and is
  computed once, by the batch forward program (``personal_forward.pte``), not
  inside the training program. The training program therefore only ever sees a
  fixed-shape batch ``(x[B], y[B], w[B])``.
* A pseudo-label is used only if the final exit's softmax confidence reaches
  ``--pseudo-threshold``; its sample weight is 1, otherwise 0 (the sample
  still flows through the program but contributes nothing). Real labels
  always have weight 1 and win over the pseudo-label.

After training, per-exit thresholds are calibrated on a held-out share of the
local data (``--holdout``) for ``--target-accuracy`` (edge_runtime/calibrate.py)
and written with the exit weights to ``--out``: ``exits.pt``, ``policy.json``,
``report.json``. ``edge-runtime infer --artifacts A --weights OUT`` then exits
early with them.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_runtime.calibrate import ExitPolicy, calibrate, summarize
from edge_runtime.config import BACKENDS
from edge_runtime.progress import progress_bar
from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.artifacts.personal import (
    EXITS_FILE,
    FORWARD_PTE,
    POLICY_FILE,
    REPORT_FILE,
    TRAIN_PTE,
    load_personal_manifest,
    load_state_dir,
)
from toolkit.core.data.datasets import Dataset, load_dataset, normalize
from toolkit.core.data.personal import SHIFTS, personal_view, split_holdout
from toolkit.core.errors import HiertrainError
from toolkit.core.models.personal import PersonalForward, PersonalTrainStep, load_personal_net


@dataclass
class PersonaliseConfig:
    artifacts: str | Path
    out: str | Path
    data: str | None = None
    classes: tuple[int, ...] | None = None
    shift: str = "none"
    labelled: float = 0.1  # share of the stream with real labels
    pseudo_threshold: float = 0.9
    epochs: int = 5
    holdout: float = 0.2
    target_accuracy: float | None = None  # None: the deepest exit's held-out accuracy
    backend: str = "executorch"
    seed: int = 0
    limit: int | None = None
    quiet: bool = False


class PersonalBackend:
    """Exit-only SGD steps and batch forwards, on ExecuTorch or eager PyTorch (same math)."""

    def __init__(self, manifest: Manifest, backend: str):
        if backend not in BACKENDS:
            raise HiertrainError(f"unknown backend {backend!r}; choose one of: "
                                 f"{', '.join(BACKENDS)}")
        self.manifest, self.name = manifest, backend
        self.batch = manifest.data["batch_size"]
        self.shape = tuple(manifest.data["spec"]["input_shape"])
        opt = manifest.data["optimizer"]
        self.lr, self.momentum = float(opt["lr"]), float(opt["momentum"])
        self.weight_decay, self.nesterov = float(opt["weight_decay"]), bool(opt["nesterov"])
        self.net = load_personal_net(manifest)
        self.step_module = PersonalTrainStep(self.net).train()
        if backend == "torch":
            self.optimizer = torch.optim.SGD(
                self.step_module.parameters(), lr=self.lr, momentum=self.momentum,
                weight_decay=self.weight_decay, nesterov=self.nesterov)
        else:
            from toolkit.core.et_program import InferenceProgram, TrainingProgram

            self.program = TrainingProgram.from_file(manifest.path(TRAIN_PTE))
            self.forward_program = InferenceProgram.from_file(manifest.path(FORWARD_PTE))
            self._et_optimizer = None

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != (self.batch, *self.shape):
            raise HiertrainError(f"batch has shape {list(x.shape)}, the personalisation program "
                                 f"takes [{self.batch}, {', '.join(map(str, self.shape))}]")
        return x.to(torch.float32).contiguous()

    def step(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor
             ) -> tuple[float, list[torch.Tensor]]:
        """One SGD step of the exits; returns the loss and all logits (exits, then final)."""
        x, y, w = self._check(x), y.to(torch.int64).contiguous(), w.to(torch.float32).contiguous()
        if self.name == "torch":
            self.optimizer.zero_grad(set_to_none=True)
            outs = self.step_module(x, y, w)
            outs[0].backward()
            self.optimizer.step()
            return float(outs[0].detach()), list(outs[1:])
        outs = self.program.forward_backward(x, y, w)
        if self._et_optimizer is None:
            self._et_optimizer = self.program.sgd(self.lr, self.momentum, self.weight_decay,
                                                  self.nesterov)
        self._et_optimizer.step(self.program.named_gradients())
        return float(outs[0]), list(outs[1:])

    def exit_state(self) -> dict[str, torch.Tensor]:
        """Current exit weights, keyed ``net.exits.<point>....``."""
        if self.name == "executorch" and self._et_optimizer is not None:
            return {k: v.detach().clone() for k, v in self.program.named_parameters().items()}
        return {k: v.detach().clone() for k, v in self.step_module.named_parameters()}

    @torch.no_grad()
    def forward(self, x_all: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit and the final classifier for any number of samples."""
        outs: list[list[torch.Tensor]] = []
        if self.name == "torch":
            fwd = PersonalForward(self.net).eval()  # shares the trained exit modules
            for i in range(0, len(x_all), 256):
                outs.append(list(fwd(x_all[i:i + 256])))
        else:
            state = self.exit_state()
            names = self.manifest.data["programs"]["forward"]["weights"]
            weights = [state[n].contiguous() for n in names]
            for i in range(0, len(x_all), self.batch):
                xb = x_all[i:i + self.batch]
                n = len(xb)
                if n < self.batch:  # the program has a static batch: pad, then drop the padding
                    xb = torch.cat([xb, xb.new_zeros(self.batch - n, *xb.shape[1:])])
                res = self.forward_program.run(xb.contiguous(), *weights)
                outs.append([r[:n].clone() for r in res])
        return [torch.cat(parts) for parts in zip(*outs, strict=True)]


def pseudo_targets(final_logits: torch.Tensor, labels: torch.Tensor, labelled: torch.Tensor,
                   threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, weights)``: real labels where ``labelled``, else the final exit's
    prediction with weight 1 only if its softmax confidence >= ``threshold``, else 0."""
    probs = torch.softmax(final_logits.float(), dim=1)
    conf, pred = probs.max(dim=1)
    targets = torch.where(labelled, labels, pred)
    weights = (labelled | (conf >= threshold)).to(torch.float32)
    return targets, weights


def _labelled_mask(n: int, share: float, seed: int) -> torch.Tensor:
    if not 0.0 <= share <= 1.0:
        raise HiertrainError(f"--labelled must be a share in [0, 1], got {share}")
    mask = torch.zeros(n, dtype=torch.bool)
    k = int(round(share * n))
    mask[torch.from_numpy(np.random.default_rng([seed, 11]).permutation(n)[:k])] = True
    return mask


def load_personal_split(manifest: Manifest, data: str | None, split: str,
                        classes, shift: str, limit: int | None, seed: int) -> Dataset:
    """The personal scenario's samples of ``split``, normalised for the backbone."""
    if shift not in SHIFTS:
        raise HiertrainError(f"unknown shift {shift!r}; choose one of: {', '.join(SHIFTS)}")
    ds = load_dataset(data, split, input_shape=tuple(manifest.data["spec"]["input_shape"]),
                      seed=seed)
    ds = personal_view(ds, classes, shift)
    if limit is not None:  # a seeded sample: sources are often sorted by class
        pick = torch.from_numpy(np.random.default_rng([seed, 5]).permutation(len(ds))[:limit])
        ds = Dataset(ds.x[pick], ds.y[pick], ds.classes, ds.name)
    norm = manifest.data["normalization"]
    return Dataset(normalize(ds.x, norm["mean"], norm["std"]), ds.y, ds.classes, ds.name)


def accuracies(logits: list[torch.Tensor], y: torch.Tensor, names: list[str]) -> dict[str, float]:
    return {n: float((lg.argmax(1) == y).float().mean()) for n, lg in zip(names, logits,
                                                                         strict=True)}


def run_personalise(cfg: PersonaliseConfig) -> dict[str, Any]:
    if not 0.0 <= cfg.pseudo_threshold <= 1.0:
        raise HiertrainError(f"--pseudo-threshold must be in [0, 1], got {cfg.pseudo_threshold}")
    if cfg.epochs < 1:
        raise HiertrainError(f"--epochs must be at least 1, got {cfg.epochs}")
    manifest = load_personal_manifest(cfg.artifacts)
    points = list(manifest.data["spec"]["exit_points"])
    names = [*points, "final"]
    backend = PersonalBackend(manifest, cfg.backend)
    local = load_personal_split(manifest, cfg.data, "train", cfg.classes, cfg.shift,
                                cfg.limit, cfg.seed)
    stream, held = split_holdout(local, cfg.holdout, cfg.seed)
    b = backend.batch
    if len(stream) < b:
        raise HiertrainError(f"{local.name} leaves {len(stream)} samples to train on, fewer "
                             f"than one batch of {b}; use more data or a smaller batch")

    t0 = time.monotonic()
    before = backend.forward(held.x)
    teacher_s = time.monotonic() - t0
    t0 = time.monotonic()
    final = backend.forward(stream.x)[-1]
    teacher_s += time.monotonic() - t0
    labelled = _labelled_mask(len(stream), cfg.labelled, cfg.seed)
    targets, weights = pseudo_targets(final, stream.y, labelled, cfg.pseudo_threshold)
    pseudo = ~labelled & (weights > 0)
    pseudo_acc = (float((targets[pseudo] == stream.y[pseudo]).float().mean())
                  if bool(pseudo.any()) else None)

    steps_per_epoch = len(stream) // b
    history = []
    train_s = 0.0
    bar = progress_bar(cfg.quiet, total=cfg.epochs * steps_per_epoch, desc="personalise",
                       unit="step")
    for epoch in range(cfg.epochs):
        order = torch.from_numpy(np.random.default_rng([cfg.seed, epoch]).permutation(len(stream)))
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * b:(s + 1) * b]
            t = time.monotonic()
            loss, _ = backend.step(stream.x[idx], targets[idx], weights[idx])
            train_s += time.monotonic() - t
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}")
        history.append({"epoch": epoch + 1, "mean_loss": float(np.mean(losses))})
    bar.close()

    after = backend.forward(held.x)
    acc_after = accuracies(after, held.y, names)
    target = cfg.target_accuracy if cfg.target_accuracy is not None else acc_after[points[-1]]
    policy = calibrate(after, held.y, points, target)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(backend.exit_state(), out / EXITS_FILE)
    (out / POLICY_FILE).write_text(json.dumps(policy.to_dict(), indent=2) + "\n")
    steps = cfg.epochs * steps_per_epoch
    report = {
        "data": local.name,
        "backend": cfg.backend,
        "stream_samples": len(stream),
        "heldout_samples": len(held),
        "labelled_samples": int(labelled.sum()),
        "pseudo_labelled_samples": int(pseudo.sum()),
        "ignored_samples": int((weights == 0).sum()),
        "pseudo_label_accuracy": pseudo_acc,
        "pseudo_threshold": cfg.pseudo_threshold,
        "epochs": cfg.epochs,
        "steps": steps,
        "train_step_ms": 1000 * train_s / steps,
        "teacher_forward_s": teacher_s,
        "train_step_flops": manifest.data["cost"]["train_step_flops"],
        "heldout_accuracy_before": accuracies(before, held.y, names),
        "heldout_accuracy_after": acc_after,
        "policy": policy.to_dict(),
        "history": history,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def policy_summary(policy: ExitPolicy, logits: list[torch.Tensor], y: torch.Tensor) -> dict:
    """How ``policy`` routes and scores these samples (for reports)."""
    probs = [torch.softmax(lg.float(), 1) for lg in logits]
    confs = torch.stack([p.max(1).values for p in probs])
    correct = torch.stack([p.argmax(1) == y for p in probs])
    return summarize(policy, confs, correct)


# load_state_dir (reading the --out directory) lives in toolkit.core.artifacts.personal
__all__ = ["EXITS_FILE", "POLICY_FILE", "REPORT_FILE", "PersonaliseConfig", "PersonalBackend",
           "load_state_dir", "pseudo_targets", "run_personalise"]
