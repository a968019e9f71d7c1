"""Tiling planner: split an edge segment's feature maps into spatial tiles across devices.

After Rama, Threadgill and Gerstlauer (arXiv 2409.09083): the first CNN layers are dominated by
feature maps, not weights, so a cluster of small boards can share them by cutting every map
into a grid of tiles, one per device. Consecutive layers are fused into *groups*: a device runs
a whole group on its tile plus the border (the *halo*) that the group's receptive field needs,
so devices exchange data only at group boundaries. Bigger groups mean bigger halos (redundant
compute), smaller groups mean more exchanges; :func:`choose_groups` trades one against the
other with a cost model from a board profile.

Everything here is pure arithmetic on shapes; ``edge_runtime.cluster`` executes the plan.

Halo arithmetic (per axis; rows and columns are independent). A layer with kernel ``k``,
stride ``s``, padding ``p`` and dilation ``d`` that must produce output rows ``[a, b)`` needs
input rows ``[a*s - p, (b-1)*s - p + (k-1)*d + 1)``. Rows outside ``[0, L)`` are the layer's own
zero padding, so a tile pads only where its region meets the true image border and runs the
layer with ``padding=0``; interior borders use real neighbour rows. Pointwise layers (BatchNorm,
ReLU) need exactly the rows they produce; a residual block needs the hull of its two branches.

Every intermediate map is also *covered*: the first tile's region starts at 0, the last ends at
L, and neighbouring regions leave no gap (a 1x1 stride-2 conv skips rows no output needs, but a
BatchNorm before it still counts them in its batch statistics). Each map is partitioned into
*owned* rows, one owner per position, inside the owner's computed region: BatchNorm statistics
are summed over owned positions only, so each position counts once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from torch import nn

from toolkit.core.errors import HiertrainError

FLOAT_BYTES = 4


# ------------------------------------------------------------------ intervals and rectangles
@dataclass(frozen=True)
class Interval:
    """Half-open ``[lo, hi)`` along one axis."""

    lo: int
    hi: int

    @property
    def size(self) -> int:
        return max(0, self.hi - self.lo)

    def clip(self, length: int) -> Interval:
        return Interval(max(self.lo, 0), min(self.hi, length))

    def intersect(self, other: Interval) -> Interval:
        return Interval(max(self.lo, other.lo), min(self.hi, other.hi))

    def hull(self, other: Interval) -> Interval:
        return Interval(min(self.lo, other.lo), max(self.hi, other.hi))


Rect = tuple[Interval, Interval]  # (rows, cols)


def rect_area(r: Rect) -> int:
    return r[0].size * r[1].size


def rect_intersect(a: Rect, b: Rect) -> Rect:
    return (a[0].intersect(b[0]), a[1].intersect(b[1]))


def partition(length: int, parts: int) -> list[Interval]:
    """``length`` positions in ``parts`` contiguous, near-equal intervals."""
    cuts = [round(i * length / parts) for i in range(parts + 1)]
    return [Interval(cuts[i], cuts[i + 1]) for i in range(parts)]


def _cover(needs: list[Interval], length: int) -> list[Interval]:
    """Clip to the map and close gaps so the regions' union is the whole map (see module doc)."""
    clipped = [iv.clip(length) for iv in needs]
    out = []
    n = len(clipped)
    for i, iv in enumerate(clipped):
        lo = 0 if i == 0 else iv.lo
        hi = length if i == n - 1 else max(iv.hi, clipped[i + 1].lo)
        out.append(Interval(lo, hi))
    return out


def _owned(regions: list[Interval], length: int) -> list[Interval]:
    """A partition of ``[0, length)`` with each part inside its tile's computed region."""
    n = len(regions)
    cuts = [0]
    for i in range(1, n):
        target = round(i * length / n)
        cuts.append(min(max(target, regions[i].lo), regions[i - 1].hi))
    cuts.append(length)
    return [Interval(cuts[i], cuts[i + 1]) for i in range(n)]


# ------------------------------------------------------------------ the tiled program (nodes)
@dataclass(frozen=True)
class Geometry:
    """kernel, stride, padding, dilation of one axis."""

    k: int = 1
    s: int = 1
    p: int = 0
    d: int = 1

    def out_len(self, length: int) -> int:
        return (length + 2 * self.p - self.d * (self.k - 1) - 1) // self.s + 1

    def need(self, out: Interval) -> Interval:
        """Input rows (unclipped: rows < 0 or >= L are padding) that produce ``out``."""
        return Interval(out.lo * self.s - self.p,
                        (out.hi - 1) * self.s - self.p + (self.k - 1) * self.d + 1)


_ids = itertools.count()


@dataclass(eq=False)
class Node:
    """One layer (or block) of the tiled program; ``module`` is the real layer it runs."""

    kind: str  # conv | maxpool | bn | relu | identity | seq | residual
    module: nn.Module | None = None
    geo: tuple[Geometry, Geometry] = (Geometry(), Geometry())
    children: list[Node] = field(default_factory=list)  # seq: in order; residual: [main, short]
    name: str = ""
    id: int = field(default_factory=lambda: next(_ids))

    def out_len(self, length: int, axis: int) -> int:
        if self.kind == "seq":
            for c in self.children:
                length = c.out_len(length, axis)
            return length
        if self.kind == "residual":
            return self.children[0].out_len(length, axis)
        return self.geo[axis].out_len(length)

    def out_channels(self, c: int) -> int:
        if self.kind == "conv":
            return self.module.out_channels
        if self.kind in ("seq", "residual"):
            for ch in self.children[:1] if self.kind == "residual" else self.children:
                c = ch.out_channels(c)
        return c

    def walk(self):
        yield self
        for c in self.children:
            yield from c.walk()

    def plan(self, wants: list[Interval], length: int, axis: int,
             rec: dict[int, list[Interval]]) -> list[Interval]:
        """Record ``wants`` (this node's output regions) and return the covered input regions."""
        rec[self.id] = wants
        if self.kind in ("conv", "maxpool"):
            return _cover([self.geo[axis].need(w) for w in wants], length)
        if self.kind in ("bn", "relu", "identity"):
            return wants
        if self.kind == "seq":
            if not self.children:  # identity shortcut
                return wants
            lengths = [length]
            for c in self.children[:-1]:
                lengths.append(c.out_len(lengths[-1], axis))
            need = wants
            for c, ln in zip(reversed(self.children), reversed(lengths), strict=True):
                need = c.plan(need, ln, axis, rec)
            return need
        if self.kind == "residual":
            main, short = self.children
            m = main.plan(wants, length, axis, rec)
            s = short.plan(wants, length, axis, rec)
            return _cover([a.hull(b) for a, b in zip(m, s, strict=True)], length)
        raise AssertionError(self.kind)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _geometry(mod: nn.Module, name: str) -> tuple[Geometry, Geometry]:
    if isinstance(mod, nn.Conv2d) and (isinstance(mod.padding, str) or
                                       mod.padding_mode != "zeros"):
        raise HiertrainError(
            f"{name}: conv padding {mod.padding!r}/{mod.padding_mode} cannot be tiled; "
            "use numeric zero padding")
    if isinstance(mod, nn.MaxPool2d) and (mod.ceil_mode or mod.return_indices):
        raise HiertrainError(f"{name}: MaxPool2d with ceil_mode/return_indices cannot be tiled")
    k, s = _pair(mod.kernel_size), _pair(mod.stride if mod.stride else mod.kernel_size)
    p, d = _pair(mod.padding), _pair(mod.dilation)
    return tuple(Geometry(k[a], s[a], p[a], d[a]) for a in (0, 1))  # type: ignore[return-value]


def compile_module(mod: nn.Module, name: str = "") -> Node:
    """The tiled program of ``mod``; refuses (naming the layer) what cannot be tiled exactly."""
    from toolkit.core.models.rewrites import HostStatsBatchNorm2d

    kind = type(mod).__name__
    if isinstance(mod, nn.Sequential):
        return Node("seq", mod, children=[compile_module(c, f"{name}.{n}".lstrip("."))
                                          for n, c in mod.named_children()], name=name)
    if isinstance(mod, nn.Conv2d):
        return Node("conv", mod, _geometry(mod, name), name=name)
    if isinstance(mod, nn.MaxPool2d):
        return Node("maxpool", mod, _geometry(mod, name), name=name)
    if isinstance(mod, HostStatsBatchNorm2d):
        return Node("bn", mod, name=name)
    if isinstance(mod, nn.ReLU):
        return Node("relu", mod, name=name)
    if isinstance(mod, nn.Identity):
        return Node("identity", mod, name=name)
    if kind == "BasicBlock" and hasattr(mod, "conv1") and hasattr(mod, "conv2"):
        main = Node("seq", children=[compile_module(mod.conv1, f"{name}.conv1"),
                                     compile_module(mod.bn1, f"{name}.bn1"),
                                     Node("relu", name=f"{name}.relu"),
                                     compile_module(mod.conv2, f"{name}.conv2"),
                                     compile_module(mod.bn2, f"{name}.bn2")], name=name)
        short = (compile_module(mod.downsample, f"{name}.downsample")
                 if mod.downsample is not None else Node("seq", name=f"{name}.identity"))
        block = Node("residual", mod, children=[main, short], name=name)
        return Node("seq", children=[block, Node("relu", name=f"{name}.relu_out")], name=name)
    if isinstance(mod, nn.BatchNorm2d):
        raise HiertrainError(
            f"{name}: plain BatchNorm2d; build the edge with toolkit.core.models.segments "
            "(HostStatsBatchNorm2d)")
    raise HiertrainError(
        f"{name}: {kind} cannot be tiled (supported: Conv2d, MaxPool2d, BatchNorm, ReLU, "
        "ResNet BasicBlock); move the split point before it")


def units_of(edge: nn.Module) -> list[Node]:
    """The atomic units a grouping may cut between: each conv or residual block together with
    the pointwise layers and pools that follow it."""
    flat: list[Node] = []

    def flatten(node: Node) -> None:
        if node.kind == "seq" and not any(c.kind == "residual" for c in node.children):
            for c in node.children:
                flatten(c)
        else:
            flat.append(node)

    flatten(compile_module(edge))
    units: list[list[Node]] = []
    for node in flat:
        if node.kind in ("conv", "seq", "residual") or not units:
            units.append([node])
        else:
            units[-1].append(node)
    return [Node("seq", children=u, name=u[0].name) for u in units]


# ------------------------------------------------------------------ the plan
@dataclass
class TilePlan:
    """What one device computes in one group."""

    rank: int
    in_rect: Rect  # input region it needs (its tile + halo, clipped to the map)
    out_rect: Rect  # output region it owns
    wants: dict[int, Rect]  # node id -> region of that node's output this device computes
    owns: dict[int, Rect]  # node id -> owned part of that node's output (BN statistics)
    flops: float  # forward FLOPs on this tile (halo included)
    act_bytes: int  # feature-map bytes this tile holds for backward (approximate)
    recv_bytes: int  # bytes of its input it receives from other devices


@dataclass
class GroupPlan:
    node: Node  # a seq of the group's units
    units: tuple[int, ...]
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    tiles: list[TilePlan]
    bn_channels: list[int]  # channel count of each BatchNorm (one stats sync each)


@dataclass
class ClusterPlan:
    grid: tuple[int, int]
    batch: int
    input_shape: tuple[int, int, int]
    groups: list[GroupPlan]
    param_count: int

    @property
    def world(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def cut_shape(self) -> tuple[int, int, int]:
        return self.groups[-1].out_shape

    def grouping(self) -> tuple[int, ...]:
        return tuple(len(g.units) for g in self.groups)

    def p2p_bytes(self) -> dict[str, int]:
        """Bytes sent between devices per training step, by purpose (exact, what the executor
        sends): input tiles from rank 0, halos forward and their gradients backward at each
        group boundary, the cut gathered on rank 0 and its gradient scattered back."""
        n, w = self.batch, self.world
        c0 = self.input_shape[0]
        scatter = sum(rect_area(t.in_rect) for t in self.groups[0].tiles if t.rank != 0)
        halo = sum(t.recv_bytes for g in self.groups[1:] for t in g.tiles)
        cut_c = self.cut_shape[0]
        gather = sum(rect_area(t.out_rect) for t in self.groups[-1].tiles if t.rank != 0)
        if w == 1:
            return {"input": 0, "halo_fwd": 0, "halo_bwd": 0, "cut": 0, "cut_grad": 0}
        return {"input": scatter * n * c0 * FLOAT_BYTES, "halo_fwd": halo, "halo_bwd": halo,
                "cut": gather * n * cut_c * FLOAT_BYTES,
                "cut_grad": gather * n * cut_c * FLOAT_BYTES}

    def allreduce_bytes(self) -> dict[str, int]:
        """Collective traffic, all devices together, as a ring all-reduce sends it
        (2 (W-1)/W x payload per device): weight gradients once per step, and per BatchNorm two
        forward syncs (C sums + a count, then C squared deviations) and one backward sync
        (2 C sums)."""
        w = self.world
        if w == 1:
            return {"grads": 0, "bn_stats": 0}
        ring = 2 * (w - 1)  # x payload, all devices together
        bn_vals = sum(4 * c + 1 for g in self.groups for c in g.bn_channels)
        return {"grads": ring * self.param_count * FLOAT_BYTES,
                "bn_stats": ring * bn_vals * 8}  # the executor sums statistics in float64

    def bytes_exchanged(self) -> int:
        return sum(self.p2p_bytes().values()) + sum(self.allreduce_bytes().values())

    def per_rank(self) -> list[dict]:
        """Per device: forward GFLOPs and feature-map MB over all groups."""
        out = []
        for r in range(self.world):
            out.append({
                "rank": r,
                "gflops_fwd": sum(g.tiles[r].flops for g in self.groups) / 1e9,
                "act_mb": sum(g.tiles[r].act_bytes for g in self.groups) / 2**20,
            })
        return out

    def summary(self) -> dict:
        return {
            "grid": list(self.grid), "workers": self.world, "batch": self.batch,
            "groups": list(self.grouping()),
            "group_shapes": [[list(g.in_shape), list(g.out_shape)] for g in self.groups],
            "p2p_bytes": self.p2p_bytes(), "allreduce_bytes": self.allreduce_bytes(),
            "bytes_exchanged": self.bytes_exchanged(),
            "per_rank": self.per_rank(),
        }


def _node_cost(node: Node, want: Rect, c_in: int, batch: int) -> tuple[float, int, int]:
    """(forward FLOPs, feature-map bytes, output channels) of a leaf over ``want``."""
    area = rect_area(want) * batch
    if node.kind == "conv":
        m = node.module
        kh, kw = m.kernel_size
        flops = 2.0 * area * m.out_channels * (m.in_channels // m.groups) * kh * kw
        return flops, area * m.out_channels * FLOAT_BYTES, m.out_channels
    return 4.0 * area * c_in, area * c_in * FLOAT_BYTES, c_in


def _leaf_costs(node: Node, wants: dict[int, Rect], c_in: int, batch: int):
    """Sum of leaf costs under ``node``; returns (flops, bytes, c_out)."""
    if node.kind == "seq":
        flops, nbytes, c = 0.0, 0, c_in
        for ch in node.children:
            f, b, c = _leaf_costs(ch, wants, c, batch)
            flops += f
            nbytes += b
        return flops, nbytes, c
    if node.kind == "residual":
        f1, b1, c = _leaf_costs(node.children[0], wants, c_in, batch)
        f2, b2, _ = _leaf_costs(node.children[1], wants, c_in, batch)
        return f1 + f2, b1 + b2, c
    return _node_cost(node, wants[node.id], c_in, batch)


def plan_cluster(units: list[Node], grouping: tuple[int, ...], grid: tuple[int, int],
                 input_shape: tuple[int, int, int], batch: int, param_count: int) -> ClusterPlan:
    """Plan ``units`` cut into groups of ``grouping`` units each, on a ``grid`` of devices
    (rows x cols; rank = row * cols + col)."""
    if sum(grouping) != len(units) or any(g < 1 for g in grouping):
        raise HiertrainError(
            f"grouping {'+'.join(map(str, grouping))} does not cover the edge segment's "
            f"{len(units)} units; give sizes >= 1 that sum to {len(units)}")
    gr, gc = grid
    if gr < 1 or gc < 1:
        raise HiertrainError(f"tile grid {gr}x{gc} must have at least one row and one column")
    groups: list[GroupPlan] = []
    shape = tuple(input_shape)
    start = 0
    for size in grouping:
        idx = tuple(range(start, start + size))
        start += size
        node = Node("seq", children=[units[i] for i in idx], name=f"group{len(groups)}")
        c_in, h, w = shape
        h_out, w_out = node.out_len(h, 0), node.out_len(w, 1)
        if h_out < gr or w_out < gc:
            raise HiertrainError(
                f"group {len(groups)} outputs {h_out}x{w_out} maps, too small for a {gr}x{gc} "
                "tile grid; use fewer devices or a larger input")
        out_shape = (node.out_channels(c_in), h_out, w_out)
        recs: list[dict[int, list[Interval]]] = [{}, {}]
        needs = [node.plan(partition(h_out, gr), h, 0, recs[0]),
                 node.plan(partition(w_out, gc), w, 1, recs[1])]
        lengths = _map_lengths(node, (h, w))
        owned = [{nid: _owned(ivs, lengths[nid][a]) for nid, ivs in recs[a].items()}
                 for a in (0, 1)]
        tiles = []
        for r, c in itertools.product(range(gr), range(gc)):
            wants = {nid: (recs[0][nid][r], recs[1][nid][c]) for nid in recs[0]}
            owns = {nid: (owned[0][nid][r], owned[1][nid][c]) for nid in recs[0]}
            flops, act, _ = _leaf_costs(node, wants, c_in, batch)
            in_rect = (needs[0][r], needs[1][c])
            tiles.append(TilePlan(rank=r * gc + c, in_rect=in_rect, out_rect=wants[node.id],
                                  wants=wants, owns=owns, flops=flops,
                                  act_bytes=act + rect_area(in_rect) * c_in * batch * FLOAT_BYTES,
                                  recv_bytes=0))
        bn = [n.module.num_features for n in node.walk() if n.kind == "bn"]
        groups.append(GroupPlan(node=node, units=idx, in_shape=shape, out_shape=out_shape,
                                tiles=tiles, bn_channels=bn))
        shape = out_shape
    for prev, g in zip(groups, groups[1:], strict=False):
        for t in g.tiles:
            area = sum(rect_area(rect_intersect(o.out_rect, t.in_rect))
                       for o in prev.tiles if o.rank != t.rank)
            t.recv_bytes = area * g.in_shape[0] * batch * FLOAT_BYTES
    return ClusterPlan(grid=(gr, gc), batch=batch, input_shape=tuple(input_shape),
                       groups=groups, param_count=param_count)


def _map_lengths(node: Node, hw: tuple[int, int]) -> dict[int, tuple[int, int]]:
    """node id -> (H, W) of that node's output map."""
    out: dict[int, tuple[int, int]] = {}

    def go(n: Node, size: tuple[int, int]) -> tuple[int, int]:
        if n.kind == "seq":
            s = size
            for c in n.children:
                s = go(c, s)
            res = s
        elif n.kind == "residual":
            res = go(n.children[0], size)
            go(n.children[1], size)
        else:
            res = (n.geo[0].out_len(size[0]), n.geo[1].out_len(size[1]))
        out[n.id] = res
        return res

    go(node, hw)
    return out


# ------------------------------------------------------------------ grid and cost model
def default_grid(workers: int) -> tuple[int, int]:
    """Most square rows x cols grid with rows >= cols (2 -> 2x1, 4 -> 2x2, 6 -> 3x2)."""
    if workers < 1:
        raise HiertrainError(f"world size must be >= 1, got {workers}")
    cols = max(c for c in range(1, int(workers**0.5) + 1) if workers % c == 0)
    return workers // cols, cols


def parse_grid(text: str) -> tuple[int, int]:
    try:
        r, c = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise HiertrainError(f"bad tile grid {text!r}: use ROWSxCOLS, e.g. 2x2") from None
    if r < 1 or c < 1:
        raise HiertrainError(f"bad tile grid {text!r}: rows and columns must be >= 1")
    return r, c


def parse_grouping(text: str, n_units: int) -> tuple[int, ...]:
    """``all`` (one group), ``each`` (one unit per group) or sizes like ``2+1+2``."""
    if text == "all":
        return (n_units,)
    if text == "each":
        return (1,) * n_units
    try:
        sizes = tuple(int(v) for v in text.split("+"))
    except ValueError:
        raise HiertrainError(
            f"bad grouping {text!r}: use 'all', 'each', 'auto' or unit counts like 2+2") from None
    if sum(sizes) != n_units or min(sizes) < 1:
        raise HiertrainError(
            f"grouping {text!r} must be unit counts >= 1 summing to {n_units} (the edge segment's "
            "units: each conv or residual block with its BN/ReLU/pool)")
    return sizes


@dataclass(frozen=True)
class CostModel:
    """Board compute and inter-board link for :func:`estimate_step_s`."""

    gflops: float  # sustained GFLOP/s per device
    mbps: float  # link bandwidth between boards, megabit/s
    latency_ms: float  # one message's latency

    def comm_s(self, nbytes: float, messages: int) -> float:
        return nbytes * 8 / (self.mbps * 1e6) + messages * self.latency_ms / 1e3


def estimate_step_s(plan: ClusterPlan, cost: CostModel) -> float:
    """Critical-path time of one training step: per group, the slowest tile's forward + backward
    (~3x forward FLOPs); per boundary, the largest halo a device receives, forward and back;
    per BatchNorm, three latency-bound syncs; the input scatter, cut gather/scatter and the
    weight-gradient all-reduce."""
    t = 0.0
    w = plan.world
    for g in plan.groups:
        t += 3 * max(tl.flops for tl in g.tiles) / (cost.gflops * 1e9)
        if w > 1:
            t += 3 * len(g.bn_channels) * cost.comm_s(0, 1)
    for g in plan.groups[1:]:
        t += 2 * cost.comm_s(max(tl.recv_bytes for tl in g.tiles), 1 if w > 1 else 0)
    p2p = plan.p2p_bytes()
    if w > 1:
        t += cost.comm_s(p2p["input"] + p2p["cut"] + p2p["cut_grad"], 3)
        t += cost.comm_s(plan.allreduce_bytes()["grads"] / w, 2)
    return t


def all_groupings(n_units: int) -> list[tuple[int, ...]]:
    """Every way to cut ``n_units`` in order into contiguous groups (2^(n-1) of them)."""
    out = []
    for mask in range(2 ** (n_units - 1)):
        sizes, run = [], 1
        for i in range(n_units - 1):
            if mask >> i & 1:
                sizes.append(run)
                run = 1
            else:
                run += 1
        sizes.append(run)
        out.append(tuple(sizes))
    return out


def choose_groups(units: list[Node], grid: tuple[int, int], input_shape: tuple[int, int, int],
                  batch: int, param_count: int, cost: CostModel
                  ) -> tuple[tuple[int, ...], list[tuple[tuple[int, ...], float]]]:
    """The grouping with the least estimated step time, and every candidate's estimate."""
    table = []
    for grouping in all_groupings(len(units)):
        try:
            plan = plan_cluster(units, grouping, grid, input_shape, batch, param_count)
        except HiertrainError:
            continue  # a group's output is smaller than the grid
        table.append((grouping, estimate_step_s(plan, cost)))
    if not table:
        raise HiertrainError(
            f"no grouping fits a {grid[0]}x{grid[1]} grid on input {input_shape}; use fewer "
            "devices or a larger input")
    table.sort(key=lambda e: e[1])
    return table[0][0], table
