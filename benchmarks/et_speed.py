"""ExecuTorch training step vs eager PyTorch, per exported edge program and lowering.

For each program (the small CNN, VGG-16 and ResNet-18 at their default splits,
batch 32, 32x32 CIFAR-shaped input) and each convolution lowering
(``toolkit export --lowering``), this exports the artifacts exactly as
``toolkit export`` does (parity gate on), loads them in the edge runtime's two
backends (``executorch``: the ``.pte``; ``torch``: the same module in eager
PyTorch) and times full steps (forward, backward, SGD, BatchNorm statistics)
*interleaved*, one ExecuTorch step then one eager step, so that load from other
processes on the machine hits both alike. The figure per backend is the median
step. Both use the same number of threads (``torch.set_num_threads`` and
ExecuTorch's thread pool).

``--profile`` also prints, per program, where an ExecuTorch step spends its time
(ETDump operator events, via ``executorch.devtools.Inspector``).

    python benchmarks/et_speed.py                 # -> benchmarks/results/et_speed.json
    python benchmarks/et_speed.py --programs smallcnn --lowerings matmul --profile
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from edge_runtime.backends import EDGE_TRAIN, make_backend
from toolkit.build.export import ExportConfig, export_artifacts
from toolkit.build.lowering import LOWERINGS
from toolkit.core.artifacts.manifest import load_manifest
from toolkit.core.models import get_spec

ROOT = Path(__file__).resolve().parents[1]

BATCH = 32
# program -> timed steps per lowering (the portable convolution kernels take seconds
# per VGG-16 step, so fewer of those)
STEPS = {"smallcnn": {"xnnpack": 30, "matmul": 20, "portable": 6},
         "vgg16": {"xnnpack": 8, "matmul": 4, "portable": 2},
         "resnet18": {"xnnpack": 6, "matmul": 3, "portable": 1}}
WARMUP = {"xnnpack": 2, "matmul": 2, "portable": 1}


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    _unsafe_reset_threadpool(n)


_AGGREGATE_EVENTS = {"Method::execute", "OPERATOR_CALL", "DELEGATE_CALL"}


def profile(art: Path, x: torch.Tensor, y: torch.Tensor, top: int = 12) -> list[dict]:
    """Operator time of one step of the training program, from an ETDump."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from executorch.devtools import Inspector
        from executorch.extension.pybindings.portable_lib import (
            _load_for_executorch_from_buffer,
        )

    data = (art / EDGE_TRAIN).read_bytes()
    module = _load_for_executorch_from_buffer(data, enable_etdump=True, debug_buffer_size=0)
    module.run_method("forward", (x, y))  # warm-up
    module.run_method("forward", (x, y))
    with tempfile.TemporaryDirectory() as tmp:
        dump = Path(tmp) / "step.etdp"
        module.write_etdump_result_to_file(str(dump))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inspector = Inspector(etdump_path=str(dump))
    total = collections.defaultdict(float)
    calls = collections.Counter()
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for ev in block.events:
            if ev.perf_data is None or ev.name in _AGGREGATE_EVENTS:
                continue
            # portable/optimized kernels are "native_call_<op>", XNNPACK operators
            # "<operator> #<n>" (inside a DELEGATE_CALL)
            name = ev.name.removeprefix("native_call_").split(" #")[0]
            name = name if ev.name.startswith("native_call_") else f"xnnpack: {name}"
            total[name] += sum(ev.perf_data.raw) / 2  # two runs were recorded
            calls[name] += 1
    step_ms = sum(total.values())
    rows = [{"op": op, "ms": ms, "share": ms / step_ms}
            for op, ms in sorted(total.items(), key=lambda kv: -kv[1])[:top]]
    for r in rows:
        print(f"      {r['op']:<48} {r['ms']:8.1f} ms  {100 * r['share']:5.1f} %")
    return rows


def measure(model: str, lowering: str, tmp: Path, threads: int, steps: int,
            do_profile: bool) -> dict:
    spec = get_spec(model)
    art = tmp / f"{model}-{lowering}"
    t0 = time.perf_counter()
    export_artifacts(ExportConfig(model=model, out=art, batch=BATCH, lowering=lowering,
                                  force=True))
    export_s = time.perf_counter() - t0
    manifest = load_manifest(art)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *spec.input_shape, generator=gen)
    y = torch.randint(0, 10, (BATCH,), generator=gen)
    et = make_backend("executorch", manifest)
    eager = make_backend("torch", manifest)
    for _ in range(WARMUP[lowering]):  # thread pools, allocator, first-run parameter setup
        et.step(x, y)
        eager.step(x, y)
    et_s, eager_s = [], []
    for _ in range(steps):
        t = time.perf_counter()
        et.step(x, y)
        et_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        eager.step(x, y)
        eager_s.append(time.perf_counter() - t)
    d = manifest.data
    row = {
        "program": f"{model}/{d['split']['point']}",
        "model": model,
        "split": d["split"]["point"],
        "batch": BATCH,
        "lowering": lowering,
        "layout": d["programs"]["edge_train"]["lowering"]["layout"],
        "threads": threads,
        "steps": steps,
        "et_step_s": statistics.median(et_s),
        "eager_step_s": statistics.median(eager_s),
        "et_step_s_min": min(et_s),
        "eager_step_s_min": min(eager_s),
        "parity_global_rel_grad_error": d["parity"]["global_rel_grad_error"],
        "parity_max_rel_grad_error": d["parity"]["max_rel_grad_error"],
        "export_s": export_s,
    }
    row["ratio"] = row["et_step_s"] / row["eager_step_s"]
    print(f"  {row['program']:<18} {lowering:<9} ET {1e3 * row['et_step_s']:9.1f} ms  "
          f"eager {1e3 * row['eager_step_s']:7.1f} ms  ratio {row['ratio']:6.2f}  "
          f"(threads {threads}, parity {row['parity_global_rel_grad_error']:.1e})",
          flush=True)
    if do_profile:
        row["profile"] = profile(art, x, y)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--programs", nargs="+", default=list(STEPS), choices=list(STEPS))
    ap.add_argument("--lowerings", nargs="+", default=list(LOWERINGS), choices=LOWERINGS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply the number of timed steps")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/et_speed.json")
    args = ap.parse_args()
    set_threads(args.threads)
    rows = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # lowering-major order, and the file rewritten after every row: the portable
        # rows take many minutes, and an interrupted run keeps what it measured
        for lowering in args.lowerings:
            for model in args.programs:
                steps = max(1, round(STEPS[model][lowering] * args.steps_scale))
                row = measure(model, lowering, Path(tmp), args.threads, steps, args.profile)
                row["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                                  "torch": torch.__version__,
                                  "load_average": list(os.getloadavg())}
                rows.append(row)
                args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
