"""Learning-rate schedules (edge and cloud on one curve) and in-memory augmentation.

The edge's two backends follow a schedule step for step (ExecuTorch against eager, real
exported program); a resumed ExecuTorch edge continues with the momentum it had; and
through a real broker the cloud trains every batch at the factor of that batch's
position in the edge's announced schedule (the trainer's ``--trace``).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from tests.conftest import InProcessCloud, wait_until
from toolkit.core.data.augment import Augment
from toolkit.core.data.datasets import load_dataset
from toolkit.core.data.source import InMemory
from toolkit.core.errors import HiertrainError
from toolkit.core.lr_schedule import STATUS_KEY, LrSchedule

BATCH = 16
ARTIFACTS = {"digits": True, "batch": BATCH, "exit_channels": 16}
"""conftest.exported options; artifacts, manifest and broker: tests/conftest.py"""


def test_cosine_runs_from_the_base_rate_to_zero() -> None:
    s = LrSchedule("cosine", epochs=2, batches_per_epoch=10)
    assert s.factor(0, 0) == 1.0
    assert s.factor(1, 0) == pytest.approx(0.5)  # half-way through the run
    assert s.factor(1, 9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)))
    assert all(s.factor(e, b) > s.factor(e, b + 1) for e in (0, 1) for b in range(9))
    assert LrSchedule("cosine", 3, 10, min_factor=0.1).factor(3, 0) == pytest.approx(0.1)
    assert LrSchedule().factor(5, 7) == 1.0
    assert LrSchedule("cosine", 2, 0).factor(1, 3) == 1.0  # unknown length: constant
    assert LrSchedule.from_dict(s.to_dict()) == s


@pytest.mark.parametrize("bad", [None, [], {"name": "step"}, {"epochs": 2},
                                 {"name": "cosine", "epochs": "2"},
                                 {"name": "cosine", "epochs": 0},
                                 {"name": "cosine", "epochs": 2, "min_factor": float("nan")},
                                 {"name": "cosine", "epochs": True}])
def test_a_malformed_schedule_from_the_network_is_refused(bad) -> None:
    with pytest.raises(HiertrainError):
        LrSchedule.from_dict(bad)


def _batches(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 1, 8, 8, generator=g), torch.randint(0, 10, (BATCH,), generator=g))
            for _ in range(n)]


def _weights_after(backend, batches, factors) -> dict[str, torch.Tensor]:
    for (x, y), f in zip(batches, factors, strict=True):
        backend.set_lr_factor(f)
        backend.step(x, y)
    return backend.state_dict()


def test_both_edge_backends_follow_a_schedule_step_for_step(manifest) -> None:
    from edge_runtime.backends import ExecuTorchBackend, TorchBackend

    batches = _batches(6)
    factors = [1.0, 0.8, 0.5, 0.2, 0.05, 0.0]
    et = _weights_after(ExecuTorchBackend(manifest), batches, factors)
    eager = _weights_after(TorchBackend(manifest), batches, factors)
    constant = _weights_after(ExecuTorchBackend(manifest), batches, [1.0] * 6)
    worst = max(float((et[k] - eager[k]).abs().max()) for k in et)
    moved = max(float((et[k] - constant[k]).abs().max()) for k in et)
    print(f"ExecuTorch vs eager under a schedule: max |dw| {worst:.2e}; vs constant {moved:.2e}")
    assert worst < 1e-4
    assert moved > 1e-3  # the schedule did change the updates


def test_a_resumed_executorch_edge_keeps_its_momentum(manifest) -> None:
    from edge_runtime.backends import ExecuTorchBackend

    batches = _batches(5, seed=1)
    straight = _weights_after(ExecuTorchBackend(manifest), batches, [1.0] * 5)
    first = ExecuTorchBackend(manifest)
    _weights_after(first, batches[:3], [1.0] * 3)
    weights, momentum = first.state_dict(), first.optimizer_state()
    assert momentum is not None and momentum["momentum_buffer"]  # the buffers are reachable
    resumed = ExecuTorchBackend(manifest)
    resumed.load_state_dict(weights)
    resumed.load_optimizer_state(momentum)
    after = _weights_after(resumed, batches[3:], [1.0] * 2)
    worst = max(float((after[k] - straight[k]).abs().max()) for k in after)
    assert worst < 1e-6, worst


@pytest.mark.parametrize("nesterov", [False, True])
def test_the_boards_sgd_is_torchs_update(nesterov: bool) -> None:
    from edge_runtime.sgd import HostSGD

    g = torch.Generator().manual_seed(0)
    ours = {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g)}
    theirs = {k: v.clone().requires_grad_(True) for k, v in ours.items()}
    opts = dict(momentum=0.9, weight_decay=5e-4, nesterov=nesterov)
    host = HostSGD(ours, lr=0.1, **opts)
    ref = torch.optim.SGD(list(theirs.values()), lr=0.1, foreach=False, **opts)
    for lr in (0.1, 0.05, 0.01):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in ours.items()}
        host.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = lr
        for k, p in theirs.items():
            p.grad = grads[k].clone()
        host.step(grads)
        ref.step()
    for k in ours:
        assert torch.allclose(ours[k], theirs[k].detach(), atol=1e-7, rtol=0), k


def test_the_boards_sgd_does_not_import_dynamo() -> None:
    """torch.optim would (sympy, seconds of start-up on a board): tests/test_aarch64.py's
    board has no sympy."""
    import subprocess
    import sys

    code = ("import sys, torch; from edge_runtime.sgd import HostSGD; "
            "o = HostSGD({'w': torch.zeros(2)}, lr=0.1, momentum=0.9); "
            "o.step({'w': torch.ones(2)}); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_in_memory_augmentation_is_reproducible_and_only_moves_pixels() -> None:
    ds = load_dataset(None, "train", input_shape=(1, 16, 16), limit=64)
    plain = InMemory(ds)
    aug = InMemory(ds, Augment(flip=True, crop=True))
    a = list(aug.batches(16, epoch=1, seed=3))
    b = list(aug.batches(16, epoch=1, seed=3))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2)
               for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    # a resume mid-epoch sees the same pixels without drawing the skipped batches
    assert torch.equal(list(aug.batches(16, epoch=1, seed=3, start=2))[0][0], a[2][0])
    p = list(plain.batches(16, epoch=1, seed=3))
    # the same order, so the same labels; other pixels
    assert all(torch.equal(y1, y2) for (_, y1), (_, y2) in zip(a, p, strict=True))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, p, strict=True))
    assert not torch.equal(list(aug.batches(16, epoch=2, seed=3))[0][0], a[0][0])  # new draw
    for (xa, _), (xp, _) in zip(a, p, strict=True):  # reflect-padded shifts, flips: no new values
        for i in range(len(xa)):
            assert set(xa[i].unique().tolist()) <= set(xp[i].unique().tolist())
    assert aug.describe()["augment"] == ["flip", "crop"]
    with pytest.raises(HiertrainError, match="color needs the raw pixels"):
        InMemory(ds, Augment(color=True))
    InMemory(ds, Augment(color=True), normalized=False)  # raw pixels (--mode cloud): fine


@pytest.mark.mqtt
def test_the_cloud_trains_each_batch_on_the_edges_schedule(artifacts, broker,
                                                          tmp_path: Path) -> None:
    from edge_runtime.train import TrainConfig, run_training

    run = f"s{random.getrandbits(32):08x}"
    trace = tmp_path / "trace.jsonl"
    cloud = InProcessCloud(artifacts, broker, tmp_path / "cloud", run, device_ids=["e0"],
                           trace=str(trace), idle_timeout=60, reraise=False)
    try:
        wait_until(lambda: cloud.error is not None or (tmp_path / "cloud" / "fleet_status.json"
                                                       ).exists(), 60, "the cloud trainer")
        assert cloud.error is None, cloud.error
        report = run_training(TrainConfig(
            artifacts=artifacts, broker=broker.url, device_id="e0", run_id=run,
            state_dir=tmp_path, quiet=True, connect_timeout=10, epochs=2, limit=96,
            lr_schedule="cosine", backend="torch", augment=Augment(flip=True),
            report=tmp_path / "edge.json"))
        cloud.join(120)
    finally:
        cloud.close()
    assert cloud.error is None, cloud.error
    per_epoch = 96 // BATCH
    schedule = LrSchedule("cosine", 2, per_epoch)
    assert report["batches_published"] == 2 * per_epoch
    lr0 = json.loads((artifacts / "manifest.json").read_text())["optimizer"]["lr"]
    rows = sorted((json.loads(line) for line in trace.read_text().splitlines()),
                  key=lambda r: r["seq"])
    assert [r["seq"] for r in rows] == list(range(2 * per_epoch))
    for r in rows:
        epoch, batch = divmod(r["seq"], per_epoch)
        assert r["lr"] == pytest.approx(lr0 * schedule.factor(epoch, batch)), r
    assert report["data"]["augment"] == ["flip"]
    written = json.loads((tmp_path / "edge.json").read_text())
    assert written["config"]["lr_schedule"] == "cosine"
    assert written[STATUS_KEY] == schedule.to_dict()  # in the report as in the statuses
