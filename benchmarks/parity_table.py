"""The gradient-parity gate on every shipped torchvision model and split point.

For each shipped model and each of its named split points, ``toolkit export`` as
a user runs it (default lowering, verification on, the model's native input):
torchvision's networks (``toolkit.core.models.zoo.TORCHVISION_SPLITS``) at
224x224 with ``--batch`` images on ``--board``, the built-in CIFAR models at
32x32 with the rpi4's default batch of 32. The figures are the ones the export
writes into the manifest's ``parity`` record (the median of three batches,
``toolkit.build.parity.check_batches``), or the one-line refusal when the gate
(``toolkit.build.parity.gate_failure``) says no.

Each row is appended to ``benchmarks/results/parity.json`` as it finishes (a rerun
skips rows already there for the same settings, so an interrupted run resumes), and
``benchmarks/results/parity.md`` is rewritten from all rows: the table docs/export.md
quotes.

    python benchmarks/parity_table.py                     # all (about two hours here)
    python benchmarks/parity_table.py --models torchvision:resnet18 --batch 8
    python benchmarks/parity_table.py --retry-refused     # after a fix: the refused rows again
    python benchmarks/parity_table.py --table             # parity.md from the rows so far
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from toolkit.build.export import ExportConfig, export_artifacts
from toolkit.core.errors import HiertrainError
from toolkit.core.models import MODELS, get_spec
from toolkit.core.models.zoo import TORCHVISION_PREFIX, TORCHVISION_SPLITS

RESULTS = Path(__file__).resolve().parent / "results"


def load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text())["rows"] if path.exists() else []


def save_rows(path: Path, rows: list[dict], command: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
    tmp.replace(path)


BUILTIN_BATCH, BUILTIN_BOARD = 32, "rpi4"


def settings(model: str, args: argparse.Namespace) -> tuple[int, str]:
    """(batch, board): torchvision's at --batch/--board, the built-ins at the rpi4 default."""
    if model.startswith(TORCHVISION_PREFIX):
        return args.batch, args.board
    return BUILTIN_BATCH, BUILTIN_BOARD


def export_row(model: str, split: str, args: argparse.Namespace) -> dict:
    batch, board = settings(model, args)
    shape = get_spec(model).input_shape
    row: dict = {"model": model, "split": split, "batch": batch, "board": board,
                 "input": "x".join(map(str, shape)), "lowering": args.lowering}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        try:
            m = export_artifacts(ExportConfig(
                model=model, out=Path(tmp) / "a", split=split, board=board,
                batch=batch, lowering=args.lowering))
        except HiertrainError as exc:
            row.update(passed=False, refusal=str(exc))
        else:
            p = m.data["parity"]
            row.update(passed=True, cut=m.data["cut"]["shape"],
                       program=m.data["programs"]["edge_train"]["lowering"]["convolutions"],
                       xnnpack_refused=p.get("xnnpack_refused"),
                       rewrites=sorted({r["to"] for r in m.data["rewrites"]}),
                       vs_eager=p["global_rel_grad_error"],
                       worst_tensor_vs_eager=p["max_rel_grad_error"],
                       vs_float64=p["float64_rel_grad_error"],
                       eager_vs_float64=p["eager_float64_rel_grad_error"],
                       loss_abs_error=p["loss_abs_error"])
    row["export_s"] = round(time.monotonic() - t0, 1)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| model | input | batch | split | cut | vs eager f32 | worst tensor | vs float64 | "
             "eager f32 vs float64 | gate | export s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['model']} | {r['input']} | {r['batch']} | {r['split']} |"
        if r["passed"]:
            gate = ("passed without XNNPACK (matmul; XNNPACK's program refused)"
                    if r.get("xnnpack_refused") else "passed")
            lines.append(
                f"{head} {'x'.join(map(str, r['cut']))} | "
                f"{r['vs_eager']:.1e} | {r['worst_tensor_vs_eager']:.1e} | "
                f"{r['vs_float64']:.1e} | {r['eager_vs_float64']:.1e} | {gate} | "
                f"{r['export_s']:.0f} |")
        else:
            lines.append(f"{head} | | | | | refused: "
                         f"{r['refusal']} | {r['export_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(
        [TORCHVISION_PREFIX + a for a in TORCHVISION_SPLITS] + list(MODELS)))
    ap.add_argument("--batch", type=int, default=8, help="torchvision models' batch")
    ap.add_argument("--board", default="jetson-orin-nano",
                    help="torchvision models' board profile (its memory budget must admit the "
                         "batch at 224 px)")
    ap.add_argument("--lowering", default="xnnpack")
    ap.add_argument("--out", default=str(RESULTS / "parity.json"))
    ap.add_argument("--table", action="store_true",
                    help="only write parity.md from the rows already in the results file")
    ap.add_argument("--retry-refused", action="store_true",
                    help="export again the rows the gate refused (after a fix), replacing them")
    args = ap.parse_args(argv)
    command = "python benchmarks/parity_table.py " + shlex.join(argv or sys.argv[1:])
    out = Path(args.out)
    rows = load_rows(out)
    if args.table and out.exists():  # the rows' own command, not this one
        command = json.loads(out.read_text())["command"]
    models = args.models.split(",")
    # every model's default split first, then the others: an interrupted run has covered
    # every model (rows are appended as they finish; a rerun resumes)
    jobs = [(m, get_spec(m).default_split) for m in models]
    jobs += [(m, s) for m in models for s in get_spec(m).splits if (m, s) not in jobs]
    for model, split in [] if args.table else jobs:
        batch, board = settings(model, args)
        key = (model, split, batch, board, args.lowering)
        done = [r for r in rows
                if (r["model"], r["split"], r["batch"], r["board"], r["lowering"]) == key]
        if done and not (args.retry_refused and not done[0]["passed"]):
            continue
        rows = [r for r in rows if r not in done]
        print(f"[parity] {model} at {split}, batch {batch} ...", flush=True)
        row = export_row(model, split, args)
        print(f"[parity]   {json.dumps(row)}", flush=True)
        rows.append(row)
        save_rows(out, rows, command)
    order = {m: i for i, m in enumerate(models)}
    rows = sorted(rows, key=lambda r: (order.get(r["model"], len(order)), r["model"],
                                       get_spec(r["model"]).splits.index(r["split"])))
    missing = [f"{m} {s}" for m, s in jobs
               if not any((r["model"], r["split"]) == (m, s) for r in rows)]
    note = (f"\n\nNot measured yet ({len(missing)}; a rerun adds them): {', '.join(missing)}."
            if missing else "")
    out.with_suffix(".md").write_text(f"Written by `{command}`.{note}\n\n" + table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
