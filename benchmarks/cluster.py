"""Tiled multi-board training of the edge segment: step time, memory per worker, bytes exchanged.

For 1, 2 and 4 workers (local gloo processes, one thread each) and several layer groupings,
trains the VGG-16 ``stage2`` and ResNet-18 ``layer1`` edge segments (+ exit head) on seeded
random 32x32 batches with ``edge_runtime.cluster`` and records, per configuration:

- ``step_s``: median wall time of a training step on rank 0 (first step excluded);
- ``peak_mem_mb_per_worker``: the largest, over workers, of the activation storages autograd
  holds at the end of the forward pass (measured with saved-tensor hooks) + parameters,
  gradients and momentum; ``act_mb_per_rank`` lists every worker's activation share;
- ``bytes_exchanged``: bytes all workers sent in one step (point-to-point exactly; all-reduce as
  a ring sends it), measured by the executor, with the planner's breakdown;
- ``cpu_s_per_rank``: CPU seconds of each worker's training thread per step (median; gloo's
  own threads, which poll the sockets, are excluded); unlike wall time it is not inflated when
  workers share cores, so ``cpu_speedup_vs_1`` (one worker's CPU seconds over the busiest
  worker's) is the compute speed-up separate boards would get if the links were free;
- ``peak_rss_mb_per_rank``: each process's peak RSS (dominated by the ~300 MB of the Python +
  torch runtime itself, so it hides the feature-map savings).

Also plans (without running) 6 workers, the paper's largest cluster. Writes
``benchmarks/results/cluster.json`` and ``cluster.png``.

    python benchmarks/cluster.py [--steps 4] [--batch 8]

This machine has 2 cores: with 4 workers the processes share them, so step time cannot show
the paper's speed-up beyond 2 workers; memory per worker and bytes exchanged are what it can
measure faithfully (docs/cluster.md).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from edge_runtime.cluster import SyntheticJob, job_module, job_plan, spawn_local, synthetic_worker
from toolkit.core.models.tiling import (
    CostModel,
    choose_groups,
    default_grid,
    estimate_step_s,
    plan_cluster,
    units_of,
)
from toolkit.lab.broker import free_port

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "vgg16/stage2": dict(model="vgg16", split="stage2", input_shape=(3, 32, 32)),
    "resnet18/layer1": dict(model="resnet18", split="layer1", input_shape=(3, 32, 32)),
}
RPI4 = CostModel(gflops=12.0, mbps=100.0, latency_ms=0.5)  # rpi4 profile, 100 Mbit Ethernet


def _groupings(spec: dict, workers: int, batch: int) -> list[tuple[int, ...]]:
    job = SyntheticJob(**spec, batch=batch, grid=default_grid(workers), grouping="all",
                       steps=1, out_dir="", port=0)
    module = job_module(job)
    units = units_of(module.edge)
    params = sum(p.numel() for p in module.edge.parameters())
    out = [(len(units),), (1,) * len(units)]
    if workers > 1:
        best, _ = choose_groups(units, job.grid, spec["input_shape"], batch, params, RPI4)
        if best not in out:
            out.append(best)
    return out


def run_world(workers: int, steps: int, batch: int, tmp: Path) -> list[dict]:
    port = free_port()
    jobs, meta = [], []
    for name, spec in MODELS.items():
        for grouping in _groupings(spec, workers, batch):
            d = tmp / f"w{workers}-{len(jobs)}"
            jobs.append(SyntheticJob(**spec, batch=batch, grid=default_grid(workers),
                                     grouping=grouping, steps=steps, out_dir=str(d), port=port,
                                     record_grads=False))
            meta.append(name)
    t0 = time.monotonic()
    spawn_local(synthetic_worker, (jobs,), workers, 3600)
    print(f"  {workers} worker(s): {len(jobs)} configurations in {time.monotonic() - t0:.0f} s")
    rows = []
    for name, job in zip(meta, jobs, strict=True):
        model = _model_figures(job)
        ranks = [torch.load(f"{job.out_dir}/rank{r}.pt", weights_only=False)
                 for r in range(workers)]
        plan = ranks[0]["plan"]
        act = [max(r["act_bytes"]) for r in ranks]
        mem = [(a + r["state_bytes"]) / 2**20 for a, r in zip(act, ranks, strict=True)]
        sent = [sum(sum(s.values()) for s in [r["sent"][-1]]) for r in ranks]
        rows.append({
            "model": name, "workers": workers, "grid": plan["grid"],
            "groups": plan["groups"], "batch": batch,
            "step_s": statistics.median(ranks[0]["seconds"][1:]),
            "step_s_all": [round(s, 4) for s in ranks[0]["seconds"]],
            "cpu_s_per_rank": [round(statistics.median(r["cpu_s"][1:]), 4) for r in ranks],
            "peak_mem_mb_per_worker": round(max(mem), 3),
            "mem_mb_per_rank": [round(m, 3) for m in mem],
            "act_mb_per_rank": [round(a / 2**20, 3) for a in act],
            "bytes_exchanged": sum(sent),
            "planned_bytes": {**plan["p2p_bytes"], **plan["allreduce_bytes"]},
            "planned_gflops_fwd_per_rank": [round(p["gflops_fwd"], 4) for p in plan["per_rank"]],
            "peak_rss_mb_per_rank": [round(r["rss_mb"], 1) for r in ranks],
            **model,
        })
    return rows


def _model_figures(job: SyntheticJob) -> dict:
    """Planner figures for a job: the compute-bound speed-up (one device's FLOPs over the
    busiest worker's, halos included) and the cost model's step time on rpi4 boards."""
    module = job_module(job)
    plan = job_plan(job, module)
    one = plan_cluster(units_of(module.edge), plan.grouping(), (1, 1), job.input_shape,
                       job.batch, plan.param_count)
    flops_one = one.per_rank()[0]["gflops_fwd"]
    return {"compute_bound_speedup": round(
                flops_one / max(p["gflops_fwd"] for p in plan.per_rank()), 3),
            "model_step_s_rpi4_100mbit": round(estimate_step_s(plan, RPI4), 4),
            "model_speedup_rpi4_100mbit": round(
                estimate_step_s(one, RPI4) / estimate_step_s(plan, RPI4), 3)}


def planned_rows(batch: int, workers: int) -> list[dict]:
    """Planner-only figures (no run): feature-map MB and FLOPs per worker, bytes exchanged."""
    rows = []
    for name, spec in MODELS.items():
        job = SyntheticJob(**spec, batch=batch, grid=default_grid(workers), grouping="all",
                           steps=1, out_dir="", port=0)
        module = job_module(job)
        for grouping in _groupings(spec, workers, batch):
            job.grouping = grouping
            plan = job_plan(job, module)
            one = plan_cluster(units_of(module.edge), grouping, (1, 1), spec["input_shape"],
                               batch, plan.param_count)
            per = plan.per_rank()
            rows.append({"model": name, "workers": workers, "grid": list(plan.grid),
                         "groups": list(grouping), "batch": batch,
                         "planned_act_mb_per_worker": round(max(p["act_mb"] for p in per), 3),
                         "planned_act_mb_one_device": round(one.per_rank()[0]["act_mb"], 3),
                         "planned_max_gflops_fwd_per_worker": round(
                             max(p["gflops_fwd"] for p in per), 4),
                         "planned_gflops_fwd_one_device": round(one.per_rank()[0]["gflops_fwd"], 4),
                         "bytes_exchanged": plan.bytes_exchanged(),
                         **_model_figures(job)})
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(MODELS), figsize=(5.5 * len(MODELS), 7.5), squeeze=False)
    for col, name in enumerate(MODELS):
        mine = [r for r in rows if r["model"] == name]
        by_group: dict[str, list[dict]] = {}
        for r in mine:
            label = "all" if len(r["groups"]) == 1 else (
                "each" if set(r["groups"]) == {1} else "+".join(map(str, r["groups"])))
            by_group.setdefault(label, []).append(r)
        for label, rs in sorted(by_group.items()):
            rs.sort(key=lambda r: r["workers"])
            w = [r["workers"] for r in rs]
            axes[0][col].plot(w, [r["step_s"] for r in rs], marker="o", label=label)
            axes[1][col].plot(w, [r["peak_mem_mb_per_worker"] for r in rs], marker="o",
                              label=label)
        axes[0][col].set_title(f"{name}: step time (2-core host)")
        axes[0][col].set_ylabel("s / step")
        axes[1][col].set_title(f"{name}: peak memory per worker")
        axes[1][col].set_ylabel("MB (activations + weights state)")
        for ax in (axes[0][col], axes[1][col]):
            ax.set_xlabel("workers")
            ax.set_xticks([1, 2, 4])
            ax.grid(alpha=0.3)
            ax.legend(title="groups", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--workers", default="1,2,4")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="ht-bench-cluster-") as tmp:
        for w in (int(v) for v in args.workers.split(",")):
            rows.extend(run_world(w, args.steps, args.batch, Path(tmp)))
    base = {(r["model"], tuple(r["groups"])): r for r in rows if r["workers"] == 1}
    base_any = {r["model"]: r for r in rows if r["workers"] == 1}
    for r in rows:
        b = base.get((r["model"], tuple(r["groups"]))) or base_any[r["model"]]
        r["speedup_vs_1"] = round(b["step_s"] / r["step_s"], 3)
        r["cpu_speedup_vs_1"] = round(b["cpu_s_per_rank"][0] / max(r["cpu_s_per_rank"]), 3)
        r["mem_reduction_vs_1"] = round(b["peak_mem_mb_per_worker"] / r["peak_mem_mb_per_worker"],
                                        3)
    print(f"{'model':16} {'W':>2} {'groups':10} {'step s':>7} {'speedup':>7} {'MB/worker':>9} "
          f"{'mem x':>6} {'exchanged MB':>12} {'CPU x':>6} {'FLOP bound x':>12} "
          f"{'rpi4 model x':>12}")
    for r in rows:
        print(f"{r['model']:16} {r['workers']:>2} {'+'.join(map(str, r['groups'])):10} "
              f"{r['step_s']:7.3f} {r['speedup_vs_1']:7.2f} {r['peak_mem_mb_per_worker']:9.2f} "
              f"{r['mem_reduction_vs_1']:6.2f} {r['bytes_exchanged'] / 2**20:12.2f} "
              f"{r['cpu_speedup_vs_1']:6.2f} {r['compute_bound_speedup']:12.2f} "
              f"{r['model_speedup_rpi4_100mbit']:12.2f}")
    planned = planned_rows(args.batch, 6)
    for p in planned:
        print(f"planned 6 workers {p['model']:16} {'+'.join(map(str, p['groups'])):10} "
              f"act MB/worker {p['planned_act_mb_per_worker']:.2f} of "
              f"{p['planned_act_mb_one_device']:.2f}; exchanged {p['bytes_exchanged'] / 2**20:.2f}"
              f" MB; FLOP bound x{p['compute_bound_speedup']:.2f}; rpi4 model "
              f"x{p['model_speedup_rpi4_100mbit']:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = {"host": {"cpus": torch.get_num_threads(), "machine": platform.machine(),
                    "torch": torch.__version__, "threads_per_worker": 1},
           "command": "python benchmarks/cluster.py " + " ".join(
               f"--{k} {v}" for k, v in vars(args).items()),
           "rows": rows, "planned_6_workers": planned}
    # the issue asks for a list of rows: the file is that list, the context rides on each row
    for r in rows:
        r["host_cpus"] = out["host"]["cpus"]
    (RESULTS / "cluster.json").write_text(json.dumps(rows, indent=2) + "\n")
    (RESULTS / "cluster_planned.json").write_text(json.dumps(
        {"host": out["host"], "command": out["command"], "planned_6_workers": planned},
        indent=2) + "\n")
    plot(rows, RESULTS / "cluster.png")
    print(f"wrote {RESULTS / 'cluster.json'}, cluster_planned.json and cluster.png")


if __name__ == "__main__":
    main()
