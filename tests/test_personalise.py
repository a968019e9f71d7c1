"""On-device early-exit personalisation (issue 7): export, ExecuTorch parity, pseudo-labels,
calibration, multi-exit inference and the CLIs.

Real data throughout: a smallcnn backbone is pretrained eagerly on the "general" scikit-learn
digits (all classes, clean; a few seconds), and the personal distribution is four digit classes
seen through a fixed colour tint (toolkit.core.data.personal). One module-scoped export (real
``toolkit export --personalise`` process) serves every test.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edge_runtime.calibrate import calibrate, lowest_threshold, route
from edge_runtime.personalise import (
    PersonalBackend,
    PersonaliseConfig,
    load_personal_split,
    pseudo_targets,
    run_personalise,
)
from toolkit.core.artifacts.personal import load_personal_manifest
from toolkit.core.data.datasets import digits_stats, load_dataset
from toolkit.core.data.personal import pretrain
from toolkit.core.models.personal import PersonalTrainStep

CLASSES = (1, 3, 5, 7)
SHAPE = (3, 8, 8)
BATCH = 16


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> str:
    torch.set_num_threads(1)
    mean, std = digits_stats()
    ds = load_dataset("digits", "train", input_shape=SHAPE)
    net = pretrain("smallcnn", ds, mean=mean * 3, std=std * 3, epochs=4, batch=32)
    path = tmp_path_factory.mktemp("backbone") / "smallcnn_digits.pt"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def artifacts(backbone, tmp_path_factory) -> str:
    from tests.conftest import run_cli

    mean, std = digits_stats()
    out = tmp_path_factory.mktemp("personal") / "art"
    r = run_cli("toolkit", "export", "--personalise", "--model", "smallcnn", "--checkpoint",
                backbone, "--input-shape", "3,8,8", "--mean", ",".join(map(str, mean * 3)),
                "--std", ",".join(map(str, std * 3)), "--batch", str(BATCH),
                "--exit-channels", "16", "--lr", "0.05", "--out", str(out), timeout=900,
                env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "gradient parity with eager PyTorch" in r.stdout
    return str(out)


@pytest.fixture(scope="module")
def personalised(artifacts, tmp_path_factory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("state")
    report = run_personalise(PersonaliseConfig(
        artifacts=artifacts, out=out, classes=CLASSES, shift="tint", labelled=0.1,
        pseudo_threshold=0.9, epochs=6, target_accuracy=0.95, backend="torch", quiet=True))
    return str(out), report


def test_export_manifest_and_gate(artifacts):
    m = load_personal_manifest(artifacts)
    d = m.data
    assert d["spec"]["exit_points"] == ["block1", "block2", "block3"]
    assert d["parity"]["checked"] and d["parity"]["global_rel_grad_error"] < 1e-4
    # only the exits train: the backbone's weights are constants of the program
    assert all(p.startswith("net.exits.") for p in d["programs"]["train"]["parameters"])
    assert len(d["programs"]["segments"]) == 4


def test_personalisation_through_executorch_matches_eager(artifacts):
    """Same batches, same (pseudo-)labels and weights: ExecuTorch and eager SGD trajectories of
    the exit weights agree to 1e-4 (global relative error) after every step."""
    from toolkit.build.parity import global_relative_error

    m = load_personal_manifest(artifacts)
    et, eager = PersonalBackend(m, "executorch"), PersonalBackend(m, "torch")
    ds = load_personal_split(m, "digits", "train", CLASSES, "tint", None, 0)
    gen = torch.Generator().manual_seed(3)
    initial = eager.exit_state()
    for step in range(6):
        idx = torch.randperm(len(ds), generator=gen)[:BATCH]
        w = (torch.rand(BATCH, generator=gen) > 0.4).float()
        loss_et, logits_et = et.step(ds.x[idx], ds.y[idx], w)
        loss_eager, logits_eager = eager.step(ds.x[idx], ds.y[idx], w)
        assert loss_et == pytest.approx(loss_eager, rel=1e-4, abs=1e-5)
        a, b = et.exit_state(), eager.exit_state()
        err = global_relative_error(a, b)
        assert err <= 1e-4, f"step {step}: global relative error {err:.2e}"
        moved = global_relative_error(b, initial)
        assert moved > 1e3 * max(err, 1e-9), "the exits did not train"
        for x, y in zip(logits_et, logits_eager, strict=True):
            assert torch.allclose(x, y, rtol=1e-4, atol=1e-4)
    # the batch forward program with the trained weights agrees with eager too
    fa, fb = et.forward(ds.x[:40]), eager.forward(ds.x[:40])
    for x, y in zip(fa, fb, strict=True):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-4)


def test_pseudo_labels_only_confident_predictions():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.2, 0.1, 0.0], [0.0, 9.0, 0.0], [0.0, 0.1, 0.2]])
    labels = torch.tensor([0, 2, 0, 0])
    labelled = torch.tensor([False, False, False, True])
    targets, w = pseudo_targets(logits, labels, labelled, threshold=0.9)
    assert w.tolist() == [1.0, 0.0, 1.0, 1.0]  # unconfident unlabelled sample ignored
    assert targets[0] == 0 and targets[2] == 1  # the final exit's prediction, right or wrong
    assert targets[3] == 0  # a real label wins over the (unconfident) prediction


def test_ignored_samples_do_not_move_the_exits(artifacts):
    """A weight-0 sample's label cannot change the gradient: unconfident pseudo-labels are
    truly unused by the training program."""
    m = load_personal_manifest(artifacts)
    ds = load_personal_split(m, "digits", "train", CLASSES, "tint", BATCH, 0)
    w = torch.tensor([1.0, 0.0] * (BATCH // 2))
    grads = []
    for flip in (False, True):
        step = PersonalTrainStep(PersonalBackend(m, "torch").net).train()
        y = ds.y.clone()
        if flip:
            y[w == 0] = (y[w == 0] + 1) % 10
        step(ds.x, y, w)[0].backward()
        grads.append(torch.cat([p.grad.flatten() for p in step.parameters()]))
    assert torch.equal(grads[0], grads[1])


def test_personalise_report_counts_confident_pseudo_labels(artifacts, personalised):
    _, r = personalised
    m = load_personal_manifest(artifacts)
    be = PersonalBackend(m, "torch")
    local = load_personal_split(m, "digits", "train", CLASSES, "tint", None, 0)
    from toolkit.core.data.personal import split_holdout

    stream, _ = split_holdout(local, 0.2, 0)
    conf = torch.softmax(be.forward(stream.x)[-1], 1).max(1).values
    from edge_runtime.personalise import _labelled_mask

    labelled = _labelled_mask(len(stream), 0.1, 0)
    assert r["labelled_samples"] == int(labelled.sum()) > 0
    assert r["pseudo_labelled_samples"] == int(((conf >= 0.9) & ~labelled).sum())
    assert r["ignored_samples"] == int(((conf < 0.9) & ~labelled).sum()) > 0
    # personalisation pays off on the personal distribution (held-out local data)
    before, after = r["heldout_accuracy_before"]["final"], r["heldout_accuracy_after"]["block3"]
    assert after > before + 0.1, (before, after)


def test_lowest_threshold_is_the_lowest_meeting_the_target():
    gen = torch.Generator().manual_seed(0)
    conf = torch.rand(300, generator=gen)
    correct = torch.rand(300, generator=gen) < conf  # confident samples are more often right
    t = lowest_threshold(conf, correct, 0.8)
    assert t is not None
    assert correct[conf >= t].float().mean() >= 0.8
    lower = conf[conf < t]
    for u in lower:  # every lower threshold misses the target
        assert correct[conf >= u].float().mean() < 0.8
    assert lowest_threshold(conf, torch.zeros(300, dtype=torch.bool), 0.5) is None


def test_thresholds_meet_the_target_on_new_held_out_data(artifacts, personalised):
    """Calibrated on the held-out share of the local training data; measured on the test split
    (never seen): each early exit's share is target-accurate within 3 binomial standard errors."""
    state_dir, r = personalised
    from edge_runtime.calibrate import ExitPolicy
    from toolkit.core.models.personal import load_exit_state

    policy = ExitPolicy.from_dict(r["policy"])
    target = policy.target_accuracy
    assert target == 0.95
    m = load_personal_manifest(artifacts)
    be = PersonalBackend(m, "torch")
    load_exit_state(be.net, torch.load(f"{state_dir}/exits.pt"), "exits")
    test = load_personal_split(m, "digits", "test", CLASSES, "tint", None, 0)
    logits = be.forward(test.x)
    probs = [torch.softmax(lg, 1) for lg in logits]
    confs = torch.stack([p.max(1).values for p in probs])
    correct = torch.stack([p.argmax(1) == test.y for p in probs])
    where = route(policy, confs)
    checked = 0
    for k in policy.chain()[:-1]:
        n = int((where == k).sum())
        if n < 10:
            continue
        acc = float(correct[k][where == k].float().mean())
        tol = 3 * math.sqrt(target * (1 - target) / n)
        assert acc >= target - tol, f"exit {k}: {acc:.3f} on {n} samples < {target} - {tol:.3f}"
        checked += 1
    assert checked >= 1, "no early exit took enough test samples to check"
    # and the held-out calibration itself meets the target exactly
    again = calibrate(logits, test.y, policy.exit_points, target)
    for k, e in again.calibration["per_exit"].items():
        if k != policy.terminal and e["samples"]:
            assert e["accuracy"] >= target


def test_cli_personalise_and_multi_exit_infer_on_executorch(artifacts, tmp_path, cli):
    state = tmp_path / "state"
    r = cli("edge-runtime", "personalise", "--artifacts", artifacts, "--out", str(state),
            "--classes", "1,3,5,7", "--shift", "tint", "--epochs", "2", "--threads", "1",
            "--target-accuracy", "0.9", timeout=600)
    assert r.returncode == 0, r.stderr
    # its output is captured, not a terminal: no progress bar (toolkit.core.entry.show_progress)
    for bar in ("\r", "step/s", "%|", "it/s"):
        assert bar not in r.stderr and bar not in r.stdout, (bar, r.stderr)
    assert "thresholds for target 0.900" in r.stdout
    assert {p.name for p in state.iterdir()} == {"exits.pt", "policy.json", "report.json"}
    report = tmp_path / "infer.json"
    r = cli("edge-runtime", "infer", "--artifacts", artifacts, "--weights", str(state),
            "--classes", "1,3,5,7", "--shift", "tint", "--limit", "60", "--compare-full",
            "--threads", "1", "--quiet", "--report", str(report), timeout=600)
    assert r.returncode == 0, r.stderr
    assert "multi-exit infer" not in r.stderr  # --quiet: no bar either way
    res = json.loads(report.read_text())
    assert res["samples"] == 60 and res["backend"] == "executorch"
    assert res["baked"] is False  # nothing baked for these artifacts: the shipped segments
    assert sum(e["samples"] for e in res["per_exit"].values()) == 60
    assert res["policy"]["target_accuracy"] == 0.9
    assert res["mean_flops"] < res["full_network"]["flops"] * 1.5
    assert "latency ratio" in r.stdout


def test_old_infer_still_needs_a_broker(tmp_path, cli):
    r = cli("edge-runtime", "infer", "--artifacts", str(tmp_path))
    assert r.returncode == 3  # ExitCode.BAD_INPUT (a HiertrainError; 2 is argparse's)
    assert "needs --broker and --device-id" in r.stderr


def test_export_personalise_needs_a_checkpoint(tmp_path, cli):
    r = cli("toolkit", "export", "--personalise", "--model", "smallcnn", "--out",
            str(tmp_path / "x"))
    assert r.returncode == 3 and "--checkpoint" in r.stderr  # ExitCode.BAD_INPUT
    assert not (tmp_path / "x").exists()


def test_backbone_from_a_hiertrain_full_model_checkpoint(tmp_path):
    """``full_model.pt`` of a hiertrain run (edge./cloud. prefixes, host-stats BN keys) loads
    as the backbone; a checkpoint of another shape is refused with a readable error."""
    from toolkit.core.errors import HiertrainError
    from toolkit.core.models.exits import ExitHeadConfig
    from toolkit.core.models.personal import load_backbone
    from toolkit.core.models.segments import FullModel, build_segments

    built = build_segments("smallcnn", "block1", num_classes=10, input_shape=SHAPE,
                           exit_cfg=ExitHeadConfig(channels=16), seed=5)
    full = FullModel(built.step.edge, built.cloud)
    torch.save(full.state_dict(), tmp_path / "full_model.pt")
    net = load_backbone("smallcnn", tmp_path / "full_model.pt", num_classes=10,
                        input_shape=SHAPE)
    x = torch.rand(4, *SHAPE)
    with torch.no_grad():
        assert torch.allclose(net(x), full.eval()(x), atol=1e-6)
    with pytest.raises(HiertrainError, match="does not fit"):
        load_backbone("smallcnn", tmp_path / "full_model.pt", num_classes=5, input_shape=SHAPE)


BAKE_POLICY = {"exit_points": ["block1", "block2", "block3"], "thresholds": [None, 0.6, 0.5],
               "terminal": "block3"}


@pytest.fixture(scope="module")
def baked(artifacts, personalised, tmp_path_factory) -> tuple[str, str]:
    """A copy of the artifacts baked by a real ``toolkit bake`` process for the personalised
    exits under a policy whose first exit never answers; returns (artifacts, state dir)."""
    from tests.conftest import run_cli

    state_dir, _ = personalised
    root = tmp_path_factory.mktemp("baked")
    art, state = root / "art", root / "state"
    shutil.copytree(artifacts, art)
    state.mkdir()
    shutil.copy(Path(state_dir) / "exits.pt", state / "exits.pt")
    (state / "policy.json").write_text(json.dumps(BAKE_POLICY))
    r = run_cli("toolkit", "bake", "--artifacts", str(art), "--weights", str(state),
                timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "baked 2 segment(s)" in r.stdout, r.stdout
    record = json.loads((art / "baked.json").read_text())
    assert record["keep"] == [1, 2] and [s["exit"] for s in record["segments"]] == [
        "block2", "block3"]
    assert all(s["backend"] == "xnnpack" for s in record["segments"]), record["segments"]
    return str(art), str(state)


def test_baked_early_exit_segments_match_eager(baked):
    """After personalisation the exits are fixed: the policy's segments re-lowered with the
    exit weights as constants (conv heads included, so all of it goes to XNNPACK) skip the
    exits that never answer and give the eager backend's exits and logits sample by sample."""
    from edge_runtime.calibrate import ExitPolicy
    from edge_runtime.multi_exit_infer import MultiExitEngine

    art, state_dir = baked
    m = load_personal_manifest(art)
    state = torch.load(f"{state_dir}/exits.pt", weights_only=True)
    policy = ExitPolicy.from_dict(BAKE_POLICY)
    baked_engine = MultiExitEngine(m, "executorch", state, policy, bake=True)
    auto = MultiExitEngine(m, "executorch", state, policy)  # finds the matching bake itself
    shipped = MultiExitEngine(m, "executorch", state, policy, bake=False)
    eager = MultiExitEngine(m, "torch", state, policy)
    assert baked_engine.baked and auto.baked and not shipped.baked
    assert baked_engine.route == auto.route == eager.route == [1, 2]  # block1: no threshold
    assert shipped.route == [0, 1, 2]  # the shipped programs each carry their exit
    ds = load_personal_split(m, "digits", "test", CLASSES, "tint", 40, 0)
    exits = set()
    for i in range(len(ds)):
        x = ds.x[i:i + 1]
        (kb, lb), (ks, ls), (ke, le) = baked_engine.run(x), shipped.run(x), eager.run(x)
        assert kb == ks == ke
        assert torch.allclose(lb, le, rtol=1e-4, atol=1e-4)
        assert torch.allclose(ls, le, rtol=1e-4, atol=1e-4)
        exits.add(kb)
        assert torch.allclose(baked_engine.run_full(x), eager.run_full(x), rtol=1e-4,
                              atol=1e-4)
    assert exits == {1, 2}, f"the test should see both exits answer, saw {exits}"


# edge-runtime as a board runs it: the build side (torch.export, lowering) cannot be imported
_NO_BUILD = ("import sys; sys.modules['toolkit.build'] = None; "
             "from edge_runtime.cli import main; sys.exit(main(sys.argv[1:]))")


def _edge_without_build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _NO_BUILD, *args], capture_output=True,
                          text=True, timeout=600, cwd=Path(__file__).resolve().parents[1],
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_infer_runs_baked_segments_without_the_build_side(baked, tmp_path):
    """``edge-runtime infer --bake`` on baked artifacts, with ``toolkit.build`` unimportable:
    the board never exports or lowers anything; the baked segments answer."""
    art, state = baked
    guard = subprocess.run([sys.executable, "-c", _NO_BUILD.replace(
        "from edge_runtime.cli import main; sys.exit(main(sys.argv[1:]))",
        "import toolkit.build.personal_export")], capture_output=True, text=True, timeout=120)
    assert guard.returncode != 0 and "ModuleNotFoundError" in guard.stderr  # the guard holds
    report = tmp_path / "infer.json"
    r = _edge_without_build("infer", "--artifacts", art, "--weights", state, "--bake",
                            "--classes", "1,3,5,7", "--shift", "tint", "--limit", "40",
                            "--threads", "1", "--report", str(report))
    assert r.returncode == 0, r.stderr
    res = json.loads(report.read_text())
    assert res["baked"] is True and res["samples"] == 40
    assert res["per_exit"]["block1"]["samples"] == 0  # never evaluated: not in the bake
    assert sum(e["samples"] for e in res["per_exit"].values()) == 40
    assert "multi-exit infer" not in r.stderr and "\r" not in r.stderr  # no bar in a pipe


def test_infer_refuses_a_bake_of_other_weights_or_policy_in_one_line(baked, tmp_path):
    """--bake with exit weights or a policy the bake was not made for is a one-line error
    naming 'toolkit bake'; without --bake the shipped segments run instead; a baked program
    that does not match baked.json is refused."""
    art, state = baked
    r = _edge_without_build("infer", "--artifacts", art, "--weights", state, "--bake",
                            "--threshold", "0.7", "--limit", "5", "--quiet")
    assert r.returncode == 3, r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no baked segments"), err
    assert "toolkit bake" in err[0] and "answers at [0, 1, 2]" in err[0], err
    report = tmp_path / "shipped.json"
    r = _edge_without_build("infer", "--artifacts", art, "--weights", state, "--threshold",
                            "0.7", "--limit", "5", "--quiet", "--report", str(report))
    assert r.returncode == 0, r.stderr
    assert json.loads(report.read_text())["baked"] is False
    bad = tmp_path / "art"
    shutil.copytree(art, bad)
    blob = bytearray((bad / "baked_seg0.pte").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (bad / "baked_seg0.pte").write_bytes(bytes(blob))
    r = _edge_without_build("infer", "--artifacts", str(bad), "--weights", state, "--limit",
                            "5", "--quiet")
    assert r.returncode == 3, r.stderr
    assert "baked_seg0.pte does not match" in r.stderr and "Traceback" not in r.stderr
