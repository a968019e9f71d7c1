"""toolkit.core.protocol.codec end to end: every codec round-trips, sizes are exact, deflate pays
off on real
post-ReLU activations, the manifest records the codec, and an edge trained with
``--codec int4+deflate`` feeds a real cloud trainer through a real broker.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import CHEAP_LOWERING, run_cli
from toolkit.core.artifacts.manifest import load_manifest, schema, validate
from toolkit.core.data.datasets import digits_stats, load_dataset
from toolkit.core.errors import HiertrainError, ManifestError, WireError
from toolkit.core.models.exits import ExitHeadConfig
from toolkit.core.models.segments import build_segments
from toolkit.core.protocol import wire
from toolkit.core.protocol.codec import (
    CODECS,
    DEFAULT_CODEC,
    IMAGE_CODEC,
    BatchMeta,
    Codec,
    DecodedBatch,
    codec_for,
    decode,
    parse_codec,
    size_estimate,
)
from toolkit.core.protocol.images import IMAGE_SCHEME
from toolkit.core.protocol.quant import DEFAULT_SCHEME, QuantScheme, max_abs_error, quantize
from toolkit.core.protocol.wire import FLAG_DEFLATE, FLAG_PACKED, ActivationBatch

NAMES = ["int8", "int4", "int2", "int8+deflate", "int4+deflate", "int2+deflate", "float32"]
RUN, DEVICE = "r-codec", "dev-1"


@pytest.fixture(scope="module")
def post_relu() -> torch.Tensor:
    """A real post-ReLU activation: ResNet-18's edge up to ``layer1`` (its blocks end in a
    ReLU) at init weights, on 8 digits images upsampled to 3x32x32."""
    torch.manual_seed(0)
    built = build_segments("resnet18", "layer1", num_classes=10, input_shape=(3, 32, 32),
                           exit_cfg=ExitHeadConfig(channels=16))
    x = load_dataset(None, "train", input_shape=(3, 32, 32), limit=8, seed=0).x
    built.step.eval()
    with torch.no_grad():
        cut = built.step.edge((x - 0.5) / 0.25)
    assert cut.min() >= 0 and (cut == 0).float().mean() > 0.2
    return cut


def test_registry_names_and_parse() -> None:
    assert list(CODECS) == NAMES and DEFAULT_CODEC == "int8"
    for name in NAMES:
        c = parse_codec(name)
        assert isinstance(c, Codec) and c.name == name
        assert c.bits == (32 if name == "float32" else int(name[3]))
        assert c.entropy == ("deflate" if name.endswith("+deflate") else "none")
    assert parse_codec(" INT4+Deflate ") is CODECS["int4+deflate"]
    with pytest.raises(HiertrainError, match="int4\\+deflate.*float32") as exc:
        parse_codec("int3")
    assert "int3" in str(exc.value) and "\n" not in str(exc.value)


def test_scheme_keeps_base_and_takes_bits() -> None:
    base = QuantScheme(granularity="per_tensor", symmetric=True, channel_axis=2)
    for name in ("int8", "int4+deflate", "int2"):
        c = parse_codec(name)
        assert c.scheme(base) == QuantScheme(bits=c.bits, granularity="per_tensor",
                                             symmetric=True, channel_axis=2)
    assert parse_codec("int4").scheme() == QuantScheme(bits=4)
    with pytest.raises(HiertrainError):
        parse_codec("float32").scheme(base)


@pytest.mark.parametrize("name", NAMES)
def test_every_codec_round_trips(name: str, post_relu: torch.Tensor) -> None:
    codec = parse_codec(name)
    labels = torch.arange(post_relu.shape[0]) % 10
    data = codec.encode(post_relu, labels, BatchMeta(RUN, DEVICE, 7, 1, 3), base=DEFAULT_SCHEME)
    batch = codec.decode(data, expected_run_id=RUN)
    assert (batch.seq, batch.epoch, batch.batch_index, batch.device_id) == (7, 1, 3, DEVICE)
    assert batch.meta == BatchMeta(RUN, DEVICE, 7, 1, 3)
    assert torch.equal(batch.labels, labels)
    assert batch.shape == tuple(post_relu.shape)
    out = batch.tensor
    if not codec.quantized:
        assert batch.message.quantized is None and torch.equal(out, post_relu)
        assert batch.scheme is None
        return
    scheme = codec.scheme(DEFAULT_SCHEME)
    ref = quantize(post_relu, scheme)
    q = batch.message.quantized
    assert batch.scheme == scheme
    assert q is not None and q.scheme == scheme
    assert torch.equal(q.codes, ref.codes)  # codes exact
    assert torch.equal(q.scale, ref.scale) and torch.equal(q.zero_point, ref.zero_point)
    bound = max_abs_error(scheme, q) * (1 + 1e-5) + 1e-7
    assert bool(((out - post_relu).abs() <= bound).all())
    assert bool((out[post_relu == 0] == 0).all())  # ReLU zeros stay exact zeros
    flags = data[5]
    assert bool(flags & FLAG_PACKED) == (codec.bits < 8)
    assert bool(flags & FLAG_DEFLATE) == codec.deflate


def test_size_estimate_is_exact_without_deflate_and_a_bound_with_it(
    post_relu: torch.Tensor,
) -> None:
    n = post_relu.shape[0]
    cut = tuple(post_relu.shape[1:])
    numel = math.prod(cut)
    labels = torch.zeros(n, dtype=torch.int64)
    sizes = {}
    for name, codec in CODECS.items():
        data = codec.encode(post_relu, labels, BatchMeta(RUN, DEVICE, 0))
        est = size_estimate(codec, cut, n, run_id=RUN, device_id=DEVICE)
        sizes[name] = len(data)
        assert est.exact == (not codec.deflate)
        if est.exact:
            assert len(data) == est.message_bytes_per_sample * n, name
        else:
            assert len(data) < est.message_bytes_per_sample * n, name
        assert est.payload_bytes_per_sample * n == math.ceil(n * numel * codec.bits / 8)
    # int4 = ceil(n/2), int2 = ceil(n/4) payload bytes: the message shrinks by exactly that.
    assert sizes["int8"] - sizes["int4"] == n * numel - math.ceil(n * numel / 2)
    assert sizes["int8"] - sizes["int2"] == n * numel - math.ceil(n * numel / 4)


def test_deflate_shrinks_a_real_post_relu_activation(post_relu: torch.Tensor) -> None:
    labels = torch.zeros(post_relu.shape[0], dtype=torch.int64)
    for bits in (8, 4, 2):
        plain = CODECS[f"int{bits}"].encode(post_relu, labels, BatchMeta(RUN, DEVICE, 0))
        packed = CODECS[f"int{bits}+deflate"].encode(post_relu, labels,
                                                     BatchMeta(RUN, DEVICE, 0))
        zeros = float((post_relu == 0).float().mean())
        # Each zero costs far less than its plain code: at least a third of the zeros' share.
        assert len(packed) < len(plain) * (1 - zeros / 3), (bits, len(packed), len(plain), zeros)


def test_reconstruction_error_grows_as_bits_shrink(post_relu: torch.Tensor) -> None:
    errs = []
    for name in ("int8", "int4", "int2"):
        data = CODECS[name].encode(post_relu, None, BatchMeta(RUN, DEVICE, 0))
        out = decode(data).tensor
        errs.append(float((out - post_relu).norm() / post_relu.norm()))
    assert errs[0] < errs[1] < errs[2] < 1.0
    assert errs[0] < 0.01


def test_codec_bytes_are_the_wire_format_unchanged(post_relu: torch.Tensor) -> None:
    """The codec is a front door, not a new format: its bytes are exactly what quantize + the
    wire layer make, for every codec, with and without labels and with any base scheme."""
    labels = torch.arange(post_relu.shape[0]) % 10
    base = QuantScheme(granularity="per_tensor", symmetric=True)
    for codec in CODECS.values():
        for lab, scheme in ((labels, DEFAULT_SCHEME), (None, base)):
            form = ({"quantized": quantize(post_relu, codec.scheme(scheme))} if codec.quantized
                    else {"raw": post_relu})
            by_hand = wire.encode(ActivationBatch(RUN, DEVICE, 5, 2, 1, labels=lab, **form),
                                  deflate=codec.deflate)
            assert codec.encode(post_relu, lab, BatchMeta(RUN, DEVICE, 5, 2, 1),
                                base=scheme) == by_hand, codec.name


def test_any_codec_decodes_any_message_and_only_wire_errors_escape(
    post_relu: torch.Tensor,
) -> None:
    """The receiver needs no configuration: decode does not depend on the codec it is called
    on, and a damaged message is a WireError with a reason, never anything else."""
    data = CODECS["int2+deflate"].encode(post_relu, None, BatchMeta(RUN, DEVICE, 9))
    outs = [c.decode(data).tensor for c in (*CODECS.values(), IMAGE_CODEC)]
    outs.append(Codec.decode(data).tensor)
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert isinstance(decode(data), DecodedBatch) and decode(data).labels is None
    with pytest.raises(WireError) as exc:
        decode(data, expected_run_id="another-run")
    assert exc.value.reason == "run_id"
    bad = bytearray(data)
    bad[len(bad) // 2] ^= 0x40
    with pytest.raises(WireError) as exc:
        decode(bytes(bad))
    assert exc.value.reason == "crc"
    with pytest.raises(WireError):
        CODECS["int8"].encode(torch.full((2, 3), float("nan")), None, BatchMeta(RUN, DEVICE, 0))


def test_gradients_and_inference_requests_go_through_a_codec() -> None:
    """Split learning's signed gradients (int8, per channel, symmetric) and an inference
    request coded with the manifest's scheme (``codec_for``)."""
    torch.manual_seed(1)
    grad = torch.randn(4, 6, 3, 3) * 1e-3
    grad_scheme = QuantScheme(bits=8, granularity="per_channel", symmetric=True, channel_axis=1)
    data = parse_codec("int8").encode(grad, None, BatchMeta(RUN, "cloud", 3, 0, 3),
                                      base=grad_scheme)
    back = decode(data)
    assert back.scheme == grad_scheme and back.labels is None and back.seq == 3
    q = quantize(grad, grad_scheme)
    assert bool(((back.tensor - grad).abs() <= max_abs_error(grad_scheme, q) * 1.0001).all())
    assert torch.equal(decode(parse_codec("float32").encode(
        grad, None, BatchMeta(RUN, "cloud", 3))).tensor, grad)
    for bits in (8, 4, 2):
        scheme = QuantScheme(bits=bits, granularity="per_tensor")
        assert codec_for(scheme) is CODECS[f"int{bits}"]
        req = codec_for(scheme).encode(grad.abs(), None, BatchMeta(RUN, DEVICE, 0), base=scheme)
        assert decode(req).scheme == scheme


def test_image_codec_is_lossless_both_ways() -> None:
    """Images on a u/255 grid go as one byte a pixel and come back bit-exact; images off any
    grid go as float32, just as exact."""
    torch.manual_seed(2)
    on = torch.randint(0, 256, (3, 1, 4, 4)).float() / 255
    off = torch.rand(3, 1, 4, 4)
    labels = torch.tensor([1, 2, 3])
    assert IMAGE_CODEC.on_grid(on) and not IMAGE_CODEC.on_grid(off)
    small = IMAGE_CODEC.encode(on, labels, BatchMeta(RUN, DEVICE, 0))
    big = IMAGE_CODEC.encode(off, labels, BatchMeta(RUN, DEVICE, 1))
    assert len(big) - len(small) == 3 * 16 * 3 - 8  # 4 bytes a pixel instead of 1, no scale
    for data, x in ((small, on), (big, off)):
        got = IMAGE_CODEC.decode(data)
        assert torch.equal(got.images(), x) and torch.equal(got.labels, labels)
    assert decode(small).scheme == IMAGE_SCHEME
    with pytest.raises(WireError):  # an activation is not an image upload
        decode(CODECS["int8"].encode(on, None, BatchMeta(RUN, DEVICE, 0))).images()


# --------------------------------------------------------------------------- manifest


def test_schema_and_registry_agree() -> None:
    base = {c["properties"]["name"]["const"] for c in schema()["properties"]["codec"]["oneOf"]}
    assert base == set(CODECS)


def _export_smallcnn(tmp: Path, codec: str, *extra: str) -> tuple[Path, dict]:
    out = tmp / f"art-{codec.replace('+', '_')}"
    mean, std = digits_stats()
    r = run_cli("toolkit", "export", "--model", "smallcnn", "--input-shape", "1,8,8",
                "--mean", ",".join(map(str, mean)), "--std", ",".join(map(str, std)),
                "--batch", "16", "--exit-channels", "16", "--no-verify", "--codec", codec,
                "--lowering", CHEAP_LOWERING, "--out", str(out), *extra, timeout=300)
    assert r.returncode == 0, r.stderr
    return out, json.loads((out / "manifest.json").read_text()) | {"_stdout": r.stdout}


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory) -> tuple[Path, dict]:
    return _export_smallcnn(tmp_path_factory.mktemp("codec"), "int4")


def test_export_records_codec_and_bytes_per_sample(int4_export) -> None:
    out, data = int4_export
    stdout = data.pop("_stdout")
    validate(data)
    assert data["codec"] == {"name": "int4", "bits": 4, "entropy": "none"}
    assert data["quantization"]["bits"] == 4
    cut = data["cut"]
    numel = math.prod(cut["shape"])
    assert cut["codec"]["name"] == "int4" and cut["codec"]["size"] == "exact"
    assert cut["codec"]["payload_bytes_per_sample"] == numel / 2
    est = size_estimate(CODECS["int4"], cut["shape"], 16)
    assert cut["codec"]["message_bytes_per_sample"] == est.message_bytes_per_sample
    assert "codec int4" in stdout and "exact" in stdout
    assert load_manifest(out).codec_name == "int4"


def test_manifest_without_codec_means_int8_and_bad_codecs_are_rejected(int4_export) -> None:
    _, data = int4_export
    data = {k: v for k, v in data.items() if k != "_stdout"}
    old = {k: v for k, v in data.items() if k != "codec"}
    old["cut"] = {k: v for k, v in data["cut"].items() if k != "codec"}
    validate(old)  # manifests written before codecs existed stay valid
    from toolkit.core.artifacts.manifest import Manifest

    assert Manifest(data=old, root=Path(".")).codec_name == "int8"
    for bad in ({"name": "int4", "bits": 8, "entropy": "none"},
                {"name": "int3", "bits": 4, "entropy": "none"},
                {"name": "int4", "bits": 4, "entropy": "zstd"},
                {"name": "int4", "bits": 4}):
        with pytest.raises(ManifestError):
            validate({**data, "codec": bad})


def test_export_with_a_bad_codec_exits_3_with_one_line() -> None:
    r = run_cli("toolkit", "export", "--model", "smallcnn", "--codec", "int3",
                "--out", "/nonexistent/never-written", timeout=120)
    assert r.returncode == 3  # a HiertrainError: bad input (toolkit.core.entry)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown codec 'int3'"), r.stderr
    assert "int4+deflate" in lines[0]
    assert not Path("/nonexistent/never-written").exists()


def test_edge_train_rejects_a_bad_codec(int4_export, tmp_path) -> None:
    out, _ = int4_export
    r = run_cli("edge-runtime", "train", "--artifacts", str(out), "--broker",
                "mqtt://127.0.0.1:1", "--device-id", "d", "--codec", "int16", "--quiet",
                "--state-dir", str(tmp_path), timeout=120)
    assert r.returncode == 3 and r.stderr.strip().startswith("error: unknown codec 'int16'")


# --------------------------------------------------------------------------- end to end


@pytest.mark.mqtt
def test_int4_deflate_edge_feeds_a_real_cloud_trainer(int4_export, tmp_path, procs) -> None:
    """The manifest says int4; the edge overrides it with --codec int4+deflate; the cloud needs
    no configuration (every message says how it is coded) and trains every batch."""
    from toolkit.core.protocol.topics import act_topic
    from toolkit.core.transport import open_link
    from toolkit.lab.broker import EmbeddedBroker
    from toolkit.lab.launch import start_cloud

    out, _ = int4_export
    run = "codec-it"
    seen: list[bytes] = []
    with EmbeddedBroker().start(timeout=10) as broker:
        tap = open_link(broker.url, "codec-tap")
        tap.subscribe(act_topic(run, "robot-0"), lambda t, p, props: seen.append(bytes(p)))
        tap.connect(timeout=10)
        cloud = start_cloud(procs, [
            "cloud_trainer", "--artifacts", str(out), "--broker", broker.url,
            "--run-dir", str(tmp_path / "cloud"), "--run-id", run, "--devices", "1",
            "--threads", "1", "--quiet"], broker.url, run)
        edge = procs.start("edge", [
            "edge_runtime", "train", "--artifacts", str(out), "--broker", broker.url,
            "--device-id", "robot-0", "--run-id", run, "--epochs", "1",
            "--codec", "int4+deflate", "--report", str(tmp_path / "edge.json"),
            "--state-dir", str(tmp_path), "--threads", "1", "--quiet"])
        try:
            procs.wait_all(["edge", "cloud"], 240)
        finally:
            tap.close()
    logs = {f.name: f.read_text()[-2000:] for f in tmp_path.glob("*.log")}
    assert edge.returncode == 0 and cloud.returncode == 0, logs

    rep = json.loads((tmp_path / "edge.json").read_text())
    summary = json.loads((tmp_path / "cloud" / "cloud_summary.json").read_text())
    assert rep["codec"] == "int4+deflate" and rep["config"]["codec"] == "int4+deflate"
    n = rep["batches_published"]
    assert n > 0 and summary["per_device"]["robot-0"]["trained"] == n
    assert summary["batches_trained"] == n and not summary.get("dropped"), summary
    # Every message on the wire is packed int4, and deflated when that was shorter.
    assert len(seen) == n
    batches = [decode(m, expected_run_id=run) for m in seen]
    assert all(b.scheme is not None and b.scheme.bits == 4 for b in batches)
    assert all(m[5] & FLAG_PACKED for m in seen)
    assert sum(bool(m[5] & FLAG_DEFLATE) for m in seen) > n // 2  # the cloud inflated them
    est = size_estimate(CODECS["int4"], load_manifest(out).cut_shape, 16, run_id=run,
                        device_id="robot-0")
    assert rep["payload_bytes_per_sample"] <= est.message_bytes_per_sample
    assert rep["payload_bytes_per_sample"] < rep["float32_bytes_per_sample"] / 6
    # The cloud learned from the dequantized int4 activations (0.93 measured; chance is 0.1).
    assert summary["full_accuracy"] > 0.6, summary
