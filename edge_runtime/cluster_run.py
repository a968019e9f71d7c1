"""``edge-runtime cluster``: several boards train one edge segment, tiled; rank 0 publishes.

Every rank loads the same artifacts (so the weight replicas start equal) and plans the same
tiling (``toolkit.core.models.tiling``: grid from ``--grid`` or the world size, layer groups from
``--groups`` or the cost model with the board profile's GFLOP/s and ``--board-link-mbps``/
``--board-link-latency-ms`` for the links *between* boards). Rank 0 owns the camera data and the
broker connection: it runs the ordinary training loop (``edge_runtime.train``) with a backend
whose step is one tiled cluster step, so the cut activations go out on exactly the int8 MQTT
path of ``edge-runtime train`` and the cloud trainer needs no change. Before each step rank 0
broadcasts "go" (or "stop" at the end) to the other ranks, which only compute.

Without ``--rank`` the command starts all ``--world-size`` ranks as local processes (one
machine, e.g. a multi-core board or a test); with ``--rank`` it is one board of a real cluster,
started once per board with the same ``--master-addr``/``--master-port``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from edge_runtime.cli_args import add_common_args, positive_int
from edge_runtime.config import TrainConfig
from toolkit.core.errors import HiertrainError

# torch, torch.distributed and the executor are imported inside the functions: building the
# CLI parser must stay light (``edge-runtime --help`` should not wait for torch).

log = logging.getLogger("edge_runtime")

CLUSTER_PG_TIMEOUT_S = 1800.0  # a worker waits this long for rank 0's next "go"


@dataclass
class ClusterConfig:
    train: TrainConfig  # rank 0's training run (artifacts, broker, data, epochs, ...)
    world_size: int
    rank: int | None = None  # None: start every rank here as a local process
    master_addr: str = "127.0.0.1"
    master_port: int | None = None  # None with local ranks: a free port
    grid: str | None = None  # "ROWSxCOLS"; default: the most square grid of world_size
    groups: str = "auto"  # auto | all | each | sizes like 2+2
    board: str | None = None  # profile for the cost model; default: the manifest's board
    link_mbps: float = 100.0  # link between boards (100 Mbit/s Ethernet by default)
    link_latency_ms: float = 0.5
    threads: int = 1
    timeout_s: float = 24 * 3600.0  # bound on a local cluster run


def plan_for(manifest, module, cfg: ClusterConfig):
    """The tile plan every rank computes identically; returns (plan, candidates table)."""
    from toolkit.core.artifacts.boards import load_board

    if manifest.privacy.adversarial:  # the tiles would train the edge without its proxy
        raise HiertrainError(
            "tiled training does not run the adversarial defence's proxy decoder; export "
            "with --privacy none or a noise defence (gaussian:S, laplace:S) for a cluster")
    from toolkit.core.models.tiling import (
        CostModel,
        choose_groups,
        default_grid,
        parse_grid,
        parse_grouping,
        plan_cluster,
        units_of,
    )

    grid = parse_grid(cfg.grid) if cfg.grid else default_grid(cfg.world_size)
    if grid[0] * grid[1] != cfg.world_size:
        raise HiertrainError(
            f"--grid {grid[0]}x{grid[1]} has {grid[0] * grid[1]} tiles but --world-size is "
            f"{cfg.world_size}; make rows x cols equal the number of boards")
    units = units_of(module.edge)
    shape = tuple(manifest.input_shape)
    batch = manifest.batch_size
    params = sum(p.numel() for p in module.edge.parameters())
    table: list = []
    if cfg.groups == "auto":
        board = load_board(cfg.board or manifest.data["board"]["name"])
        cost = CostModel(gflops=board.gflops, mbps=cfg.link_mbps, latency_ms=cfg.link_latency_ms)
        grouping, table = choose_groups(units, grid, shape, batch, params, cost)
    else:
        grouping = parse_grouping(cfg.groups, len(units))
    return plan_cluster(units, grouping, grid, shape, batch, params), table


def _optimizer_args(manifest) -> dict[str, Any]:
    opt = manifest.data["optimizer"]
    if opt.get("name", "sgd") != "sgd":
        raise HiertrainError(f"{manifest.root}: optimizer {opt.get('name')!r} is not supported "
                             "by the edge runtime; re-export with SGD")
    return {"lr": float(opt["lr"]), "momentum": float(opt.get("momentum", 0.0)),
            "weight_decay": float(opt.get("weight_decay", 0.0)),
            "nesterov": bool(opt.get("nesterov", False))}


def _rank_main(rank: int, cfg: ClusterConfig, summary_path: str | None) -> dict | None:
    import torch.distributed as dist

    from edge_runtime.cluster import (
        ClusterBackend,
        Comm,
        TiledTrainer,
        control,
        init_process_group,
        peak_rss_mb,
        set_threads,
    )
    from edge_runtime.train import run_training
    from toolkit.core.artifacts.manifest import load_manifest
    from toolkit.core.models.segments import load_segments

    set_threads(cfg.threads)
    logging.basicConfig(level=logging.WARNING if cfg.train.quiet else logging.INFO,
                        format=f"edge-runtime[{rank}]: %(message)s")
    init_process_group(rank, cfg.world_size, cfg.master_addr, cfg.master_port,
                       timeout_s=CLUSTER_PG_TIMEOUT_S)
    try:
        manifest = load_manifest(cfg.train.artifacts)
        module = load_segments(manifest).step
        plan, table = plan_for(manifest, module, cfg)
        trainer = TiledTrainer(module, plan, Comm(), **_optimizer_args(manifest))
        if rank != 0:
            steps = 0
            while control(0) == 1:
                trainer.step(None, None)
                steps += 1
            log.info("rank %d: %d tiled steps", rank, steps)
            return None
        log.info("cluster of %d: grid %dx%d, groups %s", plan.world, *plan.grid,
                 "+".join(map(str, plan.grouping())))
        backend = ClusterBackend(manifest, trainer)
        try:
            summary = run_training(cfg.train, backend=backend)
        finally:
            backend.stop()
        steps = backend.step_s
        summary["cluster"] = {
            **plan.summary(),
            "candidates": [{"groups": list(g), "estimated_step_s": round(t, 6)}
                           for g, t in table],
            "step_s_mean": sum(steps) / max(len(steps), 1),
            "rank0_act_mb": backend.act_bytes / 2**20,
            "rank0_sent_last_step": backend.sent,
            "rank0_peak_rss_mb": peak_rss_mb(),
        }
        if cfg.train.report:  # run_training wrote it without the cluster section
            report = json.loads(Path(cfg.train.report).read_text())
            report["cluster"] = summary["cluster"]
            Path(cfg.train.report).write_text(json.dumps(report, indent=2, default=str) + "\n")
        if summary_path:
            Path(summary_path).write_text(json.dumps(summary, indent=2, default=str) + "\n")
        return summary
    finally:
        dist.destroy_process_group()


def run_cluster(cfg: ClusterConfig) -> dict | None:
    """One rank (``cfg.rank`` given), or the whole cluster as local processes; returns rank 0's
    training summary (with a ``cluster`` section), or None on other ranks."""
    if cfg.world_size < 1:
        raise HiertrainError(f"--world-size must be >= 1, got {cfg.world_size}")
    if cfg.rank is not None:
        if not 0 <= cfg.rank < cfg.world_size:
            raise HiertrainError(
                f"--rank {cfg.rank} is outside 0..{cfg.world_size - 1} (--world-size)")
        if cfg.master_port is None:
            raise HiertrainError("--rank needs --master-port (the same on every board)")
        return _rank_main(cfg.rank, cfg, None)
    from edge_runtime.cluster import spawn_local
    from toolkit.core.artifacts.manifest import load_manifest
    from toolkit.core.models.segments import load_segments
    from toolkit.core.transport.ports import free_port

    # plan once here first, so that a user error is one line before any process starts
    manifest = load_manifest(cfg.train.artifacts)
    plan_for(manifest, load_segments(manifest).step, cfg)
    cfg = replace(cfg, master_port=cfg.master_port or free_port(), master_addr="127.0.0.1")
    with tempfile.TemporaryDirectory(prefix="ht-cluster-") as tmp:
        path = str(Path(tmp) / "summary.json")
        spawn_local(_rank_main, (cfg, path), cfg.world_size, cfg.timeout_s)
        return json.loads(Path(path).read_text())


def add_parser(sub) -> None:
    """The ``cluster`` subcommand (called from ``edge_runtime.cli``)."""
    sp = sub.add_parser("cluster", help="train the edge segment tiled across several boards "
                                        "(torch.distributed, gloo); rank 0 publishes")
    add_common_args(sp)
    sp.add_argument("--world-size", type=positive_int, required=True,
                    help="number of boards (processes)")
    sp.add_argument("--rank", type=int, default=None,
                    help="this board's rank; unset: start every rank on this machine")
    sp.add_argument("--master-addr", default="127.0.0.1", help="rank 0's address")
    sp.add_argument("--master-port", type=int, default=None,
                    help="rank 0's rendezvous port; unset (local ranks only): a free port")
    sp.add_argument("--grid", default=None,
                    help="tile grid ROWSxCOLS; unset: the most square grid of --world-size")
    sp.add_argument("--groups", default="auto",
                    help="layer groups: auto (cost model), all, each, or unit counts like 2+2")
    sp.add_argument("--board", default=None,
                    help="board profile for the cost model; unset: the manifest's board")
    sp.add_argument("--board-link-mbps", type=float, default=100.0,
                    help="bandwidth between boards in Mbit/s, for the cost model")
    sp.add_argument("--board-link-latency-ms", type=float, default=0.5,
                    help="latency between boards in ms, for the cost model")
    sp.add_argument("--plan-only", action="store_true",
                    help="print the tile plan (and the cost model's candidates) as JSON and exit")
    sp.add_argument("--epochs", type=positive_int, default=3,
                    help="passes over the training data")
    sp.add_argument("--limit", type=positive_int, default=None,
                    help="use only this many training samples; unset: all")
    sp.add_argument("--state-dir", default=".",
                    help="where rank 0 saves edge_weights-<device>.pt")
    sp.set_defaults(func=cmd_cluster)


def plan_only(cfg: ClusterConfig) -> dict:
    """The plan ``cfg`` would run, without starting anything (``--plan-only``)."""
    from toolkit.core.artifacts.manifest import load_manifest
    from toolkit.core.models.segments import load_segments

    manifest = load_manifest(cfg.train.artifacts)
    plan, table = plan_for(manifest, load_segments(manifest).step, cfg)
    return {**plan.summary(),
            "group_units": [[c.name for c in g.node.children] for g in plan.groups],
            "candidates": [{"groups": list(g), "estimated_step_s": round(t, 6)}
                           for g, t in table]}


def cmd_cluster(args) -> int:
    from toolkit.core.security import security_from_args

    train = TrainConfig(
        artifacts=args.artifacts, broker=args.broker, device_id=args.device_id, data=args.data,
        run_id=args.run_id, epochs=args.epochs, backend="torch", seed=args.seed,
        limit=args.limit, quiet=args.quiet, connect_timeout=args.connect_timeout,
        report=args.report, state_dir=args.state_dir,
        security=security_from_args(args, args.broker).for_device(args.run_id,
                                                                   args.device_id))
    cfg = ClusterConfig(
        train=train, world_size=args.world_size, rank=args.rank, master_addr=args.master_addr,
        master_port=args.master_port, grid=args.grid, groups=args.groups, board=args.board,
        link_mbps=args.board_link_mbps, link_latency_ms=args.board_link_latency_ms,
        threads=args.threads or 1)
    if args.plan_only:
        print(json.dumps(plan_only(cfg), indent=2))
        return 0
    summary = run_cluster(cfg)
    if summary is None:
        return 0
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return 0
    c = summary["cluster"]
    print(f"{summary['device']}: {summary['batches_published']} batches published by a cluster "
          f"of {c['workers']} ({c['grid'][0]}x{c['grid'][1]} tiles, groups "
          f"{'+'.join(map(str, c['groups']))}); {c['step_s_mean']:.3f} s/step, "
          f"{c['bytes_exchanged'] / 2**20:.2f} MiB exchanged between boards per step; "
          f"exit accuracy {summary['exit_accuracy']:.3f}")
    return 0
