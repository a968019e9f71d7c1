"""Bring your own model: torchvision's ImageNet networks and ``package.module:factory``.

Real models, real files and real processes: torchvision's networks split at their named
points and recompose exactly; a module path that a skip connection crosses is refused with
the valid points listed; a user's factory exports through ``toolkit export`` with the parity
gate on and trains end to end over a real broker; ``full_model.pt`` loads into the original
model; pretrained weights come from a local file, a foreign classifier named, not loaded.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from toolkit.core.errors import HiertrainError
from toolkit.core.models import build_model, get_spec
from toolkit.core.models.exits import ExitHeadConfig
from toolkit.core.models.segments import build_segments
from toolkit.core.models.split import model_state_dict, split_model
from toolkit.core.models.zoo import TORCHVISION_SPLITS

tv_models = pytest.importorskip("torchvision.models")

SMALL = (3, 64, 64)  # torchvision's networks run at any size >= 32: quick, same graph

NETS = '''
import torch
from torch import nn


class Block(nn.Module):
    """A residual block: its inner convs are not split points (the skip crosses them)."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.norm = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return torch.relu(x + self.conv2(torch.relu(self.norm(self.conv1(x)))))


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.block1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU())
        self.block2 = Block(8)
        self.pool = nn.MaxPool2d(2)
        self.block3 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.block3(self.pool(self.block2(self.block1(x))))
        return self.fc(torch.flatten(x.mean(dim=(2, 3)), 1))


def make_net(num_classes=10):
    return Net(num_classes)


make_net.input_shape = (1, 8, 8)  # the digits' shape: no --input-shape needed


def wrong_classes():
    return Net(3)
'''


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``mynets.nets`` importable from ``tmp_path`` here and in child processes."""
    pkg = tmp_path / "mynets"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(NETS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])]))
    for name in [m for m in sys.modules if m == "mynets" or m.startswith("mynets.")]:
        monkeypatch.delitem(sys.modules, name)
    return tmp_path


@pytest.mark.parametrize("arch", list(TORCHVISION_SPLITS))
def test_torchvision_models_cut_at_their_named_points_and_recompose(arch):
    name = f"torchvision:{arch}"
    torch.manual_seed(0)
    full = build_model(name, num_classes=7, input_shape=SMALL).eval()
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        want = full(x)
    for point in get_spec(name).splits:
        seg = split_model(full, name, point)
        with torch.no_grad():
            got = seg.cloud(seg.edge(x))
        assert torch.equal(got, want), (arch, point)
        # the two halves keep the original names: together, the original state dict
        assert set(model_state_dict(seg.edge, seg.cloud)) == set(full.state_dict()), point


def test_the_planner_sees_a_traced_model_as_blocks_between_its_split_points():
    """``toolkit plan`` times a torchvision model block by block, as a built-in's stages."""
    from toolkit.core.models.graph_split import chain

    name = "torchvision:resnet50"
    full = build_model(name, num_classes=10, input_shape=SMALL).eval()
    blocks = chain(full, list(get_spec(name).splits), name)
    assert [n for n, _ in blocks] == ["maxpool", "layer1", "layer2", "layer3", "head"]
    x = torch.randn(2, *SMALL)
    h = x
    with torch.no_grad():
        for _, block in blocks:
            h = block(h)
        assert torch.equal(h, full(x))
    with pytest.raises(HiertrainError, match="not in forward order"):
        chain(full, ["layer2", "layer1"], name)


def test_a_split_point_that_a_skip_connection_crosses_is_refused_with_the_valid_ones():
    full = build_model("torchvision:resnet18", num_classes=10, input_shape=SMALL)
    with pytest.raises(HiertrainError) as exc:
        split_model(full, "torchvision:resnet18", "layer1.0.conv1")
    msg = str(exc.value)
    assert "skip connection" in msg and "valid split points: " in msg
    assert "layer1, " in msg and "layer2.0" in msg and "layer1.0.conv1" not in msg.split(":")[-1]
    with pytest.raises(HiertrainError, match="no module has that path"):
        split_model(full, "torchvision:resnet18", "layer9")
    with pytest.raises(HiertrainError, match="computes the model's output"):
        split_model(full, "torchvision:resnet18", "fc")
    with pytest.raises(HiertrainError, match="not a C x H x W feature map"):
        build_segments("torchvision:mobilenet_v3_small", "classifier.0", num_classes=10,
                       input_shape=SMALL,
                       exit_cfg=ExitHeadConfig())


def test_edge_rewrites_keep_the_function_of_squeeze_excitation_and_stochastic_depth():
    """EfficientNet's edge: SE pools become a keep-dim mean, stochastic depth the identity
    (what eval runs); in eval mode the rewritten edge computes what the original does."""
    name = "torchvision:efficientnet_b0"
    torch.manual_seed(0)
    ref = build_model(name, num_classes=10, input_shape=SMALL).eval()
    torch.manual_seed(0)
    built = build_segments(name, "features.3", num_classes=10, input_shape=SMALL,
                           exit_cfg=ExitHeadConfig())
    kinds = {(r.original, r.replacement) for r in built.rewrites}
    assert ("AdaptiveAvgPool2d", "MeanPool2d") in kinds
    assert ("StochasticDepth", "Identity") in kinds
    assert ("BatchNorm2d", "HostStatsBatchNorm2d") in kinds
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        want = ref.features[:4](x)
        got = built.step.edge.eval()(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_full_model_pt_loads_into_the_original_torchvision_model(tmp_path):
    from cloud_trainer.summary import save_final_models

    name = "torchvision:mobilenet_v3_small"
    built = build_segments(name, "features.3", num_classes=5, input_shape=SMALL,
                           exit_cfg=ExitHeadConfig(), seed=3)
    save_final_models(tmp_path, built.step.edge, built.cloud, threading.Lock())
    state = torch.load(tmp_path / "full_model.pt", weights_only=True)
    original = tv_models.mobilenet_v3_small(num_classes=5).eval()
    original.load_state_dict(state)  # strict: every key, the original's names
    x = torch.randn(2, *SMALL)
    with torch.no_grad():
        torch.testing.assert_close(original(x), built.cloud.eval()(built.step.edge.eval()(x)))


def test_pretrained_weights_load_before_the_cut_and_a_foreign_classifier_is_named(tmp_path):
    torch.manual_seed(1)
    imagenet = tv_models.resnet18(num_classes=1000)
    torch.save(imagenet.state_dict(), tmp_path / "resnet18.pth")
    built = build_segments("torchvision:resnet18", "layer1", num_classes=10,
                           input_shape=SMALL, exit_cfg=ExitHeadConfig(),
                           pretrained=tmp_path / "resnet18.pth")
    assert built.pretrained_skipped == ["fc.weight", "fc.bias"]
    assert torch.equal(built.step.edge.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(built.cloud.get_submodule("layer4.1.conv2").weight,
                       imagenet.layer4[1].conv2.weight)
    torch.save(tv_models.mobilenet_v3_small().state_dict(), tmp_path / "other.pth")
    with pytest.raises(HiertrainError, match="does not fit torchvision:resnet18"):
        build_segments("torchvision:resnet18", "layer1", num_classes=10, input_shape=SMALL,
                       exit_cfg=ExitHeadConfig(), pretrained=tmp_path / "other.pth")


def test_your_factory_is_checked_in_one_line(user_package):
    with pytest.raises(HiertrainError, match=r"returns \(1, 3\) for one image, not \(1, 10\)"):
        build_model("mynets.nets:wrong_classes", num_classes=10, input_shape=(1, 8, 8))
    with pytest.raises(HiertrainError, match="cannot import 'nosuch.nets'"):
        get_spec("nosuch.nets:make_net")
    with pytest.raises(HiertrainError, match="has no 'nothing'"):
        get_spec("mynets.nets:nothing")
    with pytest.raises(HiertrainError,
                       match="valid split points: block1.0, block1, block2, pool, block3.0, "):
        build_segments("mynets.nets:make_net", "block2.conv1", num_classes=10,
                       input_shape=(1, 8, 8), exit_cfg=ExitHeadConfig())


@pytest.mark.mqtt
@pytest.mark.slow  # an export with the gate and a run over MQTT, ~45 s: .ci/run runs it (-m slow)
def test_your_factory_exports_with_the_gate_and_trains_end_to_end(user_package, tmp_path, cli,
                                                                   procs):
    """``toolkit export --model mynets.nets:make_net --split block2``, then one edge on its
    ExecuTorch program and the cloud trainer over a real broker, on digits; the run's
    ``full_model.pt`` loads into ``make_net()``."""
    from toolkit.core.data.datasets import digits_stats
    from toolkit.lab.broker import EmbeddedBroker
    from toolkit.lab.launch import start_cloud

    mean, std = digits_stats()
    art = tmp_path / "art"
    res = cli("toolkit", "export", "--model", "mynets.nets:make_net", "--split", "block2",
              "--batch", "32", "--mean", ",".join(map(str, mean)), "--std",
              ",".join(map(str, std)), "--exit-channels", "16", "--out", str(art))
    assert res.returncode == 0, res.stderr
    assert "split at block2" in res.stdout and "from float64" in res.stdout
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["model"]["name"] == "mynets.nets:make_net"
    assert manifest["model"]["input_shape"] == [1, 8, 8]
    assert manifest["parity"]["checked"] and manifest["cut"]["shape"] == [8, 8, 8]

    run, cloud_dir = "byo", tmp_path / "cloud"
    with EmbeddedBroker() as broker:
        cloud = start_cloud(procs, ["cloud_trainer", "--artifacts", str(art), "--broker",
                                    broker.url, "--run-dir", str(cloud_dir), "--run-id", run,
                                    "--devices", "1", "--threads", "1", "--quiet"],
                            broker.url, run)
        edge = procs.start("edge", [
            "edge_runtime", "train", "--artifacts", str(art), "--broker", broker.url,
            "--device-id", "robot-0", "--run-id", run, "--epochs", "3",
            "--report", str(tmp_path / "edge.json"), "--state-dir", str(tmp_path),
            "--threads", "1", "--quiet"])
        procs.wait_all(timeout=300)
    logs = {f.name: f.read_text()[-2000:] for f in tmp_path.glob("*.log")}
    assert edge.returncode == 0 and cloud.returncode == 0, logs
    report = json.loads((tmp_path / "edge.json").read_text())
    summary = json.loads((cloud_dir / "cloud_summary.json").read_text())
    assert report["backend"] == "executorch"
    assert summary["batches_trained"] == report["batches_published"] > 0
    assert summary["full_accuracy"] > 0.5, summary  # 10 classes: chance is 0.1

    from mynets.nets import make_net

    net = make_net(num_classes=10)
    net.load_state_dict(torch.load(cloud_dir / "full_model.pt", weights_only=True))


@pytest.mark.slow
@pytest.mark.parametrize(("arch", "split"), [("mobilenet_v3_small", "features.3"),
                                             ("efficientnet_b0", "features.2")])
def test_torchvision_edge_programs_pass_the_gate(arch, split, tmp_path):
    """Depthwise convs, hardswish, squeeze-excitation (mobilenet), SiLU and stochastic depth
    (efficientnet) through the default lowering, gate on (benchmarks/parity_table.py runs
    every model and split at 224 px)."""
    from toolkit.build.export import ExportConfig, export_artifacts

    m = export_artifacts(ExportConfig(model=f"torchvision:{arch}", out=tmp_path / "a",
                                      split=split, batch=4, input_shape=SMALL))
    parity = m.data["parity"]
    assert parity["checked"]
    assert parity["float64_rel_grad_error"] < 1e-3, parity
