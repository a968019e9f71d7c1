"""A board's process: the edge trains and infers on ExecuTorch with none of torch's own
convolution or matrix kernels and none of the build side, models or lab libraries loaded.

Why it matters: on a Cortex-A72 (Raspberry Pi 4) the package index's torch dies with SIGILL
in those kernels (tests/test_aarch64.py runs the same script there), and a board installs
only ``toolkit/deploy/board-requirements.txt``. Here, on x86, ``tests/board_steps.py``
(training steps, state, inference: what the edge runtime does) runs in a fresh process with
the modules a board does not have made unimportable, under a dispatch mode that records every ATen
operator torch runs eagerly.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = {"digits": True, "batch": 32, "exit_channels": 16, "verify": True,
             "lowering": "xnnpack"}
"""conftest.exported options: test_integration's export (shared in the session)"""

NOT_ON_A_BOARD = ["toolkit.build", "toolkit.plan", "toolkit.lab", "toolkit.deploy", "toolkit.cli",
                  "toolkit.core.models", "cloud_trainer", "torchvision", "sklearn", "matplotlib",
                  "amqtt", "executorch.exir.passes"]
EAGER_COMPUTE = ("convolution", "mm", "addmm", "bmm", "matmul", "linear", "_convolution",
                 "mkldnn", "batch_norm", "native_batch_norm", "max_pool", "avg_pool")

SCRIPT = """
import json, sys
for name in {blocked!r}:
    sys.modules[name] = None  # "import name" now raises ImportError
import torch
from torch.utils._python_dispatch import TorchDispatchMode

class Recorder(TorchDispatchMode):
    ops = set()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        Recorder.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {{}}))

sys.path.insert(0, "tests")
import board_steps
with Recorder():
    board_steps.main([{spec!r}, {out!r}])
print(json.dumps(sorted(Recorder.ops)))
"""


def test_edge_trains_and_infers_without_eager_kernels_or_build_side(artifacts, manifest,
                                                                    tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.save({"x": torch.randn(2, manifest.batch_size, *manifest.input_shape, generator=g),
                "y": torch.randint(0, 10, (2, manifest.batch_size), generator=g),
                "infer_x": torch.randn(3, 1, *manifest.input_shape, generator=g)},
               tmp_path / "inputs.pt")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"cases": [{"name": "smallcnn", "artifacts": str(artifacts),
                                           "inputs": str(tmp_path / "inputs.pt")}]}))
    out = tmp_path / "out.pt"
    script = SCRIPT.format(blocked=NOT_ON_A_BOARD, spec=str(spec), out=str(out))
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ops = json.loads(r.stdout.strip().splitlines()[-1])
    assert ops, "the recorder saw no operator at all: it did not record"
    assert not [op for op in ops if op.startswith(EAGER_COMPUTE)], ops
    got = torch.load(out, weights_only=True)["cases"]["smallcnn"]
    assert len(got["losses"]) == 2 and got["infer_logits"].shape == (3, manifest.num_classes)


def _names(lines: list[str]) -> set[str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    return {canonicalize_name(Requirement(line).name)
            for line in (raw.split("#")[0].strip() for raw in lines) if line}


def test_board_install_list_is_the_base_install_plus_its_no_deps_closure():
    """toolkit/deploy/board-requirements.txt (installed with --no-deps) and pyproject's base
    dependencies say the same thing; the board list adds only what --no-deps would otherwise
    miss."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    base = _names(project["dependencies"])
    board = _names((REPO / "toolkit/deploy/board-requirements.txt").read_text().splitlines())
    assert base <= board, base - board
    assert board - base == {"typing-extensions", "jsonschema-specifications", "referencing",
                            "rpds-py", "attrs"}
    for heavy in ("torchvision", "matplotlib", "scikit-learn", "amqtt", "pillow"):
        assert heavy not in board and heavy not in base
        assert heavy in _names(project["optional-dependencies"]["all"])


def test_a_lean_install_names_the_extra_it_lacks(monkeypatch):
    import pytest

    from toolkit.core.errors import HiertrainError
    from toolkit.core.models import build_model

    monkeypatch.setitem(sys.modules, "torchvision.models.vgg", None)  # as if not installed
    with pytest.raises(HiertrainError, match=r"vgg16 model needs torchvision.*hiertrain\[cloud"):
        build_model("vgg16", num_classes=10, input_shape=(3, 32, 32))


def test_an_edge_state_that_does_not_fit_is_one_line_naming_the_key(manifest):
    import pytest

    from edge_runtime.host_state import check_state, initial_state
    from toolkit.core.errors import HiertrainError

    ref = initial_state(manifest)
    key = next(iter(ref))
    with pytest.raises(HiertrainError, match=rf"^the state does not fit .*: missing {key}$"):
        check_state(ref, {k: v for k, v in ref.items() if k != key}, "the state")
    with pytest.raises(HiertrainError, match=r": unexpected extra\.weight$"):
        check_state(ref, {**ref, "extra.weight": torch.zeros(1)}, "the state")
    bad = {**ref, key: torch.zeros(3, 3, 3, 3, 3)}
    with pytest.raises(HiertrainError, match=rf"{key} has shape \[3, 3, 3, 3, 3\], the model's"):
        check_state(ref, bad, "the state")


def test_digits_without_scikit_learn_says_what_to_pass_instead(monkeypatch):
    import pytest

    from toolkit.core.data import datasets
    from toolkit.core.errors import HiertrainError

    monkeypatch.setattr(datasets, "_digits_csv", lambda: None)  # as on a board: no sklearn
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    datasets._digits_arrays.cache_clear()
    try:
        with pytest.raises(HiertrainError, match="comes with scikit-learn.*pass --data"):
            datasets.load_dataset("digits", "train")
    finally:
        datasets._digits_arrays.cache_clear()
