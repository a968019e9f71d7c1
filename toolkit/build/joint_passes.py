"""Graph passes on the joint forward/backward graph that remove memory traffic.

``drop_aliases``: autograd hands every tensor saved for the backward through an
``alias`` node; in a functional graph that is the identity, but ExecuTorch lowers
it to ``alias_copy``, a real copy (6-7 % of a VGG-16 step: the saved im2col
matrices are 9x the activations). The pass bypasses them, except where a graph
output would then alias another value.

Autograd writes the backward of a reduction as ``expand`` (materialise the
gradient at full size) followed by elementwise ops. ExecuTorch's ``expand_copy``
really copies, and the portable elementwise kernels are slow, so on the small
CNN these expands alone took ~10-15 % of a step. ExecuTorch's ``add``, ``sub``,
``mul``, ``div`` and ``where`` broadcast, so the expand is needed only where a
full-size tensor must exist (a view, an output). ``sink_expands`` moves
scalar elementwise ops (``div.Scalar``, ``mul.Scalar``, ``neg``) before the
expand, where they touch one value per channel instead of every element, and
drops the expand where the consuming binary op's broadcast gives the same shape.
The values are unchanged, bit for bit: the same float operations on the same
numbers.
"""

from __future__ import annotations

import torch
from torch import fx

aten = torch.ops.aten

_SCALAR_UNARY = {aten.div.Scalar, aten.mul.Scalar, aten.neg.default}
_BROADCASTING = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor,
                 aten.where.self}


def _shape(v) -> tuple[int, ...] | None:
    """A node's tensor shape (None if unknown); a Python scalar broadcasts like ``()``."""
    if not isinstance(v, fx.Node):
        return ()
    val = v.meta.get("val")
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _sink_one(graph: fx.Graph, expand: fx.Node) -> bool:
    src = expand.args[0]
    full = _shape(expand)
    if full is None or _shape(src) is None:
        return False
    changed = False
    for user in list(expand.users):
        if (user.target in _SCALAR_UNARY and user.args[0] is expand
                and all(not isinstance(a, fx.Node) for a in user.args[1:])
                # only towards ops that broadcast: a view of an expand is no view
                and all(u.target in _BROADCASTING for u in user.users)):
            with graph.inserting_before(user):
                small = graph.call_function(user.target, (src, *user.args[1:]), user.kwargs)
                small.meta["val"] = user.target(src.meta["val"], *user.args[1:])
                grown = graph.call_function(aten.expand.default, (small, list(full)))
                grown.meta["val"] = small.meta["val"].expand(full)
            user.replace_all_uses_with(grown)
            graph.erase_node(user)
            changed = True
        elif user.target in _BROADCASTING:
            others = [_shape(a) for a in user.args if a is not expand]
            if any(s is None for s in others):
                continue
            try:
                out = torch.broadcast_shapes(_shape(src), *others)
            except RuntimeError:
                continue
            if tuple(out) == _shape(user):
                user.replace_input_with(expand, src)
                changed = True
    if not expand.users:
        graph.erase_node(expand)
    return changed


def sink_expands(gm: fx.GraphModule) -> int:
    """Apply in place until nothing changes; returns the number of rounds that changed."""
    rounds = 0
    for _ in range(20):  # each round moves expands one op further; chains are short
        changed = False
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target == aten.expand.default:
                changed |= _sink_one(gm.graph, node)
        if not changed:
            break
        rounds += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return rounds


def drop_aliases(gm: fx.GraphModule) -> int:
    """Bypass ``aten.alias`` nodes that do not feed the graph output; returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if (node.op == "call_function" and node.target == aten.alias.default
                and all(u.op != "output" for u in node.users)):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            count += 1
    gm.recompile()
    return count
