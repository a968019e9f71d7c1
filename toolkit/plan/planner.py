"""``toolkit plan``: price every split point of a model on a board and a link, pick one.

For each split point: the edge's training memory (the exporter's estimate, so
a split the planner recommends is one ``toolkit export`` accepts), the edge
step time on the board, the bytes per sample each way, and the predicted epoch
time of ``ht``, ``split`` and ``cloud`` training (``toolkit.plan.runtime_model``
on a ``toolkit.plan.profiling`` measurement). The recommendation is the split that
fits the board and minimises the ``ht`` epoch; when another mode would be
faster the plan says so and why.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from toolkit.core.artifacts.boards import BoardProfile, load_board
from toolkit.core.errors import HiertrainError
from toolkit.core.models import get_spec
from toolkit.core.models.exits import ExitHeadConfig
from toolkit.plan.leakage import measured_leak
from toolkit.plan.profiling import ModelProfile, load_or_profile
from toolkit.plan.runtime_model import SUPPORTED_BITS, Link, n_batches, predict, reduction

CIFAR10_TRAIN = 50_000


@dataclass(frozen=True)
class PlanConfig:
    """What ``toolkit plan`` was asked; ``None`` fields take the board's defaults."""

    model: str
    board: str = "rpi4"
    link_kbps: float | None = None
    link_down_kbps: float | None = None
    """Cloud-to-edge rate (split learning's gradients); None: the uplink's (symmetric)."""
    link_latency_ms: float | None = None
    batch: int | None = None
    samples: int = CIFAR10_TRAIN
    bits: int = 8
    input_shape: tuple[int, int, int] | None = None
    num_classes: int = 10
    threads: int = 1
    repeats: int = 3
    max_seconds: float = 120.0
    profile_cache: Path | None = None
    edge_speed: float | None = None
    cloud_speedup: float = 1.0


def edge_speed_for(board: BoardProfile, profile: ModelProfile,
                   override: float | None = None) -> tuple[float, str]:
    """The board's training speed relative to the profiling machine, and where it came from.

    In order: ``override`` (``--edge-speed``), the profile's ``cpu.relative_speed``,
    else ``cpu.gflops`` over the GFLOP/s this machine sustained on the whole
    model, i.e. edge time = training FLOPs / board GFLOP/s, spread over the
    blocks as measured here.
    """
    if override is not None:
        return override, "--edge-speed"
    if board.relative_speed is not None:
        return board.relative_speed, f"cpu.relative_speed of {board.name}"
    host = profile.host_gflops
    return board.gflops / host, (
        f"{board.name} cpu.gflops {board.gflops:g} / {host:.1f} GFLOP/s measured here "
        f"({profile.threads} thread{'s' if profile.threads > 1 else ''})"
    )


def _check(cfg: PlanConfig) -> None:
    if cfg.bits not in SUPPORTED_BITS:
        raise HiertrainError(
            f"--bits must be one of {', '.join(map(str, SUPPORTED_BITS))}, got {cfg.bits}")
    for name, value in (("--edge-speed", cfg.edge_speed), ("--cloud-speedup", cfg.cloud_speedup)):
        if value is not None and not value > 0:
            raise HiertrainError(f"{name} must be positive, got {value}")
    if cfg.samples < 1:
        raise HiertrainError(f"--samples must be positive, got {cfg.samples}")


def make_plan(cfg: PlanConfig, *, show_progress: bool = False,
              log: Callable[[str], None] = lambda _msg: None) -> dict:
    """The whole plan as a JSON-ready dict (keys listed in docs/plan.md)."""
    from toolkit.plan.stats import split_stats

    _check(cfg)
    spec = get_spec(cfg.model)
    board = load_board(cfg.board)
    link = Link(kbps=board.link_kbps if cfg.link_kbps is None else cfg.link_kbps,
                latency_ms=(board.link_latency_ms if cfg.link_latency_ms is None
                            else cfg.link_latency_ms),
                down_kbps=cfg.link_down_kbps)
    batch = board.default_batch if cfg.batch is None else cfg.batch
    n = n_batches(cfg.samples, batch)
    shape = tuple(cfg.input_shape or spec.input_shape)
    profile, cached = load_or_profile(
        cfg.profile_cache, cfg.model, batch, shape, cfg.threads, cfg.repeats,
        num_classes=cfg.num_classes, max_seconds=cfg.max_seconds,
        show_progress=show_progress, log=log,
    )
    speed, source = edge_speed_for(board, profile, cfg.edge_speed)

    def run(mode: str, split: str | None):
        return predict(mode, profile, split, link, cfg.samples, cfg.bits,
                       edge_speed=speed, cloud_speed=cfg.cloud_speedup)

    cloud = run("cloud", None)
    rows = []
    for split in spec.splits:
        mem = split_stats(cfg.model, split, num_classes=cfg.num_classes, input_shape=shape,
                          exit_cfg=ExitHeadConfig(channels=profile.exit_channels)
                          ).train_memory_mb(batch)
        ht, sl = run("ht", split), run("split", split)
        rows.append({
            "split": split, "cut_shape": list(profile.exits[split].cut_shape),
            "edge_memory_mb": round(mem, 1), "fits": mem <= board.budget_mb,
            "edge_step_s": ht.per_batch["edge_s"],
            "up_bytes_per_sample": ht.up_bytes_per_batch / batch,
            "down_bytes_per_sample": sl.down_bytes_per_batch / batch,
            "ht": ht.to_dict(), "split_learning": sl.to_dict(),
            "ht_vs_split": reduction(ht.epoch_s, sl.epoch_s),
            "ht_vs_cloud": reduction(ht.epoch_s, cloud.epoch_s),
            "reveals": measured_leak(cfg.model, split, shape),
        })
    return {
        "model": cfg.model,
        "board": {"name": board.name, "budget_mb": board.budget_mb, "gflops": board.gflops,
                  "relative_speed": board.relative_speed},
        "link": link.to_dict(),
        "batch": batch, "samples": cfg.samples, "n_batches": n, "bits": cfg.bits,
        "input_shape": list(shape),
        "edge_speed": {"value": speed, "source": source},
        "cloud_speed": cfg.cloud_speedup,
        "profile": {"threads": profile.threads, "cpu": profile.machine.get("cpu"),
                    "host_gflops": profile.host_gflops, "full_step_s": profile.full_step_s,
                    "wall_s": profile.wall_s, "cached": cached},
        "splits": rows,
        "cloud": {**cloud.to_dict(), "up_bytes_per_sample": cloud.up_bytes_per_batch / batch},
        "recommendation": recommend(rows, cloud.epoch_s, cloud.bottleneck, board, batch,
                                    cloud.up_bytes_per_batch / batch),
    }


def recommend(rows: list[dict], cloud_s: float, cloud_bottleneck: str, board: BoardProfile,
              batch: int, image_bytes: float) -> dict:
    """The fitting split with the shortest ``ht`` epoch, and honest notes on the alternatives."""
    fitting = [r for r in rows if r["fits"]]
    notes: list[str] = []
    if not fitting:
        low = min(rows, key=lambda r: r["edge_memory_mb"])
        fits = max(1, int(batch * board.budget_mb / low["edge_memory_mb"]))
        notes.append(
            f"no split point fits the {board.name} budget of {board.budget_mb} MB at batch "
            f"{batch} (the smallest, {low['split']}, needs ~{low['edge_memory_mb']:.0f} MB); "
            f"use --batch {fits} or less"
        )
        return {"split": None, "mode": "cloud", "epoch_s": cloud_s, "fastest_mode": "cloud",
                "fastest_split": None, "fastest_epoch_s": cloud_s, "notes": notes}
    best = min(fitting, key=lambda r: r["ht"]["epoch_s"])
    ht_s = best["ht"]["epoch_s"]
    per = best["ht"]["per_batch"]
    notes.append(
        f"ht at {best['split']} is {best['ht']['bottleneck']}-bound (per batch: edge "
        f"{fmt_s(per['edge_s'])}, uplink {fmt_s(per['uplink_s'])}, cloud {fmt_s(per['cloud_s'])})"
    )
    options = [("ht", r["split"], r["ht"]["epoch_s"]) for r in fitting]
    options += [("split", r["split"], r["split_learning"]["epoch_s"]) for r in fitting]
    options.append(("cloud", None, cloud_s))
    mode, at, fastest = min(options, key=lambda o: o[2])
    if mode == "cloud":
        why = f"it is {cloud_bottleneck}-bound"
        if image_bytes < best["up_bytes_per_sample"]:
            why += (f"; raw images ({image_bytes:,.0f} B/sample) are smaller than the cut "
                    f"({best['up_bytes_per_sample']:,.0f} B/sample)")
        if ht_s - cloud_s < 0.05 * ht_s:
            why += "; a gap this small is within the profiling's accuracy"
        notes.append(f"cloud training would be faster ({fmt_s(cloud_s)} vs {fmt_s(ht_s)} per "
                     f"epoch): {why}. ht keeps the raw data on the board")
    elif mode == "split":
        notes.append(f"split learning at {at} would be faster ({fmt_s(fastest)} vs "
                     f"{fmt_s(ht_s)}): the exit head costs the board more than the link "
                     "and the cloud save")
    return {"split": best["split"], "mode": "ht", "epoch_s": ht_s, "fastest_mode": mode,
            "fastest_split": at, "fastest_epoch_s": fastest, "notes": notes}


def fmt_s(seconds: float) -> str:
    """A duration for people: 850 ms, 12.3 s, 4.5 min, 2.1 h."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _rates(link: dict) -> str:
    """``2000`` for a symmetric link, ``2000 up / 20000 down`` otherwise."""
    down = link.get("down_kbps", link["kbps"])
    return f"{link['kbps']:g}" if down == link["kbps"] else f"{link['kbps']:g} up / {down:g} down"


def _pct(x: float) -> str:
    return f"{x * 100:+.0f}%"


def render(plan: dict) -> str:
    """The plan as the table ``toolkit plan`` prints."""
    b, link = plan["board"], plan["link"]
    bits = "raw float32" if plan["bits"] == 32 else f"int{plan['bits']}"
    lines = [
        f"{plan['model']} on {b['name']} (training budget {b['budget_mb']} MB), link "
        f"{_rates(link)} kbit/s, {link['latency_ms']:g} ms one way; batch {plan['batch']}, "
        f"{plan['samples']:,} samples = {plan['n_batches']:,} batches per epoch; {bits} "
        "activations",
        f"edge speed {plan['edge_speed']['value']:.3g}x this machine "
        f"({plan['edge_speed']['source']}); cloud {plan['cloud_speed']:g}x this machine",
        "",
        f"{'split':<8} {'edge MB':>8} {'fits':>4} {'edge step':>10} {'up B/smp':>9} "
        f"{'down B/smp':>10} {'ht epoch':>10} {'split epoch':>11} {'ht vs split':>11} "
        f"{'ht vs cloud':>11} {'leak dB':>7}",
    ]
    for r in plan["splits"]:
        lines.append(
            f"{r['split']:<8} {r['edge_memory_mb']:>8.0f} {'yes' if r['fits'] else 'NO':>4} "
            f"{fmt_s(r['edge_step_s']):>10} {r['up_bytes_per_sample']:>9,.0f} "
            f"{r['down_bytes_per_sample']:>10,.0f} {fmt_s(r['ht']['epoch_s']):>10} "
            f"{fmt_s(r['split_learning']['epoch_s']):>11} {_pct(r['ht_vs_split']):>11} "
            f"{_pct(r['ht_vs_cloud']):>11} "
            f"{(format(r['reveals']['psnr'], '.1f') if r.get('reveals') else '-'):>7}"
        )
    c = plan["cloud"]
    lines += [
        "",
        f"cloud mode: raw uint8 images, {c['up_bytes_per_sample']:,.0f} B/sample up, epoch "
        f"{fmt_s(c['epoch_s'])} ({c['bottleneck']}-bound)",
        "(ht vs X: the share of X's epoch time that ht saves; negative: ht is slower)",
    ]
    leaks = [r["reveals"] for r in plan["splits"] if r.get("reveals")]
    if leaks:
        lines.append(
            f"(leak dB: PSNR at which a decoder rebuilds CIFAR-10 images from the int8 cut, "
            f"benchmarks/privacy.py; {leaks[0]['baseline_psnr']:.1f} dB = guessing the mean "
            "image, higher reveals more; --privacy lowers it: docs/privacy.md)")
    else:
        lines.append("(leak dB: not measured for this model and input; toolkit attack "
                     "measures what a cut reveals: docs/privacy.md)")
    lines += [
        "",
    ]
    rec = plan["recommendation"]
    if rec["split"] is None:
        lines.append("recommendation: none of the split points fits this board")
    else:
        lines.append(f"recommendation: split at {rec['split']}, ht epoch {fmt_s(rec['epoch_s'])}")
    lines += [f"  note: {n}" for n in rec["notes"]]
    lines.append(
        "  note: edge times are eager PyTorch (edge-runtime --backend torch); the exported "
        "ExecuTorch program (default lowering) took 1.2-2.1x as long here "
        "(benchmarks/results/et_speed.json): divide --edge-speed accordingly (docs/plan.md)"
    )
    return "\n".join(lines)
