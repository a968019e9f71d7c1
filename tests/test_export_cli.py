"""``toolkit export`` / ``models`` / ``boards`` as a user runs them: real processes, real files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.core.artifacts.manifest import load_manifest, schema, sha256_file, validate
from toolkit.core.errors import ManifestError
from toolkit.core.models.exits import ExitHeadConfig

SMALL = ["--model", "smallcnn", "--batch", "4", "--input-shape", "3,16,16"]


@pytest.fixture(scope="module")
def cli_export(tmp_path_factory):
    """The export made through the real `toolkit export --force` command over an earlier
    output: these tests read its output as well as its files (the shared `exported` fixture
    exports in process)."""
    from tests.conftest import run_cli

    out = tmp_path_factory.mktemp("art") / "small"
    out.mkdir()
    (out / "stale.txt").write_text("an earlier export's leftover")  # --force replaces it
    r = run_cli("toolkit", "export", *SMALL, "--board", "rpi4", "--out", str(out), "--force")
    assert r.returncode == 0, r.stderr
    return out, r


def test_export_writes_every_artifact_and_a_valid_manifest(cli_export):
    out, r = cli_export
    assert "wrote" in r.stdout and "gradient parity with eager PyTorch" in r.stdout
    names = {p.name for p in out.iterdir()}
    assert names == {"edge_train.pte", "edge_infer.pte", "edge_init.pt", "cloud_init.pt",
                     "manifest.json"}
    data = json.loads((out / "manifest.json").read_text())
    validate(data)
    for name, entry in data["artifacts"].items():
        assert sha256_file(out / name) == entry["sha256"]
        assert (out / name).stat().st_size == entry["bytes"]
    assert data["parity"]["checked"] and data["parity"]["global_rel_grad_error"] < 1e-4
    assert data["programs"]["edge_train"]["outputs"][0]["name"] == "loss"
    # the default lowering: convolutions as matrix products run by XNNPACK (docs/export.md)
    assert data["programs"]["edge_train"]["lowering"] == {"convolutions": "xnnpack",
                                                          "layout": "channel_major"}
    assert data["cut"]["shape"] == [16, 8, 8]
    assert data["cut"]["int8_bytes_per_sample"] * 4 == data["cut"]["float32_bytes_per_sample"]
    assert {r["from"] for r in data["rewrites"]} >= {"BatchNorm2d", "MaxPool2d"}
    assert data["versions"]["executorch"] == "1.5.1"
    assert data["quantization"]["bits"] == 8
    assert load_manifest(out).batch_size == 4


def test_exported_program_trains_in_a_fresh_process_without_the_build_stack(cli_export):
    out, _ = cli_export
    script = f"""
import torch
from toolkit.core.artifacts.manifest import load_manifest
from toolkit.core.et_program import TrainingProgram
m = load_manifest({str(out)!r})
prog = TrainingProgram.from_file(m.path("edge_train.pte"))
g = torch.Generator().manual_seed(0)
x = torch.randn(4, 3, 16, 16, generator=g); y = torch.tensor([0, 1, 2, 3])
losses = []
opt = None
for _ in range(15):
    outs = prog.forward_backward(x, y)
    opt = opt or prog.sgd(0.05, 0.9)
    opt.step(prog.named_gradients())
    losses.append(float(outs[0]))
assert outs[1].shape == (4, 16, 8, 8) and outs[2].shape == (4, 10)
# The runtime loaded without ExecuTorch's build stack (toolkit.core.et_program), which
# still loads in full afterwards in the same process.
import sys
assert "executorch.exir" not in sys.modules and "executorch.exir.passes" not in sys.modules
from executorch.exir import to_edge
print(losses[0], losses[-1])
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    first, last = map(float, r.stdout.split())
    assert last < 0.5 * first  # it learns the fixed batch


def test_inference_program_runs_with_given_weights(cli_export):
    import torch

    from toolkit.core.et_program import InferenceProgram
    from toolkit.core.models.segments import load_segments

    out, _ = cli_export
    m = load_manifest(out)
    built = load_segments(m)
    infer = built.infer_module().eval()
    prog = InferenceProgram.from_file(m.path("edge_infer.pte"))
    state = {**dict(infer.named_parameters()), **dict(infer.named_buffers())}
    weights = [state[n].detach() for n in m.data["programs"]["edge_infer"]["weights"]]
    x = torch.randn(1, 3, 16, 16)
    cut, logits = prog.run(x, *weights)
    ref_cut, ref_logits = infer(x)
    assert torch.allclose(cut, ref_cut, atol=1e-5)
    assert torch.allclose(logits, ref_logits, atol=1e-5)
    # New weights change the answer: the program really takes them as inputs.
    weights2 = [w * 1.5 if w.dim() > 1 else w for w in weights]
    assert not torch.allclose(prog.run(x, *weights2)[1], logits)


def test_tampered_artifact_is_detected(cli_export, tmp_path):
    import shutil

    out, _ = cli_export
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(copy / "cloud_init.pt", "ab") as f:
        f.write(b"x")
    with pytest.raises(ManifestError, match="does not match the manifest"):
        load_manifest(copy)
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="cannot read"):
        load_manifest(copy)


def test_manifest_schema_rejects_wrong_fields(cli_export):
    out, _ = cli_export
    data = json.loads((out / "manifest.json").read_text())
    for mutate in (
        lambda d: d.pop("artifacts"),
        lambda d: d["model"].__setitem__("num_classes", 1),
        lambda d: d["quantization"].__setitem__("bits", 3),
        lambda d: d.__setitem__("schema_version", 99),
    ):
        bad = json.loads(json.dumps(data))
        mutate(bad)
        with pytest.raises(ManifestError):
            validate(bad)
    assert schema()["properties"]["schema_version"]["const"] == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "alexnet"], "unknown model 'alexnet'; choose one of"),
        (["--model", "resnet18", "--split", "layer9"], "unknown split point 'layer9'"),
        (["--model", "smallcnn", "--board", "cray"], "unknown board 'cray'"),
        (["--model", "vgg16", "--input-shape", "3,16,16"], "too small for vgg16"),
        (["--model", "smallcnn", "--input-shape", "1,16,16"], "give --mean and --std"),
        (["--model", "resnet18", "--split", "layer3", "--board", "rpi4",
          "--batch", "1024"], "over the rpi4 budget of 2048 MB; use --batch"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_nothing(cli_in_process, tmp_path, args, message):
    out = tmp_path / "out"
    r = cli_in_process("toolkit", "export", *args, "--out", str(out))
    assert r.returncode == 3
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert list(tmp_path.iterdir()) == []  # no partial output, no temp dirs


def test_existing_output_needs_force(cli_in_process, cli_export, tmp_path):
    out, _ = cli_export
    r = cli_in_process("toolkit", "export", *SMALL, "--out", str(out))
    assert r.returncode == 3 and "already exists; pass --force" in r.stderr


def test_force_replaces_atomically(cli_export):
    """The module's export was made with --force over a directory holding a stale file."""
    out, _ = cli_export
    assert not (out / "stale.txt").exists() and (out / "manifest.json").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["small"]  # no temp dirs left


def test_output_under_a_file_is_refused(cli_in_process, tmp_path):
    """Unwritable output (even for root): a path below a regular file."""
    f = tmp_path / "file"
    f.write_text("")
    r = cli_in_process("toolkit", "export", *SMALL, "--out", str(f / "out"))
    assert r.returncode == 3 and "cannot write" in r.stderr
    assert "Traceback" not in r.stderr


def test_models_json_lists_models_and_split_costs(cli, cli_in_process):
    r = cli("toolkit", "models", "--json")
    assert r.returncode == 0, r.stderr
    models = {m["name"]: m for m in json.loads(r.stdout)}
    assert set(models) == {"smallcnn", "vgg16", "vgg11_quarter", "resnet18"}
    rn = {s["split"]: s for s in models["resnet18"]["splits"]}
    assert list(rn) == ["stem", "layer1", "layer2", "layer3"]
    assert rn["layer1"]["cut_shape"] == [64, 32, 32]
    assert rn["layer1"]["cut_float32_bytes"] == 64 * 32 * 32 * 4
    assert rn["layer1"]["cut_int8_bytes"] == 64 * 32 * 32
    # Deeper splits hold more parameters and cost more FLOPs on the edge.
    params = [s["edge_params"] for s in rn.values()]
    flops = [s["edge_flops"] for s in rn.values()]
    assert params == sorted(params) and flops == sorted(flops)
    # A 3x3 conv 3->64 on 32x32 is 2*27*64*1024 FLOPs: the stem's count includes it.
    assert rn["stem"]["edge_flops"] >= 2 * 27 * 64 * 1024
    text = cli_in_process("toolkit", "models")
    assert text.returncode == 0 and "resnet18" in text.stdout and "int8 B/smp" in text.stdout


def test_boards_are_listed_and_valid(cli):
    r = cli("toolkit", "boards", "--json")
    assert r.returncode == 0, r.stderr
    boards = {b["name"]: b for b in json.loads(r.stdout)}
    assert {"rpi4", "rpi5", "jetson-orin-nano"} <= set(boards)
    assert boards["rpi4"]["total_mb"] == 4096


def test_board_profile_from_a_path_and_its_errors(tmp_path):
    from toolkit.core.artifacts.boards import load_board
    from toolkit.core.errors import HiertrainError

    good = Path(__file__).resolve().parents[1] / "firmware_configs" / "rpi4.yaml"
    p = tmp_path / "mine.yaml"
    p.write_text(good.read_text().replace("budget_mb: 2048", "budget_mb: 9999"))
    with pytest.raises(HiertrainError, match="exceeds total_mb"):
        load_board(str(p))
    p.write_text(good.read_text().replace("schema_version: 1", "schema_version: 2"))
    with pytest.raises(HiertrainError, match="schema_version"):
        load_board(str(p))
    p.write_text("name: [")
    with pytest.raises(HiertrainError, match="not valid YAML"):
        load_board(str(p))
    p.write_text(good.read_text())
    assert load_board(str(p)).name == "rpi4"


def test_a_program_with_wrong_gradients_is_refused_in_one_line(cli_in_process, tmp_path,
                                                                monkeypatch):
    """The parity gate end to end through the CLI: without torch's decomposition of the
    max-pool backward, ExecuTorch 1.5.1's kernel gives wrong gradients (docs/export.md), and
    `toolkit export` refuses the program, naming what is wrong, and writes nothing."""
    import toolkit.build.lowering as lowering

    monkeypatch.setattr(lowering, "BACKWARD_DECOMPOSITIONS", [])
    out = tmp_path / "out"
    r = cli_in_process("toolkit", "export", "--model", "smallcnn", "--split", "block2",
                       "--input-shape", "3,16,16", "--batch", "4", "--exit-channels", "8",
                       "--lowering", "portable", "--out", str(out))
    assert r.returncode == 3, r.stdout + r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr  # one line, after the export's progress lines
    assert errors[0].startswith("error: the lowered training program's gradients are wrong")
    assert "from float64" in errors[0] and "move the split point" in errors[0]
    assert "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # two lowerings and two gates, ~20 s: .ci/run runs it (-m slow)
def test_an_xnnpack_program_refused_by_the_gate_falls_back_to_matmul(tmp_path, monkeypatch):
    """When the gate refuses the XNNPACK program (an XNNPACK kernel less precise than
    ExecuTorch's own: EfficientNet-B0 at 224 px), the export lowers the same program without
    XNNPACK, checks it again, and records why."""
    import toolkit.build.export as export

    real_gate, seen = export._gate, []

    def gate(buffer, built, batches):
        report, failure = real_gate(buffer, built, batches)
        seen.append(failure)
        return report, ("pretend: XNNPACK imprecise" if len(seen) == 1 else failure)

    monkeypatch.setattr(export, "_gate", gate)
    m = export.export_artifacts(export.ExportConfig(
        model="smallcnn", out=tmp_path / "a", split="block1", batch=4,
        input_shape=(3, 16, 16), exit=ExitHeadConfig(channels=8)))
    assert seen == [None, None]  # both programs were checked, and both are right
    assert m.data["parity"]["xnnpack_refused"] == "pretend: XNNPACK imprecise"
    assert m.data["programs"]["edge_train"]["lowering"]["convolutions"] == "matmul"
    assert m.data["parity"]["checked"]
