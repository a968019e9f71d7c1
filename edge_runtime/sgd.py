"""SGD on the ExecuTorch program's own parameter tensors, written out by hand.

Why not a library: ExecuTorch's SGD binding (``get_sgd_optimizer``) exposes only
``step``: its learning rate cannot follow a schedule and its momentum cannot be read
for a checkpoint. ``torch.optim.SGD`` can do both, but building one imports
``torch._dynamo`` (its ``add_param_group`` is wrapped in ``torch._disable_dynamo``), which
needs sympy and costs seconds of start-up on a board, for a few lines of element-wise
arithmetic. This is torch's SGD update (``torch.optim.SGD``, dampening 0, maximize off),
term for term, so the two backends and the cloud agree (tests/test_lr_schedule.py).
"""

from __future__ import annotations

from typing import Any

import torch


class HostSGD:
    """``torch.optim.SGD``'s update for named tensors updated in place.

    ``param_groups`` mirrors torch's (one group; ``lr`` may be changed between steps),
    so code that sets a learning rate treats both optimizers alike.
    """

    def __init__(self, params: dict[str, torch.Tensor], *, lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False) -> None:
        self.params = params
        self.param_groups: list[dict[str, Any]] = [
            {"lr": lr, "momentum": momentum, "weight_decay": weight_decay, "nesterov": nesterov}]
        self.momentum_buffer: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor]) -> None:
        group = self.param_groups[0]
        lr, momentum, decay = group["lr"], group["momentum"], group["weight_decay"]
        for name, param in self.params.items():
            d_p = grads[name]
            if decay:
                d_p = d_p.add(param, alpha=decay)
            if momentum:
                buf = self.momentum_buffer.get(name)
                if buf is None:
                    buf = self.momentum_buffer[name] = d_p.detach().clone()
                else:
                    buf.mul_(momentum).add_(d_p)
                d_p = d_p.add(buf, alpha=momentum) if group["nesterov"] else buf
            param.add_(d_p, alpha=-lr)

    def state_dict(self) -> dict[str, Any]:
        return {"momentum_buffer": {k: v.clone() for k, v in self.momentum_buffer.items()},
                "param_groups": [dict(g) for g in self.param_groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buffers = state.get("momentum_buffer")
        if not isinstance(buffers, dict) or any(
                k not in self.params or tuple(v.shape) != tuple(self.params[k].shape)
                for k, v in buffers.items()):
            raise ValueError("not a momentum state of this program's parameters")
        self.momentum_buffer = {k: v.detach().clone().to(self.params[k].dtype)
                                for k, v in buffers.items()}
        self.param_groups[0].update(state.get("param_groups", [{}])[0])


__all__ = ["HostSGD"]
