"""Cutting any traceable ``nn.Module`` in two at a module path (``features.3``, ``layer2``).

hiertrain's own models are flat sequences of named stages, so a split is a slice
(``toolkit.core.models.split``). torchvision's ImageNet networks and a user's own
``nn.Module`` are not: their ``forward`` flattens, adds skip connections and
calls children in an order only the code knows. So we trace the forward with
``torch.fx`` and cut the graph after the last operation that runs inside the
named module. The cut is valid only if that operation's output is the *only*
value the rest of the network needs (a skip connection crossing the cut would
need a second tensor on the wire, and the wire carries one activation).

The two halves are ``fx.GraphModule`` objects that keep the original module paths,
so ``edge.state_dict() | cloud.state_dict()`` has the original model's keys and
loads back into it (``full_model.pt``; docs/export.md).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from itertools import accumulate

import torch
from torch import fx, nn

from toolkit.core.errors import HiertrainError

LISTED_DEPTH = 2
"""Valid split points up to this depth (``features.3``, ``layer2.1``) are listed in errors."""


@dataclass
class GraphCut:
    """What a traced model offers: the graph, and the node ending each valid split point."""

    graph: fx.GraphModule
    ends: dict[str, fx.Node]  # module path -> the node whose output is the cut

    def points(self, depth: int | None = None) -> list[str]:
        """Valid split points in forward order, optionally only those up to ``depth`` dots."""
        order = {n: i for i, n in enumerate(self.graph.graph.nodes)}
        names = sorted(self.ends, key=lambda p: (order[self.ends[p]], p.count("."), p))
        names = [p for p in names if depth is None or p.count(".") < depth]
        # one name per cut: a block and its last child end at the same node (keep the block)
        seen: set[fx.Node] = set()
        return [p for p in names if not (self.ends[p] in seen or seen.add(self.ends[p]))]


def _mode_dependent(module: nn.Module) -> bool:
    """Does the module's own forward branch on ``self.training`` (stochastic depth does)?"""
    try:
        return "self.training" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):  # no source (built-in, or defined in a REPL)
        return False


class _Tracer(fx.Tracer):
    """torch.fx's tracer, keeping as a call every module whose forward depends on train/eval
    mode: traced through, its branch would be frozen in the mode of the trace (torchvision's
    feature extraction keeps such modules as leaves for the same reason)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return super().is_leaf_module(m, module_qualified_name) or (
            type(m).__module__.split(".")[0] != "torch" and _mode_dependent(m))


def trace(model: nn.Module, what: str) -> fx.GraphModule:
    try:
        tracer = _Tracer()
        graph = tracer.trace(model)
        return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as exc:  # noqa: BLE001 - fx raises many kinds; the message is what matters
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HiertrainError(
            f"{what} cannot be traced with torch.fx, so it cannot be split at a module path "
            f"({first}); make its forward free of data-dependent control flow, or wrap the "
            "edge part in an nn.Sequential of named blocks"
        ) from None


def analyse(model: nn.Module, what: str = "the model") -> GraphCut:
    """Trace ``model`` and find every module path after which the graph has one live value."""
    gm = trace(model, what)
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    # A get_attr (a parameter or buffer used by a function) can be re-read on either side,
    # so it never has to cross the cut; everything else that is used later does.
    last_use = {
        n: max((index[u] for u in n.users), default=index[n])
        for n in nodes if n.op != "get_attr"
    }
    # live[i]: how many values made at or before node i are still needed after it
    births = [0] * (len(nodes) + 1)
    deaths = [0] * (len(nodes) + 1)
    for n, last in last_use.items():
        births[index[n]] += 1
        deaths[last] += 1
    live = list(accumulate(b - d for b, d in zip(births, deaths[:-1], strict=False)))
    ends: dict[str, fx.Node] = {}
    for n in nodes:
        for path in n.meta.get("nn_module_stack") or {}:
            ends[path] = n  # nodes come in order: the last one wins
    # a module called on both sides of a cut would be trained by both: its calls must not
    # straddle the cut (torchvision's BasicBlock calls its ReLU twice, inside the block)
    spans: dict[str, list[int]] = {}
    for n in nodes:
        if n.op == "call_module":
            spans.setdefault(n.target, []).append(index[n])
    straddle = [0] * (len(nodes) + 1)
    for calls in spans.values():
        straddle[min(calls)] += 1
        straddle[max(calls)] -= 1
    shared = list(accumulate(straddle[:-1]))
    valid = {}
    for path, end in ends.items():
        i = index[end]
        if end.op == "output" or i == len(nodes) - 2:
            continue  # the model's own output: nothing left for the cloud
        if live[i] != 1 or last_use.get(end, i) <= i:
            continue  # a skip connection crosses the cut, or the output is never used
        if shared[i]:
            continue  # a module called on both sides
        valid[path] = end
    return GraphCut(graph=gm, ends=valid)


def _keep(gm: fx.GraphModule, graph: fx.Graph) -> fx.GraphModule:
    out = fx.GraphModule(gm, graph)
    out.graph.eliminate_dead_code()
    out.graph.lint()
    out.delete_all_unused_submodules()
    out.recompile()
    return out


def _is_output(gm: fx.GraphModule, point: str) -> bool:
    nodes = list(gm.graph.nodes)
    return point in (nodes[-2].meta.get("nn_module_stack") or {})


def split_at(model: nn.Module, point: str, what: str) -> tuple[fx.GraphModule, fx.GraphModule]:
    """``(edge, cloud)``: ``cloud(edge(x)) == model(x)``, module paths and weights shared."""
    cut = analyse(model, what)
    if point not in cut.ends:
        listed = cut.points(LISTED_DEPTH)
        modules = dict(model.named_modules())
        if point not in modules or point == "":
            why = "no module has that path"
        elif _is_output(cut.graph, point):
            why = "it computes the model's output, so nothing would be left for the cloud"
        else:
            why = ("its output is not the only value the rest of the network uses (a skip "
                   "connection crosses it)")
        raise HiertrainError(
            f"cannot split {what} at {point!r}: {why}; valid split points: "
            f"{', '.join(listed)} (deeper module paths work too where the cut is one tensor)"
        )
    gm, end = cut.graph, cut.ends[point]
    edge, cloud = _pieces(gm, [end])
    return edge, cloud


def _pieces(gm: fx.GraphModule, ends: list[fx.Node]) -> list[fx.GraphModule]:
    """The graph cut after each of ``ends`` (in forward order): ``len(ends) + 1`` modules,
    each taking the previous one's output (the first: the model's input)."""
    nodes = list(gm.graph.nodes)
    index = {n: i for i, n in enumerate(nodes)}
    bounds = [index[e] for e in ends]
    getattrs = [n for n in nodes if n.op == "get_attr"]
    out, start, before = [], 0, None
    for stop in [*bounds, len(nodes) - 1]:
        graph, env = fx.Graph(), {}
        lookup = env.__getitem__
        if before is not None:
            env[before] = graph.placeholder("cut")
        for n in getattrs:  # parameters and buffers may be read anywhere
            if index[n] < start:
                env[n] = graph.node_copy(n, lookup)
        for n in nodes[start: stop + 1]:
            env[n] = graph.node_copy(n, lookup)
        if stop < len(nodes) - 1:
            graph.output(env[nodes[stop]])
        out.append(_keep(gm, graph))
        start, before = stop + 1, nodes[stop]
    return out


def chain(model: nn.Module, points: list[str], what: str) -> list[tuple[str, fx.GraphModule]]:
    """``model`` as consecutive blocks ending at each of ``points`` plus the rest ("head"):
    what the planner's profiler times block by block, as it does a built-in's stages."""
    cut = analyse(model, what)
    bad = [p for p in points if p not in cut.ends]
    if bad:
        split_at(model, bad[0], what)  # raises the error that explains it
    order = {n: i for i, n in enumerate(cut.graph.graph.nodes)}
    ends = [cut.ends[p] for p in points]
    if [order[e] for e in ends] != sorted({order[e] for e in ends}):
        raise HiertrainError(f"split points {', '.join(points)} of {what} are not in forward "
                             "order, or two of them cut at the same place")
    return list(zip([*points, "head"], _pieces(cut.graph, ends), strict=True))

def feature_map_points(model: nn.Module, input_shape: tuple[int, ...], what: str) -> list[str]:
    """Valid split points (up to :data:`LISTED_DEPTH`) whose output is a feature map,
    the only kind of cut an exit head and the codec take."""
    from torch.fx.passes.shape_prop import ShapeProp

    cut = analyse(model.eval(), what)
    try:
        ShapeProp(cut.graph).propagate(torch.zeros(1, *input_shape))
    except Exception:  # noqa: BLE001 - runs at another input size: no shapes to filter by
        return cut.points(LISTED_DEPTH)
    return [p for p in cut.points(LISTED_DEPTH)
            if len(getattr(cut.ends[p].meta.get("tensor_meta"), "shape", ())) == 4]
