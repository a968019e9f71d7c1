"""Building the edge step and cloud segment, from a config (export) or a manifest (run time).

Both runtimes rebuild the modules from the manifest and load the exported
initial weights, so the edge's ``torch`` backend, the ExecuTorch program and
the cloud trainer all start from the same numbers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.artifacts.safeload import load_weights
from toolkit.core.errors import HiertrainError, ManifestError
from toolkit.core.models import build_model
from toolkit.core.models.edge_program import EdgeInfer, EdgeTrainStep
from toolkit.core.models.exits import ExitHeadConfig, build_exit_head
from toolkit.core.models.inversion import AdversarialTrainStep, Decoder
from toolkit.core.models.rewrites import EDGE_NORMS, Rewrite, make_exact, to_group_norm
from toolkit.core.models.split import cut_shape, split_model
from toolkit.core.models.zoo import load_pretrained
from toolkit.core.privacy import NONE, Privacy, public_state

EDGE_INIT = "edge_init.pt"
CLOUD_INIT = "cloud_init.pt"


@dataclass
class BuiltSegments:
    step: EdgeTrainStep
    cloud: nn.Sequential
    rewrites: list[Rewrite]
    cut_shape: tuple[int, ...]
    # keys of a pretrained file left at their initial values (a classifier for other classes)
    pretrained_skipped: list[str] | None = None

    def infer_module(self) -> EdgeInfer:
        """Inference view sharing the step's modules (and so its trained weights)."""
        return EdgeInfer(self.step.edge, self.step.exit)


def build_segments(
    model: str,
    split: str,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    exit_cfg: ExitHeadConfig,
    seed: int = 0,
    edge_norm: str = "batch",
    privacy: Privacy = NONE,
    pretrained: str | os.PathLike[str] | None = None,
) -> BuiltSegments:
    """The modules of one split; ``privacy.adversarial`` adds the proxy decoder to the step.

    ``pretrained``: a local state dict of the whole model, loaded before the cut (export
    only: at run time the exported initial weights already hold it)."""
    if edge_norm not in EDGE_NORMS:
        raise HiertrainError(
            f"unknown edge norm {edge_norm!r}; choose one of: {', '.join(EDGE_NORMS)}"
        )
    torch.manual_seed(seed)
    full = build_model(model, num_classes=num_classes, input_shape=input_shape)
    skipped = load_pretrained(full, pretrained, model) if pretrained is not None else None
    seg = split_model(full, model, split)
    cs = cut_shape(seg.edge, input_shape)
    exit_cfg.check_fits((cs[1], cs[2]))
    exit_head = build_exit_head(cs[0], num_classes, exit_cfg)
    if privacy.adversarial:
        # built after the network so that the network's initial weights do not depend on it
        proxy = Decoder(cs, input_shape, width=privacy.width)
        step = AdversarialTrainStep(seg.edge, exit_head, proxy, privacy.scale)
    else:
        step = EdgeTrainStep(seg.edge, exit_head)
    rewrites = to_group_norm(step) if edge_norm == "group" else []
    rewrites += make_exact(step)
    return BuiltSegments(step=step, cloud=seg.cloud, rewrites=rewrites, cut_shape=cs,
                         pretrained_skipped=skipped)


def _load_state(manifest: Manifest, name: str) -> dict:
    state = load_weights(manifest.path(name), "artifact", error=ManifestError)
    if not isinstance(state, dict):
        raise ManifestError(f"{manifest.path(name)} is not a state dict")
    return state


def load_segments(manifest: Manifest, *, with_proxy: bool = False) -> BuiltSegments:
    """The exported modules with their initial weights.

    Only the edge's own trainer needs the proxy decoder of an adversarial
    defence (``with_proxy``); everyone else gets the plain step, whose state is
    what a board publishes (``toolkit.core.privacy.public_state``).
    """
    d = manifest.data
    privacy = Privacy.from_dict(d.get("privacy"))
    built = build_segments(
        d["model"]["name"], d["split"]["point"],
        num_classes=d["model"]["num_classes"],
        input_shape=tuple(d["model"]["input_shape"]),
        exit_cfg=ExitHeadConfig.from_dict(d["exit_head"]),
        seed=d["seed"],
        edge_norm=d["split"]["edge_norm"],
        privacy=privacy if with_proxy else NONE,
    )
    for module, name in ((built.step, EDGE_INIT), (built.cloud, CLOUD_INIT)):
        state = _load_state(manifest, name)
        if module is built.step and not with_proxy:
            state = public_state(state)
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise ManifestError(
                f"{manifest.path(name)} does not fit the model in the manifest: "
                f"{str(exc).splitlines()[0]}"
            ) from None
    return built


class FullModel(nn.Module):
    """Edge segment + cloud segment: the whole network, for evaluation and export."""

    def __init__(self, edge: nn.Module, cloud: nn.Module):
        super().__init__()
        self.edge = edge
        self.cloud = cloud

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cloud(self.edge(x))
