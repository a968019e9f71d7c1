"""Privacy defences on the cut (toolkit.core.privacy, docs/privacy.md), through real parts.

* ``--privacy none`` publishes exactly what it published before defences existed: every
  activation message of a real run on a real broker is byte for byte the codec's encoding
  of the exported program's own cut, replayed in this process.
* A noise defence changes what is on the wire as exported (the same replay: the published
  cut minus the clean cut has the exported noise scale; clipping bounds each sample), and
  only there: the program, the edge's training and its exit are those of ``none``.
* The adversarial program's gradients match eager PyTorch, its proxy decoder never leaves
  the board, and the edge's gradient is the exit's minus ``weight`` times the decoder's.
"""

from __future__ import annotations

import json
import math
import secrets
import threading

import pytest
import torch
import torch.nn.functional as F

from edge_runtime.backends import ExecuTorchBackend
from edge_runtime.train import TrainConfig, load_training_data, run_training
from toolkit.build.parity import check_program
from toolkit.core.artifacts.manifest import load_manifest
from toolkit.core.data.datasets import batches
from toolkit.core.errors import HiertrainError
from toolkit.core.et_program import TrainingProgram
from toolkit.core.models.inversion import AdversarialTrainStep, Decoder, reverse_gradient
from toolkit.core.models.segments import load_segments
from toolkit.core.privacy import (
    NONE,
    PROXY_PREFIX,
    CutNoise,
    Privacy,
    epsilon,
    parse_privacy,
)
from toolkit.core.protocol.codec import BatchMeta, codec_for, decode
from toolkit.core.protocol.messages import decode_weights
from toolkit.core.protocol.quant import QuantScheme
from toolkit.core.protocol.topics import act_topic, weights_topic
from toolkit.core.transport import open_link

BATCH = 16
LIMIT = 160  # 10 batches of digits per epoch


def _uid(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


# ------------------------------------------------------------------ the spec and the math
@pytest.mark.parametrize("text", ["noise:1", "gaussian", "gaussian:", "gaussian:-1",
                                  "gaussian:x", "laplace:1,width=3", "adversarial:1,clip=2",
                                  "gaussian:1,clip=0", "none:1", "adversarial:0.5,width=0"])
def test_bad_privacy_specs_are_one_line_errors(text):
    with pytest.raises(HiertrainError) as err:
        parse_privacy(text)
    assert "\n" not in str(err.value) and "privacy" in str(err.value)


def test_specs_round_trip_through_the_manifest_form():
    for text in ("none", "gaussian:0.5,clip=2", "laplace:0.25,clip=1", "adversarial:0.3,width=8"):
        p = parse_privacy(text)
        assert parse_privacy(p.spec()) == p
        assert Privacy.from_dict(p.to_dict()) == p
    assert Privacy.from_dict(None) == NONE  # manifests written before defences existed


def test_epsilon_matches_the_gaussian_mechanism_and_composes():
    # mu-GDP with mu = sensitivity / sigma; a 1-GDP mechanism is (4.38, 1e-5)-DP, and k
    # releases are sqrt(k)-GDP. One element, clip 1: sensitivity 2, so sigma 2 is 1-GDP.
    one = Privacy("gaussian", scale=2.0, clip=1.0)
    assert epsilon(one, 1) == pytest.approx(4.377, abs=0.01)
    four = Privacy("gaussian", scale=1.0, clip=1.0)  # 2-GDP = 1-GDP released four times
    assert epsilon(one, 1, releases=4) == pytest.approx(epsilon(four, 1), rel=1e-6)
    # Laplace: L1 sensitivity 2 * clip * n over noise scale * clip, additive over releases
    lap = Privacy("laplace", scale=0.5, clip=3.0)
    assert epsilon(lap, 100, releases=3) == pytest.approx(3 * 2 * 100 / 0.5)
    assert epsilon(NONE, 100) is None
    assert epsilon(parse_privacy("adversarial:1"), 100) is None


@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
def test_noise_clips_each_sample_and_has_the_exported_scale(kind):
    cut = torch.relu(torch.randn(64, 8, 6, 6)) * torch.linspace(0.1, 5, 64)[:, None, None, None]
    tiny = CutNoise(Privacy(kind, scale=1e-6, clip=0.5), seed=1)(cut)
    size = (tiny.square().mean(dim=(1, 2, 3)).sqrt() if kind == "gaussian"
            else tiny.abs().mean(dim=(1, 2, 3)))
    before = (cut.square().mean(dim=(1, 2, 3)).sqrt() if kind == "gaussian"
              else cut.abs().mean(dim=(1, 2, 3)))
    assert (size <= 0.5 + 1e-4).all()
    small = before < 0.5  # samples under the bound are left alone
    assert small.any() and torch.allclose(tiny[small], cut[small], atol=1e-4)

    wide = CutNoise(Privacy(kind, scale=0.2, clip=100.0), seed=2)  # no clipping: pure noise
    diff = wide(cut) - cut
    expected_std = 20.0 * (math.sqrt(2) if kind == "laplace" else 1.0)
    assert diff.std().item() == pytest.approx(expected_std, rel=0.03)
    assert abs(diff.mean().item()) < 0.05 * expected_std
    # unseeded generators differ: noise an attacker can regenerate is no noise
    p = Privacy(kind, scale=0.2)
    assert not torch.equal(CutNoise(p)(cut), CutNoise(p)(cut))


def test_laplace_noise_stays_finite_when_the_uniform_draw_is_exactly_zero():
    # seed 1 draws an exact 0.0 among its first 2**23 uniforms; the naive
    # inverse CDF turned it into -inf and stopped a benchmark run mid-epoch
    shape = torch.Size([2**23])
    assert (torch.rand(shape, generator=torch.Generator().manual_seed(1)) == 0).any()
    noise = CutNoise(Privacy("laplace", scale=1.0, clip=100.0), seed=1)(torch.zeros(shape))
    assert torch.isfinite(noise).all()


# ------------------------------------------------------------------ on the wire
def _collect(url: str, topic: str) -> tuple[object, list[bytes]]:
    got: list[bytes] = []
    lock = threading.Lock()

    def on(_t: str, payload: bytes, _props: dict) -> None:
        with lock:
            got.append(bytes(payload))

    link = open_link(url, _uid("privacy-collector"))
    link.subscribe(topic, on)
    link.connect(timeout=10)
    return link, got


def _run_and_capture(artifacts, broker, tmp_path, epochs: int = 1):
    run, dev = _uid("run"), "edge-p"
    link, got = _collect(broker.url, act_topic(run, dev))
    wlink, weights = _collect(broker.url, weights_topic(run, dev))
    try:
        summary = run_training(TrainConfig(
            artifacts=artifacts, broker=broker.url, device_id=dev, run_id=run, epochs=epochs,
            limit=LIMIT, quiet=True, connect_timeout=10, state_dir=tmp_path,
            confirm_timeout=0))
        n = summary["batches_published"]
        from tests.conftest import wait_until

        wait_until(lambda: len(got) >= n and len(weights) >= epochs, 20, f"{n} messages")
    finally:
        link.close()
        wlink.close()
    msgs = sorted(((decode(p, expected_run_id=run), p) for p in got), key=lambda m: m[0].meta.seq)
    return run, dev, msgs, weights


def _clean_cuts(artifacts, n: int):
    """The exported program's own cuts for the run's first ``n`` batches, replayed here."""
    manifest = load_manifest(artifacts)
    backend = ExecuTorchBackend(manifest)
    ds = load_training_data(manifest, None, "0/1", limit=LIMIT, seed=0)
    out = []
    for i, (x, y) in enumerate(batches(ds, BATCH, epoch=0, seed=0)):
        if i >= n:
            break
        out.append((backend.step(x, y).cut, y))
    return manifest, out


@pytest.mark.mqtt
def test_privacy_none_publishes_the_programs_cut_byte_for_byte(exported, broker, tmp_path):
    artifacts = exported(digits=True, batch=BATCH, privacy="none")
    manifest = load_manifest(artifacts)
    assert manifest.data["privacy"] == {"kind": "none", "scale": 0.0,
                                        "epsilon_per_release": None, "delta": 1e-5}
    run, dev, msgs, _ = _run_and_capture(artifacts, broker, tmp_path)
    _, clean = _clean_cuts(artifacts, len(msgs))
    scheme = QuantScheme.from_dict(manifest.data["quantization"])
    assert len(msgs) == LIMIT // BATCH
    for seq, ((cut, y), (_, payload)) in enumerate(zip(clean, msgs, strict=True)):
        expected = codec_for(scheme).encode(cut, y, BatchMeta(run, dev, seq, 0, seq),
                                            base=scheme)
        assert payload == expected, f"batch {seq} differs from the program's cut"


@pytest.mark.mqtt
def test_gaussian_noise_is_on_the_wire_as_exported_and_only_there(exported, broker,
                                                                 tmp_path):
    # clip 20: no sample reaches it, so the published cut is the clean one plus N(0, 0.5^2)
    noisy = exported(digits=True, batch=BATCH, privacy="gaussian:0.025,clip=20")
    plain = exported(digits=True, batch=BATCH, privacy="none")
    for name in ("edge_train.pte", "edge_infer.pte", "edge_init.pt"):  # the board's program
        assert (noisy / name).read_bytes() == (plain / name).read_bytes(), name
    manifest = load_manifest(noisy)
    d = manifest.data["privacy"]
    assert (d["kind"], d["scale"], d["clip"]) == ("gaussian", 0.025, 20.0)
    assert d["epsilon_per_release"] == pytest.approx(
        epsilon(manifest.privacy, math.prod(manifest.cut_shape)))

    _, _, msgs, _ = _run_and_capture(noisy, broker, tmp_path)
    _, clean = _clean_cuts(noisy, len(msgs))
    diff = torch.cat([(b.tensor - cut).flatten() for (cut, _), (b, _) in
                      zip(clean, msgs, strict=True)])
    # int8 rounding adds ~range/255/sqrt(12) ~ 0.01 of spread: well inside the bound
    assert diff.std().item() == pytest.approx(0.5, rel=0.06)
    assert abs(diff.mean().item()) < 0.02
    assert all(torch.equal(b.labels, y) for (_, y), (b, _) in zip(clean, msgs, strict=True))


@pytest.mark.mqtt
def test_clipping_bounds_every_published_sample(exported, broker, tmp_path):
    clip = 0.05
    artifacts = exported(digits=True, batch=BATCH, privacy=f"gaussian:0.001,clip={clip}")
    _, _, msgs, _ = _run_and_capture(artifacts, broker, tmp_path)
    _, clean = _clean_cuts(artifacts, len(msgs))
    for (cut, _), (b, _) in zip(clean, msgs, strict=True):
        rms_clean = cut.flatten(1).square().mean(1).sqrt()
        rms_sent = b.tensor.flatten(1).square().mean(1).sqrt()
        assert (rms_clean > 5 * clip).all()  # every sample was clipped ...
        assert (rms_sent < clip * 1.1).all()  # ... to the bound (plus noise and rounding)


# ------------------------------------------------------------------ adversarial
def test_gradient_reversal_gives_the_edge_exit_minus_weighted_reconstruction():
    torch.manual_seed(0)
    edge = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1, stride=2), torch.nn.ReLU())
    exit_head = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 3))
    proxy = Decoder((4, 4, 4), (1, 8, 8), width=6)
    w = 0.7
    step = AdversarialTrainStep(edge, exit_head, proxy, w)
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    loss = step(x, y)[0]
    grads = torch.autograd.grad(loss, list(edge.parameters()) + list(proxy.parameters()))

    cut = edge(x)
    ce = F.cross_entropy(exit_head(cut), y)
    mse = F.mse_loss(proxy(cut), x)
    g_ce = torch.autograd.grad(ce, list(edge.parameters()), retain_graph=True)
    g_mse = torch.autograd.grad(mse, list(edge.parameters()) + list(proxy.parameters()))
    n_edge = len(g_ce)
    for got, a, b in zip(grads[:n_edge], g_ce, g_mse[:n_edge], strict=True):
        torch.testing.assert_close(got, a - w * b)  # the edge makes the cut harder to invert
    for got, b in zip(grads[n_edge:], g_mse[n_edge:], strict=True):
        torch.testing.assert_close(got, b)  # the proxy learns to invert it
    assert torch.equal(reverse_gradient(cut, w), cut)  # identity forward
    assert loss.item() == pytest.approx((ce + mse).item(), rel=1e-6)


@pytest.mark.parametrize("split", ["block1", "block2"])
def test_adversarial_program_matches_eager_and_keeps_its_proxy_home(exported, broker,
                                                                   tmp_path, split):
    artifacts = exported(digits=True, batch=BATCH, split=split, verify=True,
                         privacy="adversarial:0.5,width=8")
    manifest = load_manifest(artifacts)
    assert manifest.data["privacy"]["kind"] == "adversarial"
    assert manifest.data["parity"]["checked"]  # the export's own gate passed
    built = load_segments(manifest, with_proxy=True)
    assert isinstance(built.step, AdversarialTrainStep)
    program = TrainingProgram((artifacts / "edge_train.pte").read_bytes())
    ds = load_training_data(manifest, None, "0/1", limit=LIMIT, seed=0)
    x, y = next(iter(batches(ds, BATCH, epoch=0, seed=0)))
    report = check_program(program, built.step, x, y)
    proxy = {k: v for k, v in report.grad_errors.items() if k.startswith(PROXY_PREFIX)}
    assert proxy and max(proxy.values()) < 1e-3, proxy
    assert report.global_error < 1e-4 and report.loss_abs_error < 1e-4

    if split == "block1":  # once: a real run publishes weights without the proxy
        _, _, msgs, weights = _run_and_capture(artifacts, broker, tmp_path)
        assert len(msgs) == LIMIT // BATCH
        _, state = decode_weights(weights[-1])
        assert state and not any(k.startswith(PROXY_PREFIX) for k in state)
        plain = load_segments(manifest)  # what the cloud builds: it loads them strictly
        plain.step.load_state_dict(state)
        assert set(state) == set(plain.step.state_dict())


# ------------------------------------------------------------------ toolkit attack, toolkit plan
def test_toolkit_attack_rebuilds_digits_from_the_cut_and_noise_stops_it(exported, tmp_path,
                                                                       cli_in_process):
    """The attacker beats knowing nothing on a plain cut, and not on a drowned one."""
    scores = {}
    for name, privacy in (("plain", "none"), ("drowned", "gaussian:20,clip=0.05")):
        artifacts = exported(digits=True, batch=BATCH, privacy=privacy)
        out = tmp_path / f"{name}.json"
        r = cli_in_process("toolkit", "attack", str(artifacts), "--data", "digits", "--public",
                           "800", "--heldout", "128", "--epochs", "6", "--json", str(out),
                           "--grid", str(tmp_path / f"{name}.png"))
        assert r.returncode == 0, r.stderr
        assert "the cut adds" in r.stdout and (tmp_path / f"{name}.png").stat().st_size > 0
        scores[name] = json.loads(out.read_text())
        assert scores[name]["privacy"] == load_manifest(artifacts).privacy.spec()
    plain, drowned = scores["plain"], scores["drowned"]
    assert plain["psnr"] > plain["baseline_psnr"] + 3, plain
    assert drowned["psnr"] < drowned["baseline_psnr"] + 1, drowned


def test_toolkit_attack_bad_input_is_one_line(exported, tmp_path, cli_in_process):
    artifacts = exported(digits=True, batch=BATCH, privacy="none")
    r = cli_in_process("toolkit", "attack", str(artifacts), "--public", "0")
    assert r.returncode != 0 and "--public must be at least 1" in r.stderr
    r = cli_in_process("toolkit", "attack", str(artifacts), "--weights",
                       str(tmp_path / "missing.pt"))
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_the_planners_leak_table_is_the_benchmarks_int8_rows():
    from pathlib import Path

    from toolkit.plan.leakage import LEAKAGE_FILE, measured_leak

    results = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "privacy.json"
    assert LEAKAGE_FILE.is_file(), "benchmarks/privacy.py writes toolkit/plan/leakage.json"
    rows = [r for r in json.loads(results.read_text())["rows"]
            if r["part"] == "leak" and r["codec"] == "int8"]
    assert rows
    for r in rows:
        got = measured_leak(r["model"], r["split"], (3, 32, 32))
        assert got is not None and got["psnr"] == r["psnr"] and got["ssim"] == r["ssim"]
        assert measured_leak(r["model"], r["split"], (3, 64, 64)) is None


def test_modes_that_would_bypass_the_defence_refuse_it(exported, tmp_path, cli_in_process):
    """A defence exported for ht is never silently dropped: split and cloud modes, and the
    tiled cluster for the adversarial program, refuse such artifacts in one line."""
    noisy = exported(digits=True, batch=BATCH, privacy="gaussian:0.5")
    for mode in ("split", "cloud"):
        r = cli_in_process("edge-runtime", "train", "--artifacts", str(noisy), "--broker",
                           "mqtt://127.0.0.1:1", "--device-id", "d", "--mode", mode,
                           "--state-dir", str(tmp_path), "--quiet")
        assert r.returncode == 3, r.stderr[-2000:]
        assert "applies to --mode ht only" in r.stderr.strip().splitlines()[-1]
    adversarial = exported(digits=True, batch=BATCH, split="block2", verify=True,
                           privacy="adversarial:0.5,width=8")  # the parity test's export
    r = cli_in_process("edge-runtime", "cluster", "--artifacts", str(adversarial), "--broker",
                       "mqtt://127.0.0.1:1", "--device-id", "d", "--quiet", "--world-size", "2")
    assert r.returncode == 3, r.stderr[-2000:]
    assert "does not run the adversarial defence" in r.stderr.strip().splitlines()[-1]
