"""Malformed files and messages besides activation batches: manifests, board profiles,
checkpoints, weight files and messages, status messages. Each gives one line naming the
thing and what is wrong, and nothing pickled from outside ever runs (``weights_only``)."""

from __future__ import annotations

import io
import json
import pathlib
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli
from toolkit.core.artifacts.boards import load_board
from toolkit.core.artifacts.manifest import load_manifest
from toolkit.core.errors import HiertrainError, ManifestError, WireError
from toolkit.core.protocol.messages import Status, decode_status, decode_weights, encode_weights

pytestmark = pytest.mark.security


def _one_line(exc: BaseException, *names: object) -> str:
    text = str(exc)
    assert "\n" not in text, text
    for name in names:
        assert str(name) in text, (name, text)
    return text


class Payload:
    """Unpickling this would create a file: the test of "no pickle of untrusted data"."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (pathlib.Path.touch, (self.marker,))


def _evil(tmp_path: Path, name: str) -> tuple[Path, Path]:
    marker = tmp_path / f"{name}-ran"
    path = tmp_path / f"{name}.pt"
    torch.save({"weight": torch.zeros(2), "x": Payload(marker)}, path)
    return path, marker


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("text, says", [
    ("{not json", "cannot read"),
    ("[1, 2]", "is invalid at (top level)"),
    ('{"schema_version": 9}', "schema_version 9"),
    ("[" * 100_000 + "]" * 100_000, "cannot read"),
    ("\xff\xfe", "cannot read"),
])
def test_malformed_manifest_is_one_line_naming_the_file(tmp_path: Path, text: str,
                                                        says: str) -> None:
    (tmp_path / "manifest.json").write_bytes(text.encode("utf-8", "surrogateescape")
                                             if text != "\xff\xfe" else b"\xff\xfe\x00")
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path)
    assert says in _one_line(err.value, tmp_path / "manifest.json")



@pytest.mark.parametrize("text", ["{not json", "[" * 100_000 + "]" * 100_000],
                         ids=["not-json", "nested-100k"])
def test_malformed_personal_manifest_is_one_line_naming_the_file(tmp_path: Path,
                                                                 text: str) -> None:
    """personal.json goes through the manifest's reader: deep nesting too is one line."""
    from toolkit.core.artifacts.personal import PERSONAL_MANIFEST, load_personal_manifest

    (tmp_path / PERSONAL_MANIFEST).write_text(text)
    with pytest.raises(ManifestError) as err:
        load_personal_manifest(tmp_path)
    assert "cannot read" in _one_line(err.value, tmp_path / PERSONAL_MANIFEST)

def test_manifest_with_a_wrongly_typed_field_names_the_field(tmp_path: Path) -> None:
    src = (Path(__file__).resolve().parents[1] / "toolkit" / "core" / "artifacts" / "schemas"
           / "manifest.v1.json")
    assert src.is_file()
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 1,
                                                         "batch_size": "x" * 5000}))
    with pytest.raises(ManifestError) as err:
        load_manifest(tmp_path)
    assert len(_one_line(err.value, tmp_path / "manifest.json")) < 400


# --------------------------------------------------------------------------- boards


@pytest.mark.parametrize("text, says", [
    ("name: [unclosed\n  cpu: {", "not valid YAML"),
    ("- a list\n- not a mapping\n", "not a YAML mapping"),
    ("schema_version: 1\nname: b\nmemory: {total_mb: 512, budget_mb: 256}\n"
     "cpu: {arch: arm64, cores: -2, gflops: 1}\n", "cpu.cores"),
    ("schema_version: 1\nname: b\nmemory: {total_mb: 512, budget_mb: 256}\n"
     "cpu: {arch: arm64, cores: 4, gflops: 1}\ntraining: {default_batch: 8, threads: 2}\n"
     "link: {kbps: 500, latency_ms: soon}\n", "link.latency_ms"),
    ("schema_version: 2\n", "schema_version 2"),
])
def test_malformed_board_profile_is_one_line_naming_the_file(tmp_path: Path, text: str,
                                                             says: str) -> None:
    path = tmp_path / "board.yaml"
    path.write_text(text)
    with pytest.raises(HiertrainError) as err:
        load_board(str(path))
    assert says in _one_line(err.value, path)


def test_binary_board_profile(tmp_path: Path) -> None:
    path = tmp_path / "board.yaml"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    with pytest.raises(HiertrainError) as err:
        load_board(str(path))
    _one_line(err.value, path)


# --------------------------------------------------------------------------- checkpoints


def test_cloud_checkpoint_with_pickled_code_is_refused_and_not_run(tmp_path: Path) -> None:
    from cloud_trainer.checkpoint import CHECKPOINT, load_checkpoint

    path, marker = _evil(tmp_path, "ckpt")
    shutil.move(path, tmp_path / CHECKPOINT)
    with pytest.raises(HiertrainError) as err:
        load_checkpoint(tmp_path, run_id="r", manifest_sha="x")
    text = _one_line(err.value, tmp_path / CHECKPOINT)
    assert "refused" in text and "weights_only=False" not in text
    assert not marker.exists(), "unpickling ran code from the file"

    (tmp_path / CHECKPOINT).write_bytes(b"\x00 not a checkpoint " * 20)
    with pytest.raises(HiertrainError) as err:
        load_checkpoint(tmp_path, run_id="r", manifest_sha="x")
    _one_line(err.value, tmp_path / CHECKPOINT)

    torch.save({"version": 99}, tmp_path / CHECKPOINT)
    with pytest.raises(HiertrainError, match="not a cloud-trainer checkpoint"):
        load_checkpoint(tmp_path, run_id="r", manifest_sha="x")


def test_edge_checkpoint_with_pickled_code_is_refused_and_not_run(tmp_path: Path) -> None:
    from edge_runtime.resume import load_checkpoint

    path, marker = _evil(tmp_path, "edge_checkpoint")
    with pytest.raises(HiertrainError) as err:
        load_checkpoint(path, run="r", device="d", manifest_sha="x", backend=None)
    text = _one_line(err.value, path)
    assert "refused" in text and "--resume" in text and "weights_only=False" not in text
    assert not marker.exists(), "unpickling ran code from the file"

    path.write_bytes(b"\x00 not a checkpoint " * 20)
    with pytest.raises(HiertrainError) as err:
        load_checkpoint(path, run="r", device="d", manifest_sha="x", backend=None)
    _one_line(err.value, path)


def test_edge_weight_files_with_pickled_code_are_refused_and_not_run(tmp_path: Path) -> None:
    from edge_runtime.infer import _load_weights_file
    from toolkit.core.artifacts.safeload import load_weights

    path, marker = _evil(tmp_path, "edge_weights")
    with pytest.raises(HiertrainError) as err:
        _load_weights_file(path)
    assert "refused" in _one_line(err.value, path)
    with pytest.raises(ManifestError):
        load_weights(path, "artifact", error=ManifestError)
    assert not marker.exists()
    truncated = tmp_path / "short.pt"
    torch.save({"w": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(HiertrainError) as err:
        _load_weights_file(truncated)
    _one_line(err.value, truncated)


def test_weights_message_with_pickled_code_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "msg-ran"
    good = encode_weights({"w": torch.ones(3)}, {"run": "r", "device": "d"})
    meta, state = decode_weights(good)
    assert meta["device"] == "d" and torch.equal(state["w"], torch.ones(3))
    # A well-formed message (right magic, CRC) whose state dict smuggles a callable.
    buf = io.BytesIO()
    torch.save({"w": torch.ones(3), "x": Payload(marker)}, buf)
    import struct
    import zlib

    header = json.dumps({"run": "r"}).encode()
    body = struct.pack("<4sBI", b"HTWT", 1, len(header)) + header + buf.getvalue()
    with pytest.raises(WireError) as err:
        decode_weights(body + struct.pack("<I", zlib.crc32(body)))
    assert err.value.reason == "weights"
    _one_line(err.value)
    assert not marker.exists()


# --------------------------------------------------------------------------- status


@pytest.mark.parametrize("field, value", [
    ("epoch", "three"), ("batches_published", True), ("batches_published", -5),
    ("last_seq", 1.5), ("time", float("nan")), ("exit_accuracy", "high"), ("message", 7),
    ("device", ["a"]),
])
def test_status_with_a_badly_typed_field_is_dropped(field: str, value: object) -> None:
    """The cloud's training loop does arithmetic on status fields: they are checked on decode."""
    d = json.loads(Status("edge", "e0", "r", "done", batches_published=3).encode())
    d[field] = value
    with pytest.raises(WireError) as err:
        decode_status(json.dumps(d).encode())
    assert err.value.reason == "status" and field in _one_line(err.value)
    assert decode_status(Status("edge", "e0", "r", "done", exit_accuracy=None).encode())


def test_cli_prints_one_line_for_a_malformed_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"schema_version": 1, "model": 3}')
    r = run_cli("cloud-trainer", "--artifacts", str(tmp_path), "--broker", "mqtt://127.0.0.1:1",
                "--run-dir", str(tmp_path / "run"), timeout=120)
    assert r.returncode == 3, r.stderr  # bad input (HiertrainError)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "manifest.json" in lines[0] and "Traceback" not in r.stderr
