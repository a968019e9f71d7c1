"""New classes during a run (issue 17): a head provisioned ahead, unseen classes masked,
old classes kept in the batches by replay; docs/online_learning.md."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from cloud_trainer.evaluate import Evaluator
from cloud_trainer.infer import cloud_predict
from edge_runtime.infer import InferConfig, InferEngine, run_inference
from edge_runtime.train import TrainConfig, run_training
from tests.conftest import REPO
from toolkit.core.classes import SeenClasses, classes_path, load_seen, mask_unseen, save_seen
from toolkit.core.data.datasets import load_dataset, normalize
from toolkit.core.data.live import LiveConfig, LiveFolder
from toolkit.core.data.stream import Decode
from toolkit.core.errors import HiertrainError
from toolkit.core.models.segments import load_segments

UNSEEN_BIAS = 100.0  # makes every unseen class the unmasked winner: the mask must do the work


def _uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


def _last_linear(module: nn.Module) -> nn.Linear:
    return [m for m in module.modules() if isinstance(m, nn.Linear)][-1]


def _favour_unseen(manifest, seen: SeenClasses):
    """The real segments with both heads' biases pushed towards the unseen classes."""
    built = load_segments(manifest)
    with torch.no_grad():
        for head in (built.cloud, built.step.exit):
            bias = _last_linear(head).bias
            bias[~seen.mask()] += UNSEEN_BIAS
    return built


def _digits(manifest, split: str = "test", limit: int = 200):
    ds = load_dataset(None, split, input_shape=manifest.input_shape, limit=limit, seed=0)
    norm = manifest.data["model"]["normalization"]
    return normalize(ds.x, norm["mean"], norm["std"]), ds.y


def test_seen_classes_are_learned_from_labels(tmp_path: Path) -> None:
    seen = SeenClasses(10)
    logits = torch.randn(4, 10)
    assert len(seen) == 0 and seen.mask() is None and seen.apply(logits) is logits  # no mask
    assert seen.update(torch.tensor([3, 1, 3])) == [1, 3]
    assert seen.update([1]) == [] and seen.update(torch.tensor([7, 1])) == [7]
    assert seen.sorted() == [1, 3, 7] and 3 in seen and 2 not in seen
    assert seen.mask().nonzero().flatten().tolist() == [1, 3, 7]
    assert seen.covers(torch.tensor([1, 2, 7])).tolist() == [True, False, True]
    with pytest.raises(HiertrainError, match="--num-classes"):
        seen.update([10])
    assert SeenClasses(3, [0, 1, 2]).mask() is None  # every class seen: nothing to mask
    path = classes_path(tmp_path / "edge_weights-cam.pt")
    assert path.name == "edge_weights-cam.classes.json"
    assert load_seen(path, 10) is None
    save_seen(path, seen)
    assert load_seen(path, 10).sorted() == [1, 3, 7]
    path.write_text("{}")
    with pytest.raises(HiertrainError, match="not a seen-classes file"):
        load_seen(path, 10)


def test_masking_never_predicts_an_unseen_class(manifest) -> None:
    """Real segments, real logits, the unseen classes made the likeliest: masked, the full
    model, the exit and the cloud's inference answer only seen classes, and the evaluation
    scores the seen classes' images only."""
    x, y = _digits(manifest)
    for classes in ([4], [0, 1], [2, 5, 9], list(range(9))):
        seen = SeenClasses(manifest.num_classes, classes)
        built = _favour_unseen(manifest, seen)
        step, cloud = built.step.eval(), built.cloud.eval()
        with torch.no_grad():
            cut = step.edge(x)
            for logits in (cloud(cut), step.exit(cut)):
                assert not seen.covers(logits.argmax(1)).any()  # unmasked: always unseen
                masked = seen.apply(logits)
                assert seen.covers(masked.argmax(1)).all()
                probs = torch.softmax(masked, dim=1)
                assert float(probs[:, ~seen.mask()].abs().max()) == 0.0
                assert torch.allclose(probs.sum(1), torch.ones(len(x)))
        preds, probs = cloud_predict(cloud, cut, seen)
        assert set(preds) <= set(classes)
        full, exit_ = Evaluator(manifest, None, limit=200).evaluate(step, cloud, seen)
        keep = seen.covers(y)
        with torch.no_grad():
            ref = float((seen.apply(cloud(step.edge(x[keep]))).argmax(1) == y[keep])
                        .float().mean())
        assert full == pytest.approx(ref) and 0 <= exit_ <= 1
    # a mask for another number of classes is a bug, not a silent broadcast
    with pytest.raises(ValueError, match="a mask of 3 classes"):
        mask_unseen(torch.zeros(2, 10), torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["executorch", "torch"])
def test_edge_exit_inference_masks_unseen_classes(manifest, backend) -> None:
    """The board's inference engine (the exported program) with a seen set: the exit's
    answer and confidence are over the seen classes only."""
    seen = SeenClasses(manifest.num_classes, [2, 5])
    state = _favour_unseen(manifest, seen).step.state_dict()
    x, _ = _digits(manifest, limit=20)
    free = InferEngine(backend, manifest, state)
    masked = InferEngine(backend, manifest, state, seen=seen)
    for i in range(len(x)):
        _, logits = free.run(x[i : i + 1])
        cut, m = masked.run(x[i : i + 1])
        assert int(logits.argmax()) not in seen and int(m.argmax()) in seen
        assert torch.equal(m[0, seen.mask()], logits[0, seen.mask()])
        assert cut.shape[1:] == tuple(manifest.cut_shape)


def _frames(directory: Path, images: np.ndarray, labels: list[int], start: int) -> None:
    with (directory / "labels.csv").open("a") as side:
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            name = f"f{start + i:05d}.png"
            Image.fromarray(img).save(directory / ".tmp.png")
            (directory / ".tmp.png").rename(directory / name)
            side.write(f"{name},{lab}\n")


@pytest.mark.parametrize("replay", [64, 0])
def test_replay_keeps_old_classes_in_batches_after_new_ones_arrive(tmp_path: Path,
                                                                   replay: int) -> None:
    """The live source (``edge-runtime train --live``): frames of classes 0 and 1, then only
    of 2 and 3. With replay, every batch after the switch still holds old classes, about
    the replay share; without, none do."""
    ds = load_dataset(None, "train")
    old = [i for i in range(len(ds)) if int(ds.y[i]) in (0, 1)][:32]
    new = [i for i in range(len(ds)) if int(ds.y[i]) in (2, 3)][:48]
    pix = (ds.x[:, 0].numpy() * 255).round().astype(np.uint8)
    live = tmp_path / "live"
    live.mkdir()
    _frames(live, pix[old], [int(ds.y[i]) for i in old], 0)
    src = LiveFolder(live, Decode(mode="L", size=(8, 8)),
                     LiveConfig(replay=replay, idle_timeout=0.5, poll_s=0.01), num_classes=10)
    it = src.batches(16, epoch=0, seed=0)
    first = [next(it) for _ in range(2 if replay == 0 else 3)]  # the 32 old frames, trained
    assert all(set(y.tolist()) <= {0, 1} for _, y in first)
    _frames(live, pix[new], [int(ds.y[i]) for i in new], len(old))
    after = list(it)  # until the frames stop for idle_timeout
    seen = SeenClasses(10)
    for _, y in [*first, *after]:
        seen.update(y)
    assert seen.sorted() == [0, 1, 2, 3]
    assert len(after) == (6 if replay else 3)
    for x, y in after:
        assert x.shape == (16, 1, 8, 8)
        new_in = [lab for lab in y.tolist() if lab in (2, 3)]
        old_in = [lab for lab in y.tolist() if lab in (0, 1)]
        assert len(new_in) >= 8  # at least the fresh half is the new classes
        assert (len(old_in) > 0) == bool(replay), y.tolist()
    if replay:
        assert src.describe()["replay_peak"] <= replay


def test_cloud_learns_its_classes_from_the_labels_it_trains(artifacts, manifest,
                                                          tmp_path: Path) -> None:
    """The cloud's learner, fed decoded batches as the ingest queues them (no broker):
    the seen set grows with the labels, scores only those classes, and survives a
    checkpoint."""
    from cloud_trainer.config import CloudConfig
    from cloud_trainer.ingest import ActItem
    from cloud_trainer.learner import CloudLearner
    from cloud_trainer.modes.registry import strategy_for
    from toolkit.core.protocol.codec import BatchMeta, codec_for, decode
    from toolkit.core.protocol.quant import QuantScheme

    cfg = CloudConfig(artifacts=artifacts, broker="mqtt://127.0.0.1:1", run_dir=tmp_path,
                      run_id="cil", eval_limit=200)
    learner = CloudLearner(cfg, strategy_for(cfg))
    scheme = QuantScheme.from_dict(manifest.data["quantization"])
    bs = manifest.batch_size

    def feed(seq: int, labels: list[int]) -> None:
        y = torch.tensor(labels * (bs // len(labels)), dtype=torch.int64)
        cut = torch.rand(bs, *manifest.cut_shape)
        msg = codec_for(scheme).encode(cut, y, BatchMeta("cil", "cam", seq, 0, seq), base=scheme)
        learner.train_batch(ActItem(batch=decode(msg), nbytes=len(msg)))

    assert learner.seen.sorted() == []
    feed(0, [0, 1])
    assert learner.seen.sorted() == [0, 1]
    rec = learner.evaluate(None, "test")
    x, y = _digits(manifest)
    keep = y < 2
    learner.step.eval()
    learner.cloud.eval()
    with torch.no_grad():
        ref = float((learner.seen.apply(learner.cloud(learner.step.edge(x[keep]))).argmax(1)
                     == y[keep]).float().mean())
    learner.cloud.train()
    assert rec["full_accuracy"] == pytest.approx(ref)
    feed(1, [2, 3])
    assert learner.seen.sorted() == [0, 1, 2, 3]
    learner.checkpoint()
    again = CloudLearner(cfg, strategy_for(cfg))
    assert again.seen.sorted() == [0, 1, 2, 3]
    # cloud-trainer serve masks with the finished run's summary
    from cloud_trainer.serve import run_seen_classes

    assert run_seen_classes(tmp_path, 10) is None  # no summary yet: no mask
    (tmp_path / "cloud_summary.json").write_text(json.dumps({"seen_classes": [0, 1, 2, 3]}))
    assert run_seen_classes(tmp_path, 10).sorted() == [0, 1, 2, 3]


@pytest.mark.mqtt
def test_a_run_records_its_classes_and_inference_masks_the_rest(artifacts, manifest, broker,
                                                                tmp_path: Path) -> None:
    """``edge-runtime train`` on data of classes 0-2 only (of a 10-class head): the report,
    the weights' sidecar and the retained weights say [0, 1, 2], and ``edge-runtime
    infer`` answers only those."""
    ds = load_dataset(None, "train")
    keep = ds.y < 3
    img = (ds.x[keep][:, 0].numpy() * 255).round().astype(np.uint8)
    test = load_dataset(None, "test")
    npz = tmp_path / "three.npz"
    np.savez(npz, x_train=img, y_train=ds.y[keep].numpy(),
             x_test=(test.x[:, 0].numpy() * 255).round().astype(np.uint8),
             y_test=test.y.numpy())
    run, dev = _uid("run"), "cam-cil"
    report = run_training(TrainConfig(
        artifacts=artifacts, broker=broker.url, device_id=dev, run_id=run, data=str(npz),
        epochs=1, limit=160, quiet=True, connect_timeout=10, state_dir=tmp_path,
        confirm_timeout=0))
    assert report["seen_classes"] == [0, 1, 2]
    weights = Path(report["weights_path"])
    assert load_seen(classes_path(weights), manifest.num_classes).sorted() == [0, 1, 2]
    for source in (weights, "retained"):
        result = run_inference(InferConfig(
            artifacts=artifacts, broker=broker.url, device_id=dev, run_id=run, threshold=0.0,
            limit=60, weights=source, timeout=10, quiet=True, connect_timeout=10,
            report=tmp_path / "infer.json"))
        assert result["seen_classes"] == [0, 1, 2]
        assert result["answered_locally"] == 60  # threshold 0: the exit answers everything
    state = torch.load(weights, weights_only=True)
    engine = InferEngine("executorch", manifest, state,
                         seen=load_seen(classes_path(weights), manifest.num_classes))
    x, _ = _digits(manifest, limit=60)
    preds = {int(engine.run(x[i : i + 1])[1].argmax()) for i in range(len(x))}
    assert preds <= {0, 1, 2}
    assert json.loads((tmp_path / "infer.json").read_text())["seen_classes"] == [0, 1, 2]


@pytest.mark.slow
def test_class_incremental_benchmark_quick(tmp_path: Path) -> None:
    """``benchmarks/class_incremental.py --quick`` end to end (needs the CIFAR-10 copy)."""
    from toolkit.core.data.datasets import shared_cifar10

    if shared_cifar10() is None:
        pytest.skip("no CIFAR-10 copy")
    out = tmp_path / "cil.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this tree, not an installed copy
    argv = [sys.executable, "benchmarks/class_incremental.py", "--quick", "--threads", "1",
            "--out", str(out)]
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert len(data["rows"]) == 15 and set(data["summary"]) == {"joint", "naive", "replay"}
    for r in data["rows"]:
        assert r["edge_seen_classes"] == r["cloud_seen_classes"]
        if r["method"] != "joint":
            assert r["edge_seen_classes"] == list(range(2 * r["increment"] + 2))
    assert out.with_suffix(".png").is_file()
    # a rerun skips every finished row
    again = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and " increment " not in again.stderr, again.stderr[-2000:]
    assert json.loads(out.read_text())["rows"] == data["rows"]
