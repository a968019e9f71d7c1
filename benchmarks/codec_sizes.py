"""Bytes per sample, reconstruction error and speed of every activation codec on real activations.

What it measures
----------------
For each case (a model's edge segment at a split point, fed real images) and each codec of
``toolkit.core.protocol.codec`` (int8, int4, int2, each with and without deflate, and float32), on
the cut
activations of ``--batches`` training batches of ``--batch`` images:

* **bytes/sample**: the whole wire message (header, scales, labels, payload, CRC; run id
  ``bench``, device id ``edge-0``) divided by the batch size, averaged over the batches;
  **payload/sample**: the payload alone;
* **ratio**: float32 message bytes / this codec's message bytes (how many times smaller);
* **rel. error**: ``||x' - x|| / ||x||`` over all batches (Frobenius), ``x'`` being what the cloud
  gets from ``codec.decode(...).tensor``;
* **enc ms / dec ms**: median wall time per batch of ``codec.encode`` (quantize, pack,
  deflate, frame) and of ``codec.decode(...).tensor`` (check, unpack, dequantize) on one thread.

The activations are what an edge sends during training: the edge segment in train mode (batch
statistics in its norm layers) under ``torch.no_grad``, at the exporter's initial weights
(``build_segments(..., seed=0)``, as ``toolkit export`` writes ``edge_init.pt``). Trained weights
give other (usually sparser) activations, so read the deflate figures as indicative.

Cases: ``smallcnn`` split ``block1`` on scikit-learn digits (1x8x8, the demo's setting; its cut
follows a max-pool, so few exact zeros), and on CIFAR-10
(``toolkit.core.data.datasets.shared_cifar10()``, the
shared JPEG copy: "CIFAR-10 (JPEG copy)") ``resnet18`` at ``layer1`` / ``layer2`` and ``vgg16`` at
``stage2`` / ``stage3`` (3x32x32). Without the CIFAR-10 copy those four fall back to digits
resized to 3x32x32, say so on stderr and record it in the JSON (``data_fallback``).

    python benchmarks/codec_sizes.py                 # writes benchmarks/results/codec_sizes.json
    python benchmarks/codec_sizes.py --batches 1     # quicker

From a checkout without ``../shared/data`` beside it (e.g. a git worktree), point
``$HIERTRAIN_CIFAR10`` at the ``cifar10.npz``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from toolkit.core.data.datasets import digits_stats, load_dataset, normalize, shared_cifar10
from toolkit.core.models import CIFAR_MEAN, CIFAR_STD, get_spec
from toolkit.core.models.exits import ExitHeadConfig
from toolkit.core.models.segments import build_segments
from toolkit.core.protocol.codec import CODECS, BatchMeta, decode
from toolkit.core.protocol.quant import DEFAULT_SCHEME
from toolkit.core.protocol.wire import DEFLATE_LEVEL, header_overhead

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RUN_ID, DEVICE_ID = "bench", "edge-0"
CIFAR_CASES = (("resnet18", "layer1"), ("resnet18", "layer2"), ("vgg16", "stage2"),
               ("vgg16", "stage3"))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Activation codecs on real cut activations.")
    p.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    p.add_argument("--batches", type=int, default=4, help="batches per case (default 4)")
    p.add_argument("--repeats", type=int, default=5, help="timing repeats per batch (default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "codec_sizes.json")
    args = p.parse_args(argv)
    if min(args.batch, args.batches, args.repeats, args.threads) < 1:
        p.error("--batch, --batches, --repeats and --threads must be >= 1")
    return args


def cifar_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str, bool]:
    """Normalised 3x32x32 training images: CIFAR-10 if present, else digits (loudly)."""
    path = shared_cifar10()
    if path is not None:
        ds = load_dataset(path, "train", input_shape=(3, 32, 32), limit=n, seed=seed)
        return normalize(ds.x, CIFAR_MEAN, CIFAR_STD), ds.y, "CIFAR-10 (JPEG copy)", False
    print("\n" + "!" * 78 + "\n!! WARNING: no CIFAR-10 copy found (datasets.shared_cifar10()"
          " is None).\n!! FALLING BACK TO sklearn DIGITS resized to 3x32x32 for the resnet18 /"
          " vgg16\n!! cases: these are NOT CIFAR-10 figures.\n" + "!" * 78 + "\n",
          file=sys.stderr, flush=True)
    ds = load_dataset("digits", "train", input_shape=(3, 32, 32), limit=n, seed=seed)
    mean = tuple(ds.x.mean(dim=(0, 2, 3)).tolist())
    std = tuple(ds.x.std(dim=(0, 2, 3), correction=0).clamp_min(1e-6).tolist())
    name = "digits 3x32x32 (FALLBACK: CIFAR-10 copy not found; not CIFAR-10 figures)"
    return normalize(ds.x, mean, std), ds.y, name, True


def digits_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset("digits", "train", input_shape=(1, 8, 8), limit=n, seed=seed)
    mean, std = digits_stats()
    return normalize(ds.x, mean, std), ds.y


def cut_batches(model: str, split: str, x: torch.Tensor, batch: int) -> list[torch.Tensor]:
    """The edge segment's output per batch, in train mode, at the exporter's init weights."""
    spec = get_spec(model)
    built = build_segments(model, split, num_classes=10, input_shape=tuple(x.shape[1:]),
                           exit_cfg=ExitHeadConfig(channels=spec.exit_channels), seed=0,
                           edge_norm=spec.edge_norm)
    edge = built.step.edge.train()
    with torch.no_grad():
        return [edge(x[i : i + batch]).detach().clone() for i in range(0, len(x), batch)]


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def measure(cuts: list[torch.Tensor], labels: list[torch.Tensor], repeats: int) -> dict:
    """Every codec on the same batches."""
    out: dict[str, dict] = {}
    n_samples = sum(len(c) for c in cuts)
    ref_norm2 = sum(float(c.double().pow(2).sum()) for c in cuts)
    for name, codec in CODECS.items():
        msg_bytes = payload_bytes = 0
        err2 = 0.0
        enc_ms, dec_ms = [], []
        deflated = 0
        for cut, y in zip(cuts, labels, strict=True):
            meta = BatchMeta(RUN_ID, DEVICE_ID, 0)
            data = codec.encode(cut, y, meta, base=DEFAULT_SCHEME)
            recon = decode(data, expected_run_id=RUN_ID).tensor
            err2 += float((recon.double() - cut.double()).pow(2).sum())
            msg_bytes += len(data)
            scheme = codec.scheme(DEFAULT_SCHEME) if codec.quantized else None
            payload_bytes += len(data) - header_overhead(cut.shape, scheme, run_id=RUN_ID,
                                                         device_id=DEVICE_ID)
            deflated += bool(data[5] & 0x02)
            enc_ms.append(_median_ms(
                lambda cut=cut, y=y, codec=codec, meta=meta: codec.encode(
                    cut, y, meta, base=DEFAULT_SCHEME), repeats))
            dec_ms.append(_median_ms(lambda data=data: decode(data).tensor, repeats))
        out[name] = {
            "bits": codec.bits,
            "entropy": codec.entropy,
            "bytes_per_sample": round(msg_bytes / n_samples, 2),
            "payload_bytes_per_sample": round(payload_bytes / n_samples, 2),
            "rel_error": float((err2 / ref_norm2) ** 0.5) if ref_norm2 else 0.0,
            "encode_ms": round(statistics.median(enc_ms), 3),
            "decode_ms": round(statistics.median(dec_ms), 3),
            "batches_deflated": deflated,
        }
    f32 = out["float32"]["bytes_per_sample"]
    for row in out.values():
        row["ratio_vs_float32"] = round(f32 / row["bytes_per_sample"], 2)
    return out


def run_case(model: str, split: str, data_name: str, x: torch.Tensor, y: torch.Tensor,
             args: argparse.Namespace) -> dict:
    t = time.perf_counter()
    cuts = cut_batches(model, split, x, args.batch)
    labels = [y[i : i + args.batch] for i in range(0, len(y), args.batch)]
    zeros = sum(int((c == 0).sum()) for c in cuts) / sum(c.numel() for c in cuts)
    codecs = measure(cuts, labels, args.repeats)
    case = {"model": model, "split": split, "data": data_name,
            "cut_shape": list(cuts[0].shape[1:]), "batch": args.batch, "batches": len(cuts),
            "zero_fraction": round(zeros, 4), "codecs": codecs,
            "seconds": round(time.perf_counter() - t, 1)}
    print_case(case)
    return case


def print_case(case: dict) -> None:
    shape = "x".join(map(str, case["cut_shape"]))
    print(f"\n{case['model']} {case['split']} on {case['data']}: cut {shape}, batch "
          f"{case['batch']} x {case['batches']}, {100 * case['zero_fraction']:.0f}% exact zeros")
    print(f"  {'codec':<14} {'bytes/smp':>10} {'payload/smp':>12} {'x smaller':>10} "
          f"{'rel. error':>11} {'enc ms':>8} {'dec ms':>8}")
    for name, r in case["codecs"].items():
        print(f"  {name:<14} {r['bytes_per_sample']:>10.1f} {r['payload_bytes_per_sample']:>12.1f} "
              f"{r['ratio_vs_float32']:>10.2f} {r['rel_error']:>11.2e} {r['encode_ms']:>8.2f} "
              f"{r['decode_ms']:>8.2f}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    command = shlex.join(["python", "benchmarks/codec_sizes.py",
                          *(sys.argv[1:] if argv is None else argv)])
    n = args.batch * args.batches
    cases = []
    dx, dy = digits_images(n, args.seed)
    cases.append(run_case("smallcnn", "block1", "digits 1x8x8", dx, dy, args))
    cx, cy, cname, fallback = cifar_images(n, args.seed)
    for model, split in CIFAR_CASES:
        cases.append(run_case(model, split, cname, cx, cy, args))
    results = {
        "data": {"smallcnn": "scikit-learn digits 1x8x8 (train split)", "cifar_cases": cname,
                 "cifar_npz": None if fallback else str(shared_cifar10())},
        "data_fallback": fallback,
        "weights": "init (build_segments seed 0, as toolkit export writes edge_init.pt); "
                   "edge segment in train mode",
        "base_scheme": DEFAULT_SCHEME.scheme_id,
        "deflate_level": DEFLATE_LEVEL,
        "ids": {"run_id": RUN_ID, "device_id": DEVICE_ID},
        "threads": args.threads,
        "torch": torch.__version__,
        "cases": cases,
        "command": command,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    if fallback:
        print("WARNING: the resnet18/vgg16 figures are on the DIGITS FALLBACK, not CIFAR-10.",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
