"""The edge runtime on 64-bit ARM: x86-exported programs train and infer the same on aarch64.

Runs the board's Python under qemu user-mode emulation (``.ci/aarch64-env.sh`` builds it:
Debian's arm64 Python 3.11 with the package index's aarch64 torch and executorch), on the
Raspberry Pi 4's core (Cortex-A72, ARMv8.0) and on a Pi 5 / Jetson-class core (Cortex-A76,
ARMv8.2). Marker ``aarch64``: not in the default suite; ``.ci/run`` builds the environment
(cached under /var/cache) and runs ``python -m pytest -m aarch64``. Without the
environment these tests fail, naming the script, rather than skip.

- The same artifacts (small CNN and a VGG-16 split; XNNPACK, the default lowering, and the
  portable kernels) and the same batches, run by ``tests/board_steps.py`` on x86 and on
  each core: per-step losses and gradients within the export parity bar (1e-4 global
  relative error; toolkit/build/parity.py), and the inference program gives the same exit
  logits and answers.
- One ht run end to end, installed and started as docs/deploy.md says: ``toolkit bundle``,
  hiertrain's wheel from the bundle installed with ``pip install --no-deps`` (beside
  ``board-requirements.txt``, which the emulated environment is built from), INSTALL.md's
  artifact check, then the systemd unit's own command line, run outside the source tree:
  an emulated aarch64 edge -> mosquitto on 127.0.0.1 -> the x86 cloud trainer; every batch
  the edge published is trained exactly once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import run_cli, unit_argv
from toolkit.build.parity import global_relative_error
from toolkit.lab.launch import ProcessGroup, start_cloud

pytestmark = [pytest.mark.aarch64, pytest.mark.mosquitto]

REPO = Path(__file__).resolve().parents[1]
ENV_DIR = Path(os.environ.get("HT_AARCH64_ENV", "/var/cache/hiertrain/aarch64"))
CORES = ["cortex-a72", "cortex-a76"]
STEPS = 3
INFER_SAMPLES = 4
TOL = 1e-4  # the export parity bar (tests/test_export_parity.py)
EMULATED_TIMEOUT_S = 1200

# name -> conftest.exported options
CASES = {
    "smallcnn-xnnpack": {"digits": True, "batch": 16, "lowering": "xnnpack"},
    "smallcnn-portable": {"digits": True, "batch": 16, "lowering": "portable"},
    "vgg16-stage1-xnnpack": {"model": "vgg16", "split": "stage1", "input_shape": (3, 32, 32),
                             "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "batch": 2,
                             "lowering": "xnnpack"},
    "vgg16-stage1-portable": {"model": "vgg16", "split": "stage1", "input_shape": (3, 32, 32),
                              "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "batch": 2,
                              "lowering": "portable"},
}
E2E_BATCHES = 8
E2E_BATCH = 16


@pytest.fixture(scope="session")
def board_python() -> Path:
    """The emulated aarch64 Python; a failure (not a skip) when it was not built."""
    python = ENV_DIR / "python"
    if not os.access(python, os.X_OK):
        pytest.fail(f"no emulated aarch64 Python at {python}: run .ci/aarch64-env.sh "
                    f"{ENV_DIR} first (or set HT_AARCH64_ENV)", pytrace=False)
    return python


def _run(argv: list[str], env: dict[str, str], timeout: float) -> float:
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, (argv, proc.returncode, proc.stderr[-3000:])
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def reference(exported, tmp_path_factory) -> tuple[Path, dict]:
    """The cases' artifacts and batches in a spec, and what x86 computes from them."""
    tmp = tmp_path_factory.mktemp("board-steps")
    cases = []
    for i, (name, options) in enumerate(CASES.items()):
        artifacts = exported(**options)
        from toolkit.core.artifacts.manifest import load_manifest

        m = load_manifest(artifacts)
        g = torch.Generator().manual_seed(100 + i)
        inputs = {
            "x": torch.randn(STEPS, m.batch_size, *m.input_shape, generator=g),
            "y": torch.randint(0, m.num_classes, (STEPS, m.batch_size), generator=g),
            "infer_x": torch.randn(INFER_SAMPLES, 1, *m.input_shape, generator=g),
        }
        torch.save(inputs, tmp / f"{name}.pt")
        cases.append({"name": name, "artifacts": str(artifacts), "inputs": str(tmp / f"{name}.pt")})
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"cases": cases}))
    _run([sys.executable, "tests/board_steps.py", str(spec), str(tmp / "x86.pt")], {}, 600)
    return spec, torch.load(tmp / "x86.pt", weights_only=True)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return global_relative_error({"t": a}, {"t": b})


@pytest.mark.parametrize("core", CORES)
def test_programs_train_and_infer_as_on_x86(core, board_python, reference, tmp_path):
    spec, ref = reference
    out = tmp_path / "aarch64.pt"
    took = _run([str(board_python), "tests/board_steps.py", str(spec), str(out)],
                {"HT_QEMU_CPU": core, "PYTHONPATH": str(REPO)}, EMULATED_TIMEOUT_S)
    got = torch.load(out, weights_only=True)
    assert got["machine"] == "aarch64" and ref["machine"] == "x86_64"
    worst = {}
    for name, r in ref["cases"].items():
        g = got["cases"][name]
        assert len(g["losses"]) == STEPS
        losses = _rel(torch.tensor(g["losses"]), torch.tensor(r["losses"]))
        grads = max(global_relative_error(gs, rs) for gs, rs in zip(g["grads"], r["grads"],
                                                                     strict=True))
        state = global_relative_error(g["state"], r["state"])
        assert set(g["state"]) == set(r["state"])
        logits = _rel(g["infer_logits"], r["infer_logits"])
        assert losses < TOL and grads < TOL and state < TOL, (name, losses, grads, state)
        assert logits < TOL and _rel(g["infer_cut"], r["infer_cut"]) < TOL, (name, logits)
        assert torch.equal(g["infer_logits"].argmax(1), r["infer_logits"].argmax(1)), name
        assert _rel(g["cut"], r["cut"]) < TOL and _rel(g["exit_logits"], r["exit_logits"]) < TOL
        worst[name] = {"loss": losses, "grads": grads, "state": state, "infer": logits,
                       "seconds": g["seconds"]}
    print(f"\n{core}: {len(CASES)} programs x {STEPS} steps, {took:.0f} s emulated; "
          + json.dumps(worst, indent=1))


def _digits_npz(path: Path, train: int) -> Path:
    """The digits as a .npz (``train`` training samples): a board has no scikit-learn, so it
    gets its data as a file."""
    from toolkit.core.data.datasets import load_dataset

    arrays = {}
    for split in ("train", "test"):
        ds = load_dataset("digits", split, limit=train if split == "train" else None)
        arrays[f"x_{split}"] = (ds.x[:, 0].numpy() * 255).round().astype(np.uint8)
        arrays[f"y_{split}"] = ds.y.numpy()
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def broker():
    from toolkit.lab.broker import MosquittoBroker

    with MosquittoBroker().start(timeout=10) as b:
        yield b


def _install_bundle(artifacts: Path, tmp: Path) -> tuple[Path, Path, Path]:
    """``toolkit bundle`` for rpi4, unpacked, its wheel installed with ``pip install --no-deps``
    (a pure-Python wheel: x86 pip installs the same files an aarch64 pip would) and the files
    put in place as INSTALL.md says; (the unpacked bundle, the install prefix, site dir)."""
    bundle = tmp / "edge-bundle.tar.gz"
    r = run_cli("toolkit", "bundle", "--board", "rpi4", "--artifacts", str(artifacts), "--out",
                str(bundle), timeout=300)
    assert r.returncode == 0, r.stderr
    with tarfile.open(bundle) as tar:
        tar.extractall(tmp / "unpacked", filter="data")
    root = tmp / "unpacked" / "hiertrain-edge"
    (wheel,) = root.glob("hiertrain-*.whl")
    site = tmp / "venv-site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--quiet",
          "--target", str(site), str(wheel)], {}, 300)
    prefix = tmp / "opt"
    prefix.mkdir()
    shutil.copytree(root / "artifacts", prefix / "artifacts")
    shutil.copy2(root / "board.yaml", prefix / "board.yaml")
    return root, prefix, site


@pytest.mark.parametrize("core", CORES)
def test_ht_run_with_an_aarch64_edge_installed_from_the_bundle(core, board_python, exported,
                                                                broker, tmp_path):
    artifacts = exported(**{**CASES["smallcnn-xnnpack"], "batch": E2E_BATCH})
    root, prefix, site = _install_bundle(artifacts, tmp_path)
    board_env = {"HT_QEMU_CPU": core, "PYTHONPATH": str(site)}  # the installed copy, not REPO
    install = (root / "INSTALL.md").read_text()
    check = re.search(r'python -c "(.*?)"', install.replace("\\\n", ""), re.S).group(1)
    out = subprocess.run([str(board_python), "-c", check.replace("/opt/hiertrain", str(prefix))],
                         cwd=tmp_path, env={**os.environ, **board_env}, capture_output=True,
                         text=True, timeout=EMULATED_TIMEOUT_S)
    assert out.returncode == 0 and "artifacts ok" in out.stdout, out.stderr[-2000:]
    run = f"a64-{core}"
    env = {"HIERTRAIN_BROKER": broker.url, "HIERTRAIN_DEVICE_ID": "pi", "HIERTRAIN_RUN_ID": run,
           "HIERTRAIN_DATA": str(_digits_npz(tmp_path / "digits.npz", E2E_BATCHES * E2E_BATCH)),
           "HIERTRAIN_EPOCHS": "1"}
    state = tmp_path / "state"
    argv = unit_argv(root, env, prefix, state, python=str(board_python))
    with ProcessGroup(tmp_path / "logs", cwd=tmp_path) as procs:
        cloud = start_cloud(procs, ["cloud_trainer", "--artifacts", str(artifacts), "--broker",
                                    broker.url, "--run-dir", str(tmp_path / "cloud"),
                                    "--run-id", run, "--devices", "1", "--threads", "1",
                                    "--quiet"], broker.url, run)
        t0 = time.monotonic()
        edge = procs.start_command("edge", argv, board_env)
        procs.wait_all(timeout=EMULATED_TIMEOUT_S)
        logs = {f.name: f.read_text()[-3000:] for f in (tmp_path / "logs").glob("*.log")}
        assert edge.returncode == 0 and cloud.returncode == 0, logs
    report = json.loads((state / "last-run.json").read_text())
    summary = json.loads((tmp_path / "cloud" / "cloud_summary.json").read_text())
    assert report["machine"] == "aarch64" and report["backend"] == "executorch", report
    assert report["batches_published"] == E2E_BATCHES
    assert report["config"]["board"] == f"{prefix}/board.yaml" and report["config"]["resume"]
    dev = summary["per_device"]["pi"]
    assert dev["published"] == dev["trained"] == E2E_BATCHES, dev  # every batch, exactly once
    print(f"\n{core}: ht run from the bundle's install, {E2E_BATCHES} batches trained once, "
          f"edge setup {report['setup_s']:.0f} s, edge process {time.monotonic() - t0:.0f} s "
          "emulated")
