"""Tiled training of the edge segment on a cluster of boards (``torch.distributed``, gloo).

One process per board. Every board holds a replica of the edge weights and, per layer group of
the plan (``toolkit.core.models.tiling``), computes its tile of the feature maps plus the halo the
group
needs. Per step:

1. rank 0 (which has the camera batch) sends each board the input region of group 0;
2. per group, forward on the tile; at each group boundary every board receives, from the
   owners, the rows/columns of its next input that it does not own (neighbour exchange,
   ``isend``/``irecv``);
3. the cut activation's tiles are gathered on rank 0, which runs the exit head and its loss;
   the gradient w.r.t. the cut goes back to the tiles;
4. backward group by group in reverse; a board's gradient w.r.t. its halo'd group input is
   sent back to the owners of those positions and summed there;
5. weight gradients are summed across boards (one all-reduce) and every board applies the same
   SGD step, so the replicas stay identical.

BatchNorm with batch statistics couples every position of a map, so each BatchNorm layer sums
per-channel statistics over the positions each board *owns* (forward: sums and count, then
squared deviations; backward: the two gradient sums): exact, but three small latency-bound
syncs per layer on top of the group-boundary exchanges (docs/cluster.md).

The result is the same function and the same SGD update as single-device training, up to
float32 summation order (tests/test_cluster.py holds it to that). Rank 0 then feeds the cut to
the usual int8 MQTT path (``edge-runtime cluster``).
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from edge_runtime.backends import EdgeBackend, StepResult
from toolkit.core import errors
from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.errors import HiertrainError, RunIncompleteError
from toolkit.core.models.edge_program import EdgeTrainStep
from toolkit.core.models.rewrites import host_stat_layers
from toolkit.core.models.tiling import ClusterPlan, Interval, Node, Rect, TilePlan, rect_intersect

log = logging.getLogger("edge_runtime")

PG_TIMEOUT_S = 120.0


# ------------------------------------------------------------------ communication
class Comm:
    """Point-to-point and all-reduce on the default process group, counting bytes sent."""

    def __init__(self) -> None:
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.sent: Counter[str] = Counter()

    def exchange(self, sends: dict[int, torch.Tensor], recvs: dict[int, tuple[int, ...]],
                 kind: str) -> dict[int, torch.Tensor]:
        """Send ``sends[dst]`` and receive a tensor of shape ``recvs[src]`` from each source."""
        bufs = {src: torch.empty(shape) for src, shape in recvs.items()}
        reqs = [dist.irecv(buf, src) for src, buf in bufs.items()]
        keep = []  # alive until every send completed
        for dst, t in sends.items():
            keep.append(t.contiguous())
            reqs.append(dist.isend(keep[-1], dst))
            self.sent[kind] += t.numel() * t.element_size()
        for r in reqs:
            r.wait()
        return bufs

    def all_reduce(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        """Sum over boards, in place; counts what a ring all-reduce sends per board."""
        if self.world > 1:
            dist.all_reduce(t)
            self.sent[kind] += 2 * (self.world - 1) * t.numel() * t.element_size() // self.world
        return t


def _sl(inner: Rect, outer: Rect) -> tuple[slice, slice, slice, slice]:
    """Index of rect ``inner`` inside a tensor covering ``outer``."""
    return (slice(None), slice(None),
            slice(inner[0].lo - outer[0].lo, inner[0].hi - outer[0].lo),
            slice(inner[1].lo - outer[1].lo, inner[1].hi - outer[1].lo))


def _shape(batch: int, channels: int, r: Rect) -> tuple[int, int, int, int]:
    return (batch, channels, r[0].size, r[1].size)


def _nonempty(r: Rect) -> bool:
    return r[0].size > 0 and r[1].size > 0


# ------------------------------------------------------------------ BatchNorm across tiles
class _TiledBatchNorm(torch.autograd.Function):
    """Batch-statistics BatchNorm over a map split across boards; see the module docstring.

    Statistics are summed over the owned part of the tile (each position once, cluster-wide)
    in float64; the whole tile (halo included) is normalised with them. Backward: the direct
    term is local; the two mean terms use cluster-wide sums of the local partial gradients over
    each board's computed region and are applied on owned positions only, so that summing the
    boards' input gradients gives the exact BatchNorm gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, own, comm: Comm, layer):  # noqa: D401
        owned = x[own]
        c = x.shape[1]
        s1 = torch.cat([owned.sum(dim=(0, 2, 3), dtype=torch.float64),
                        torch.tensor([owned.numel() / max(c, 1)], dtype=torch.float64)])
        comm.all_reduce(s1, "bn_stats")
        m = float(s1[-1])
        mean = (s1[:-1] / m)
        dev = owned.to(torch.float64) - mean.view(1, c, 1, 1)
        s2 = comm.all_reduce((dev * dev).sum(dim=(0, 2, 3)), "bn_stats")
        var = s2 / m
        mean32, var32 = mean.to(x.dtype), var.to(x.dtype)
        layer.last_stats = (mean32.clone(), (var * (m / max(m - 1, 1))).to(x.dtype))
        rstd = torch.rsqrt(var32 + layer.eps)
        xhat = (x - mean32.view(1, c, 1, 1)) * rstd.view(1, c, 1, 1)
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.own, ctx.comm, ctx.m = own, comm, m
        return xhat * weight.view(1, c, 1, 1) + bias.view(1, c, 1, 1)

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, weight = ctx.saved_tensors
        c = g.shape[1]
        db = g.sum(dim=(0, 2, 3))
        dw = (g * xhat).sum(dim=(0, 2, 3))
        sums = ctx.comm.all_reduce(torch.cat([db, dw]).to(torch.float64), "bn_stats")
        s1 = (sums[:c] / ctx.m).to(g.dtype).view(1, c, 1, 1)
        s2 = (sums[c:] / ctx.m).to(g.dtype).view(1, c, 1, 1)
        k = (weight * rstd).view(1, c, 1, 1)
        dx = g * k
        dx[ctx.own] -= k * (s1 + xhat[ctx.own] * s2)
        return dx, dw, db, None, None, None


# ------------------------------------------------------------------ running one tile
def _crop_pad(x: torch.Tensor, have: Rect, need: Rect, fill: float) -> torch.Tensor:
    """``need`` out of ``x`` (which covers ``have``); what lies outside ``have`` is the image
    border, filled with the layer's own padding value."""
    inner = rect_intersect(have, need)
    y = x[_sl(inner, have)]
    pads = (inner[1].lo - need[1].lo, need[1].hi - inner[1].hi,
            inner[0].lo - need[0].lo, need[0].hi - inner[0].hi)
    if any(pads):
        y = F.pad(y, pads, value=fill)
    return y


def run_node(node: Node, x: torch.Tensor, have: Rect, tile: TilePlan, comm: Comm) -> torch.Tensor:
    """Run ``node`` on ``x`` (covering ``have``); returns its output over ``tile.wants[node]``."""
    want = tile.wants[node.id]
    kind = node.kind
    if kind in ("conv", "maxpool"):
        need = (node.geo[0].need(want[0]), node.geo[1].need(want[1]))
        m = node.module
        if kind == "conv":
            return F.conv2d(_crop_pad(x, have, need, 0.0), m.weight, m.bias, m.stride, 0,
                            m.dilation, m.groups)
        return F.max_pool2d(_crop_pad(x, have, need, float("-inf")), m.kernel_size,
                            m.stride or m.kernel_size, 0, m.dilation)
    if kind == "seq":
        for child in node.children:
            x = run_node(child, x, have, tile, comm)
            have = tile.wants[child.id]
        return x if node.children else x[_sl(want, have)]
    if kind == "residual":
        main = run_node(node.children[0], x, have, tile, comm)
        return main + run_node(node.children[1], x, have, tile, comm)
    x = x[_sl(want, have)]
    if kind == "relu":
        return F.relu(x)
    if kind == "identity":
        return x
    if kind == "bn":
        m = node.module
        return _TiledBatchNorm.apply(x, m.weight, m.bias, _sl(tile.owns[node.id], want), comm, m)
    raise AssertionError(kind)


# ------------------------------------------------------------------ memory accounting
class _SavedBytes:
    """Bytes of distinct storages autograd saves for backward (the activation memory a
    training step holds at its peak, the end of the forward pass), parameters excluded."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.storages: dict[int, int] = {}

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if st.data_ptr() not in self.exclude:
            self.storages[st.data_ptr()] = st.nbytes()

    def hooks(self):
        def pack(t):
            self.add(t)
            return t

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)

    @property
    def total(self) -> int:
        return sum(self.storages.values())


# ------------------------------------------------------------------ the tiled trainer
@dataclass
class StepOutput:
    loss: float | None  # rank 0 only
    cut: torch.Tensor | None
    exit_logits: torch.Tensor | None
    seconds: float
    cpu_s: float  # CPU time of the training thread (not inflated by sharing cores)
    act_bytes: int  # activation storages held for backward on this board
    sent: dict[str, int] = field(default_factory=dict)  # bytes this board sent, this step


class TiledTrainer:
    """One board's share of tiled training; the same object on every rank.

    ``module`` is the full ``EdgeTrainStep`` (every rank builds it from the same artifacts, so
    the replicas start equal); only rank 0 runs its exit head.
    """

    def __init__(self, module: EdgeTrainStep, plan: ClusterPlan, comm: Comm, *, lr: float,
                 momentum: float = 0.0, weight_decay: float = 0.0, nesterov: bool = False
                 ) -> None:
        if plan.world != comm.world:
            raise HiertrainError(
                f"the tile plan is for {plan.world} boards but the process group has "
                f"{comm.world}; give --world-size equal to the grid's rows x cols")
        self.module = module.train()
        self.plan = plan
        self.comm = comm
        self.rank = comm.rank
        self.edge_params = [p for p in module.edge.parameters()]
        params = list(module.parameters()) if self.rank == 0 else self.edge_params
        self.optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum,
                                         weight_decay=weight_decay, nesterov=nesterov)
        self.state_bytes = sum(p.numel() * p.element_size() for p in params) * (
            3 if momentum else 2)
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in module.parameters()}

    # -- one step ---------------------------------------------------------------------------
    def step(self, x: torch.Tensor | None, y: torch.Tensor | None) -> StepOutput:
        """Forward, backward, gradient all-reduce, SGD and BN statistics; ``x``/``y`` on rank 0
        only (other ranks pass None)."""
        t0 = time.perf_counter()
        c0 = time.thread_time()
        sent_before = Counter(self.comm.sent)
        self.optimizer.zero_grad(set_to_none=True)
        saved = _SavedBytes(self._param_ptrs)
        with saved.hooks():
            inp = self._scatter_input(x)
            saved.add(inp)
            if x is not None:
                saved.add(x)
            groups = []  # (input leaf, output) per group
            for gi, g in enumerate(self.plan.groups):
                tile = g.tiles[self.rank]
                if gi > 0:
                    inp = self._halo_forward(groups[-1][1].detach(), gi)
                leaf = inp.requires_grad_(gi > 0)
                out = run_node(g.node, leaf, tile.in_rect, tile, self.comm)
                saved.add(out)
                groups.append((leaf, out))
            cut, loss, logits, cut_grad = self._exit(groups[-1][1].detach(), y, saved)
        act_bytes = saved.total
        grad = cut_grad
        for gi in range(len(self.plan.groups) - 1, -1, -1):
            leaf, out = groups[gi]
            torch.autograd.backward(out, grad)
            if gi > 0:
                grad = self._halo_backward(leaf.grad, gi)
        del groups
        self._allreduce_grads()
        self.optimizer.step()
        self._apply_stats()
        sent = {k: v - sent_before.get(k, 0) for k, v in self.comm.sent.items()}
        return StepOutput(loss=loss, cut=cut, exit_logits=logits,
                          seconds=time.perf_counter() - t0, cpu_s=time.thread_time() - c0,
                          act_bytes=act_bytes, sent=sent)

    # -- pieces -----------------------------------------------------------------------------
    def _scatter_input(self, x: torch.Tensor | None) -> torch.Tensor:
        g0 = self.plan.groups[0]
        n, c = self.plan.batch, self.plan.input_shape[0]
        h, w = self.plan.input_shape[1:]
        full: Rect = (Interval(0, h), Interval(0, w))
        if self.rank == 0:
            if x is None:
                raise HiertrainError("rank 0 needs the input batch")
            sends = {t.rank: x[_sl(t.in_rect, full)] for t in g0.tiles
                     if t.rank != 0 and _nonempty(t.in_rect)}
            self.comm.exchange(sends, {}, "input")
            return x[_sl(g0.tiles[0].in_rect, full)].contiguous()
        mine = g0.tiles[self.rank].in_rect
        return self.comm.exchange({}, {0: _shape(n, c, mine)}, "input")[0]

    def _halo_forward(self, prev_out: torch.Tensor, gi: int) -> torch.Tensor:
        """My input region of group ``gi`` from the owners of the previous group's output."""
        prev, g = self.plan.groups[gi - 1], self.plan.groups[gi]
        me, n, c = self.rank, self.plan.batch, g.in_shape[0]
        mine_out = prev.tiles[me].out_rect
        need = g.tiles[me].in_rect
        sends, recvs = {}, {}
        for t in g.tiles:
            if t.rank == me:
                continue
            part = rect_intersect(mine_out, t.in_rect)
            if _nonempty(part):
                sends[t.rank] = prev_out[_sl(part, mine_out)]
            part = rect_intersect(prev.tiles[t.rank].out_rect, need)
            if _nonempty(part):
                recvs[t.rank] = _shape(n, c, part)
        got = self.comm.exchange(sends, recvs, "halo_fwd")
        inp = torch.zeros(_shape(n, c, need))
        own = rect_intersect(mine_out, need)
        if _nonempty(own):
            inp[_sl(own, need)] = prev_out[_sl(own, mine_out)]
        for src, buf in got.items():
            inp[_sl(rect_intersect(prev.tiles[src].out_rect, need), need)] = buf
        return inp

    def _halo_backward(self, grad_in: torch.Tensor, gi: int) -> torch.Tensor:
        """Send the gradient of my halo'd input back to its owners; sum what I own."""
        prev, g = self.plan.groups[gi - 1], self.plan.groups[gi]
        me, n, c = self.rank, self.plan.batch, g.in_shape[0]
        mine_out = prev.tiles[me].out_rect
        need = g.tiles[me].in_rect
        sends, recvs = {}, {}
        for t in g.tiles:
            if t.rank == me:
                continue
            part = rect_intersect(prev.tiles[t.rank].out_rect, need)
            if _nonempty(part):
                sends[t.rank] = grad_in[_sl(part, need)]
            part = rect_intersect(mine_out, t.in_rect)
            if _nonempty(part):
                recvs[t.rank] = _shape(n, c, part)
        got = self.comm.exchange(sends, recvs, "halo_bwd")
        grad = torch.zeros(_shape(n, c, mine_out))
        own = rect_intersect(mine_out, need)
        if _nonempty(own):
            grad[_sl(own, mine_out)] += grad_in[_sl(own, need)]
        for src, buf in got.items():
            grad[_sl(rect_intersect(mine_out, g.tiles[src].in_rect), mine_out)] += buf
        return grad

    def _exit(self, out: torch.Tensor, y: torch.Tensor | None, saved: _SavedBytes):
        """Gather the cut on rank 0, run the exit head and its loss there, scatter d loss/d cut."""
        last = self.plan.groups[-1]
        n = self.plan.batch
        c, h, w = self.plan.cut_shape
        full: Rect = (Interval(0, h), Interval(0, w))
        if self.rank != 0:
            mine = last.tiles[self.rank].out_rect
            self.comm.exchange({0: out}, {}, "cut")
            grad = self.comm.exchange({}, {0: _shape(n, c, mine)}, "cut_grad")[0]
            return None, None, None, grad
        cut = torch.zeros(n, c, h, w)
        cut[_sl(last.tiles[0].out_rect, full)] = out
        recvs = {t.rank: _shape(n, c, t.out_rect) for t in last.tiles if t.rank != 0}
        for src, buf in self.comm.exchange({}, recvs, "cut").items():
            cut[_sl(last.tiles[src].out_rect, full)] = buf
        saved.add(cut)
        leaf = cut.requires_grad_(True)
        logits = self.module.exit(leaf)
        loss = F.cross_entropy(logits, y)
        torch.autograd.backward(loss, inputs=[leaf, *self.module.exit.parameters()])
        sends = {t.rank: leaf.grad[_sl(t.out_rect, full)] for t in last.tiles if t.rank != 0}
        self.comm.exchange(sends, {}, "cut_grad")
        return (cut.detach(), float(loss.detach()), logits.detach(),
                leaf.grad[_sl(last.tiles[0].out_rect, full)])

    def _allreduce_grads(self) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.edge_params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.comm.all_reduce(flat, "grads")
        i = 0
        for p in self.edge_params:
            k = p.numel()
            p.grad = flat[i:i + k].view_as(p).clone()
            i += k

    def _apply_stats(self) -> None:
        layers = host_stat_layers(self.module if self.rank == 0 else self.module.edge)
        for _, layer in layers:
            if layer.last_stats is not None:
                layer.update_running_stats(*layer.last_stats)
                layer.last_stats = None


# ------------------------------------------------------------------ rank 0's backend
class ClusterBackend(EdgeBackend):
    """Rank 0's backend: one tiled step across the cluster per call."""

    def __init__(self, manifest: Manifest, trainer: TiledTrainer) -> None:
        super().__init__(manifest)
        self.trainer = trainer
        self.name = f"cluster-{trainer.plan.world}x-torch"
        self.step_s: list[float] = []
        self.act_bytes = 0
        self.sent: dict[str, int] = {}

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        x, y = self.check_batch(x, y)
        control(1)
        out = self.trainer.step(x, y)
        self.step_s.append(out.seconds)
        self.act_bytes = max(self.act_bytes, out.act_bytes)
        self.sent = out.sent
        return StepResult(loss=out.loss, cut=out.cut, exit_logits=out.exit_logits)

    def stop(self) -> None:
        control(0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.trainer.module.state_dict().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        raise HiertrainError("resuming a cluster run from saved weights is not supported")


def control(flag: int) -> int:
    """Rank 0 broadcasts 1 ("step") or 0 ("stop"); the others receive it."""
    t = torch.tensor([flag], dtype=torch.int64)
    if dist.get_world_size() > 1:
        dist.broadcast(t, 0)
    return int(t)


# ------------------------------------------------------------------ process group
def init_process_group(rank: int, world: int, addr: str, port: int,
                       timeout_s: float = PG_TIMEOUT_S) -> None:
    """gloo over TCP; every collective and point-to-point wait is bounded by ``timeout_s``."""
    try:
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
    except Exception as exc:  # noqa: BLE001 - connection problems are user errors here
        raise HiertrainError(
            f"rank {rank}: cannot join the cluster at {addr}:{port} ({world} boards): {exc}; "
            "check --master-addr/--master-port and that every rank was started") from None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
    os.environ.setdefault("OMP_NUM_THREADS", str(n))



# ------------------------------------------------------------------ local clusters and jobs
def spawn_local(fn, args: tuple, world: int, timeout_s: float) -> None:
    """Run ``fn(rank, *args)`` in ``world`` fresh processes on this machine; bounded wait.

    Raises the failing rank's HiertrainError (same class, so the same exit code) if a
    process fails, RunIncompleteError if the cluster does not finish in time (the
    survivors are terminated).
    """
    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=0.5):
            if time.monotonic() > deadline:
                raise RunIncompleteError(
                    f"the local cluster of {world} processes did not finish within "
                    f"{timeout_s:.0f} s")
    except mp.ProcessRaisedException as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        last = lines[-1] if lines else "unknown error"
        error: type[HiertrainError] = HiertrainError
        if last.startswith("toolkit.core.errors.") and ": " in last:
            name, last = last.split(": ", 1)  # a HiertrainError: its one-sentence message
            # the same class, so the command exits with the rank's code (4: broker down...)
            cls = getattr(errors, name.rsplit(".", 1)[1], None)
            if isinstance(cls, type) and issubclass(cls, HiertrainError):
                error = cls
        raise error(f"cluster rank {exc.error_index} failed: {last}") from None
    except mp.ProcessExitedException as exc:
        raise HiertrainError(f"a cluster process died: {exc}") from None
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)


@dataclass
class SyntheticJob:
    """A self-contained tiled training run on seeded random data (tests and benchmarks)."""

    model: str
    split: str
    input_shape: tuple[int, int, int]
    batch: int
    grid: tuple[int, int]
    grouping: tuple[int, ...] | str  # sizes, or "all" / "each"
    steps: int
    out_dir: str
    port: int
    seed: int = 0
    lr: float = 0.05
    momentum: float = 0.9
    exit_channels: int = 16
    num_classes: int = 10
    threads: int = 1
    record_grads: bool = True


def job_module(job: SyntheticJob) -> EdgeTrainStep:
    """The job's edge step, identical on every process (same seed)."""
    from toolkit.core.models.exits import ExitHeadConfig
    from toolkit.core.models.segments import build_segments

    return build_segments(job.model, job.split, num_classes=job.num_classes,
                          input_shape=job.input_shape,
                          exit_cfg=ExitHeadConfig(channels=job.exit_channels),
                          seed=job.seed).step


def job_batches(job: SyntheticJob) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(job.seed + 1)
    return [(torch.randn(job.batch, *job.input_shape, generator=gen),
             torch.randint(0, job.num_classes, (job.batch,), generator=gen))
            for _ in range(job.steps)]


def job_plan(job: SyntheticJob, module: EdgeTrainStep) -> ClusterPlan:
    from toolkit.core.models.tiling import parse_grouping, plan_cluster, units_of

    units = units_of(module.edge)
    grouping = (parse_grouping(job.grouping, len(units)) if isinstance(job.grouping, str)
                else tuple(job.grouping))
    params = sum(p.numel() for p in module.edge.parameters())
    return plan_cluster(units, grouping, job.grid, job.input_shape, job.batch, params)


def synthetic_worker(rank: int, jobs: list[SyntheticJob]) -> None:
    """One rank of each job in turn (same grid and port: one process group); writes
    ``<out_dir>/rank<r>.pt`` per job."""
    set_threads(jobs[0].threads)
    world = jobs[0].grid[0] * jobs[0].grid[1]
    init_process_group(rank, world, "127.0.0.1", jobs[0].port)
    try:
        for job in jobs:
            _synthetic_job(rank, job)
    finally:
        dist.destroy_process_group()


def _synthetic_job(rank: int, job: SyntheticJob) -> None:
    module = job_module(job)
    plan = job_plan(job, module)
    trainer = TiledTrainer(module, plan, Comm(), lr=job.lr, momentum=job.momentum)
    data = job_batches(job) if rank == 0 else [(None, None)] * job.steps
    losses, seconds, cpu, act, sent, grads = [], [], [], [], [], {}
    for i, (x, y) in enumerate(data):
        out = trainer.step(x, y)
        losses.append(out.loss)
        seconds.append(out.seconds)
        cpu.append(out.cpu_s)
        act.append(out.act_bytes)
        sent.append(out.sent)
        if i == 0 and job.record_grads:
            grads = {n: p.grad.clone() for n, p in module.named_parameters()
                     if p.grad is not None}
    Path(job.out_dir).mkdir(parents=True, exist_ok=True)
    torch.save({"losses": losses, "seconds": seconds, "cpu_s": cpu, "act_bytes": act, "sent": sent,
                "grads": grads, "state": module.state_dict(),
                "state_bytes": trainer.state_bytes, "rss_mb": peak_rss_mb(),
                "plan": plan.summary()},
               Path(job.out_dir) / f"rank{rank}.pt")


def reference_run(job: SyntheticJob) -> dict[str, Any]:
    """The same job trained on one device, untiled (``EdgeTrainStep`` + SGD), for comparison."""
    module = job_module(job).train()
    opt = torch.optim.SGD(module.parameters(), lr=job.lr, momentum=job.momentum)
    losses, grads = [], {}
    for i, (x, y) in enumerate(job_batches(job)):
        opt.zero_grad(set_to_none=True)
        outs = module(x, y)
        outs[0].backward()
        if i == 0:
            grads = {n: p.grad.clone() for n, p in module.named_parameters()}
        opt.step()
        module.apply_stats([t.detach() for t in outs[3:]])
        losses.append(float(outs[0].detach()))
    return {"losses": losses, "grads": grads, "state": module.state_dict()}
