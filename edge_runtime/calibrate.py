"""Per-exit confidence thresholds for early-exit inference, calibrated on held-out local data.

The policy runs the exits in backbone order; a sample leaves at the first exit
whose softmax confidence reaches that exit's threshold, and the *terminal*
exit (the deepest personalised exit by default) answers whatever is left.

Calibration walks the exits in the same order over the held-out samples that
are still in the network: for each non-terminal exit it takes the **lowest**
threshold at which the samples that would exit there are at least ``target``
accurate (sorted by confidence, the largest confident prefix whose accuracy is
>= target). An exit no threshold makes accurate enough gets ``None`` (never
exits). Coverage (share of all held-out samples leaving at each exit) and the
accuracy of each exit's share are recorded, so a user sees what the target
costs. On new data from the same distribution each exit's share is then about
``target`` accurate, up to finite-sample noise (tests hold it to 3 binomial
standard errors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from toolkit.core.artifacts.personal import ExitPolicy
from toolkit.core.errors import HiertrainError

__all__ = ["ExitPolicy", "calibrate", "lowest_threshold", "route", "summarize"]


def route(policy: ExitPolicy, confs: torch.Tensor) -> torch.Tensor:
    """Exit index per sample; ``confs`` is ``[n_exits + 1, N]`` (exits, then final)."""
    chain = policy.chain()
    n = confs.shape[1]
    where = torch.full((n,), chain[-1], dtype=torch.int64)
    left = torch.ones(n, dtype=torch.bool)
    for k in chain[:-1]:
        t = policy.thresholds[k]
        if t is None:
            continue
        take = left & (confs[k] >= t)
        where[take] = k
        left &= ~take
    return where


def lowest_threshold(conf: torch.Tensor, correct: torch.Tensor, target: float) -> float | None:
    """The lowest ``t`` with accuracy of ``{conf >= t}`` >= target, or None if there is none."""
    if conf.numel() == 0:
        return None
    order = torch.argsort(conf, descending=True, stable=True)
    c, ok = conf[order], correct[order].to(torch.float64)
    acc = ok.cumsum(0) / torch.arange(1, len(ok) + 1, dtype=torch.float64)
    # a prefix must end where the confidence changes, or "conf >= t" would take more
    boundary = torch.ones(len(c), dtype=torch.bool)
    boundary[:-1] = c[1:] < c[:-1]
    good = torch.nonzero((acc >= target) & boundary).flatten()
    if good.numel() == 0:
        return None
    return float(c[int(good[-1])])


def calibrate(logits: Sequence[torch.Tensor], labels: torch.Tensor, exit_points: Sequence[str],
              target: float, terminal: str | None = None) -> ExitPolicy:
    """Thresholds from held-out ``logits`` (one ``[N, classes]`` per exit, then the final)."""
    if not 0.0 <= target <= 1.0:
        raise HiertrainError(f"target accuracy must be in [0, 1], got {target}")
    if len(logits) != len(exit_points) + 1:
        raise HiertrainError(f"expected {len(exit_points) + 1} logits tensors, got {len(logits)}")
    probs = [torch.softmax(lg.float(), dim=1) for lg in logits]
    confs = torch.stack([p.max(dim=1).values for p in probs])
    correct = torch.stack([p.argmax(dim=1) == labels for p in probs])
    policy = ExitPolicy(list(exit_points), [None] * len(exit_points),
                        terminal or exit_points[-1], target)
    left = torch.ones(len(labels), dtype=torch.bool)
    for k in policy.chain()[:-1]:
        t = lowest_threshold(confs[k][left], correct[k][left], target)
        policy.thresholds[k] = t
        if t is not None:
            left &= ~(confs[k] >= t)
    policy.calibration = summarize(policy, confs, correct)
    return policy


def summarize(policy: ExitPolicy, confs: torch.Tensor, correct: torch.Tensor) -> dict:
    """Coverage and accuracy per exit and overall of ``policy`` on these samples."""
    where = route(policy, confs)
    n = len(where)
    names = [*policy.exit_points, "final"]
    per_exit = {}
    for k in policy.chain():
        mask = where == k
        m = int(mask.sum())
        per_exit[names[k]] = {
            "samples": m, "coverage": m / n if n else 0.0,
            "accuracy": float(correct[k][mask].float().mean()) if m else None,
        }
    hit = correct.gather(0, where.view(1, -1)).flatten()
    return {"samples": n, "accuracy": float(hit.float().mean()) if n else None,
            "per_exit": per_exit}
