"""The exit head's grid pooling (``ExitHeadConfig.pool``, ``toolkit export --exit-pool``).

The grid is a reshape and a mean (ExecuTorch lacks the adaptive-average-pool backward),
or a mean per slice where the grid does not divide the map, so it must equal torch's
adaptive pooling in eager, keep its gradients exact through the exported program on each
lowering (the default one runs the head channel-major), reach the manifest and the
cloud's rebuilt head, and refuse a grid larger than the feature map.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch.nn import functional as F

from toolkit.build.export import ExportConfig, export_artifacts
from toolkit.build.fastconv import ChannelMajorGlobalAvgPool
from toolkit.build.lowering import fast_train_step, lower_train_step
from toolkit.build.parity import check_batches
from toolkit.core.artifacts.manifest import load_manifest
from toolkit.core.errors import HiertrainError
from toolkit.core.et_program import TrainingProgram
from toolkit.core.models.exits import ExitHeadConfig, GlobalAvgPool
from toolkit.core.models.segments import build_segments, load_segments

SHAPE = (3, 32, 32)


def _data(batch: int, i: int):
    g = torch.Generator().manual_seed(40 + i)
    return torch.randn(batch, *SHAPE, generator=g), torch.randint(0, 10, (batch,), generator=g)


def test_grid_pool_equals_adaptive_average_pooling():
    for hw in ((8, 12), (7, 5), (3, 3)):  # divisible, uneven cells, cells of one pixel
        x = torch.randn(3, 5, *hw)
        for grid in (1, 2, 3):
            want = F.adaptive_avg_pool2d(x, grid).flatten(1)
            assert torch.allclose(GlobalAvgPool(grid)(x), want, atol=1e-6), (hw, grid)
            # the channel-major form ([C, N, H, W] in) gives the same features in the same order
            cm = ChannelMajorGlobalAvgPool(grid)(x.transpose(0, 1).contiguous())
            assert torch.allclose(cm, want, atol=1e-6), (hw, grid)


def test_a_pooled_head_has_a_grid_times_wider_linear_layer():
    built = build_segments("smallcnn", "block1", num_classes=10, input_shape=SHAPE,
                           exit_cfg=ExitHeadConfig(channels=16, pool=2), seed=0)
    linear = list(built.step.exit.children())[-1]
    assert linear.in_features == 16 * 4
    x, y = _data(4, 0)
    assert built.step.exit(built.step.edge(x)).shape == (4, 10)


# 16x16 exit maps (whole cells), and 6x6 ones from a stride-3 exit conv: 3x3 grid cells of
# 2x2, then a 4x4 grid of uneven cells (the per-slice path)
@pytest.mark.parametrize(("lowering", "stride", "pool"),
                         [("xnnpack", 1, 2), ("portable", 1, 2), ("xnnpack", 3, 4)])
def test_pooled_exit_gradients_match_eager(lowering, stride, pool):
    built = build_segments("smallcnn", "block1", num_classes=10, input_shape=SHAPE,
                           exit_cfg=ExitHeadConfig(channels=16, stride=stride, pool=pool),
                           seed=0)
    if lowering == "xnnpack":  # the default lowering runs this head channel-major
        assert fast_train_step(built.step)[1] == "channel_major"
    x, y = _data(4, 0)
    program = lower_train_step(copy.deepcopy(built.step), x, y, lowering=lowering)
    report = check_batches(TrainingProgram(program.buffer), built.step,
                           [_data(4, i) for i in (1, 2, 3)])
    assert report.global_error < 1e-4, report.worst()
    exit_grads = [k for k in report.grad_errors if k.startswith("exit.")]
    assert exit_grads and max(report.grad_errors[k] for k in exit_grads) < 1e-3


def test_a_grid_larger_than_the_map_is_refused_in_one_line():
    # smallcnn's block1 cut is 16x16; a stride-3 exit conv makes it 6x6: no 7x7 grid
    with pytest.raises(HiertrainError, match=r"exit head pool 7 .* 6x6 feature map") as err:
        build_segments("smallcnn", "block1", num_classes=10, input_shape=SHAPE,
                       exit_cfg=ExitHeadConfig(channels=16, stride=3, pool=7), seed=0)
    assert "\n" not in str(err.value)
    with pytest.raises(HiertrainError, match="pool must be >= 1"):
        ExitHeadConfig(pool=0)


def test_the_pool_reaches_the_manifest_and_the_rebuilt_segments(tmp_path):
    out = tmp_path / "art"
    export_artifacts(ExportConfig(model="smallcnn", split="block1", out=out, batch=4,
                                  input_shape=SHAPE, exit=ExitHeadConfig(channels=8, pool=2)))
    manifest = load_manifest(out)
    assert json.loads((out / "manifest.json").read_text())["exit_head"]["pool"] == 2
    rebuilt = load_segments(manifest)  # what the cloud and the edge build from the manifest
    assert list(rebuilt.step.exit.children())[-1].in_features == 8 * 4
    # the default head pools to 2x2; global pooling leaves the field out (manifests stay
    # readable by older runtimes) and a manifest without it is read as global pooling
    assert ExitHeadConfig().pool == 2
    plain = ExitHeadConfig(channels=8, pool=1).to_dict()
    assert "pool" not in plain and ExitHeadConfig.from_dict(plain).pool == 1


@pytest.mark.parametrize(("pool", "message"), [
    ("0", "error: exit head pool must be >= 1, got 0"),
    ("9", "error: exit head pool 9 is larger than the exit's 8x8 feature map"),
])
def test_toolkit_export_refuses_a_bad_exit_pool_in_one_line(cli_in_process, tmp_path, pool,
                                                            message):
    # smallcnn's block1 cut of a 16x16 input is 8x8: the exit sees 8x8 at stride 1
    out = tmp_path / "out"
    r = cli_in_process("toolkit", "export", "--model", "smallcnn", "--split", "block1",
                       "--input-shape", "3,16,16", "--batch", "4", "--exit-pool", pool,
                       "--out", str(out))
    assert r.returncode != 0
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(message), r.stderr
    assert "Traceback" not in r.stderr and not out.exists()
