"""On-device early-exit personalisation (PersEPhonEE, Leontiadis et al., arXiv 2102.01393).

A backbone pretrained on general data is frozen; small exit heads attached after
some of its stages are the only trainable weights. This module builds the
modules that ``toolkit export --personalise`` lowers and that the edge
runtime's ``torch`` backend runs eagerly, so both backends compute one function.

Frozen means *buffers*, not parameters: every backbone weight is re-registered
as a buffer, so ``torch.export`` (and ExecuTorch's training module) compute
gradients for the exit heads only and the backbone's backward pass is never
built, which is where the training-cost saving against whole-network
fine-tuning comes from. The backbone's BatchNorm layers stay in eval mode
(running statistics, no buffer mutation), which ExecuTorch lowers exactly.

Exit heads are ``conv3x3 (+bias) -> ReLU -> global mean -> linear`` without
BatchNorm: on a stream of small personal batches a batch-statistics layer would
couple samples and need host-side statistics; without it the head is a plain
function of one sample, the same in training and at inference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from toolkit.core.artifacts.manifest import Manifest
from toolkit.core.artifacts.personal import BACKBONE, EXITS_INIT
from toolkit.core.artifacts.safeload import load_weights
from toolkit.core.errors import HiertrainError, ManifestError
from toolkit.core.models import build_model, get_spec
from toolkit.core.models.exits import GlobalAvgPool

HEAD_STAGE = "head"


class PersonalExit(nn.Module):
    """The trainable early-exit head (``channels=0``: global mean + linear only)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 32):
        super().__init__()
        if channels < 0:
            raise HiertrainError(f"exit channels must be >= 0, got {channels}")
        layers: list[nn.Module] = []
        width = in_channels
        if channels:
            layers += [nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU()]
            width = channels
        layers += [GlobalAvgPool(), nn.Linear(width, num_classes)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def freeze_as_buffers(module: nn.Module) -> None:
    """Turn every parameter of ``module`` into a buffer of the same name (see module doc)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, p.detach().clone())


class MultiExitNet(nn.Module):
    """A frozen backbone of named stages with trainable exits after some of them.

    ``forward(x) -> [exit_1, ..., exit_K, final]`` logits, exits in backbone
    order; ``final`` is the backbone's own classifier (the ``head`` stage).
    """

    def __init__(self, backbone: nn.Sequential, exits: dict[str, nn.Module]):
        super().__init__()
        names = [n for n, _ in backbone.named_children()]
        if not names or names[-1] != HEAD_STAGE:
            raise HiertrainError(f"the backbone's last stage must be {HEAD_STAGE!r}, got {names}")
        bad = [e for e in exits if e not in names[:-1]]
        if bad or not exits:
            raise HiertrainError(
                f"exit points {bad or '(none)'} are not backbone stages; choose from "
                f"{', '.join(names[:-1])}"
            )
        freeze_as_buffers(backbone)
        self.backbone = backbone.eval()
        self.exit_points = [n for n in names[:-1] if n in exits]
        self.exits = nn.ModuleDict({n: exits[n] for n in self.exit_points})

    def train(self, mode: bool = True) -> MultiExitNet:
        super().train(mode)
        self.backbone.eval()  # frozen: BatchNorm always uses its running statistics
        return self

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for name, stage in self.backbone.named_children():
            x = stage(x)
            if name in self.exits:
                outs.append(self.exits[name](x))
        outs.append(x)  # the head stage's logits
        return outs

    def segments(self) -> list[ExitSegment]:
        """One module per exit: the stages since the previous exit, then the exit head;
        the last segment is the remaining stages up to the backbone's classifier."""
        segs: list[ExitSegment] = []
        stages = nn.Sequential()
        for name, stage in self.backbone.named_children():
            stages.add_module(name, stage)
            if name in self.exits:
                segs.append(ExitSegment(stages, self.exits[name]))
                stages = nn.Sequential()
        segs.append(ExitSegment(stages, None))
        return segs

    def policy_segments(self, keep: Sequence[int]) -> list[ExitSegment]:
        """Segments for an exit policy: only the exits at positions ``keep`` (ascending,
        the terminal last) are evaluated; the stages of every skipped exit are merged into
        the next kept segment and nothing after the terminal is built. The terminal
        segment returns its logits only (no activation leaves it)."""
        keep = list(keep)
        n = len(self.exit_points)
        if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] > n:
            raise HiertrainError(f"exit positions {keep} are not ascending within 0..{n}")
        plain = self.segments()
        out: list[ExitSegment] = []
        stages = nn.Sequential()
        for k, seg in enumerate(plain[: keep[-1] + 1]):
            for name, stage in seg.stages.named_children():
                stages.add_module(name, stage)
            if k in keep:
                out.append(ExitSegment(stages, seg.exit, emit_activation=k != keep[-1]))
                stages = nn.Sequential()
        return out


class ExitSegment(nn.Module):
    """``forward(a) -> (a_next, logits)``: the unit of early-exit inference (batch 1).

    The last segment has no exit: its ``a_next`` *is* the final logits, and it
    returns them twice so every segment has the same output arity.
    ``emit_activation=False`` (a policy's terminal segment) returns ``(logits,)``:
    no sample goes further, so the activation need not be copied out.
    """

    def __init__(self, stages: nn.Sequential, exit_head: nn.Module | None,
                 emit_activation: bool = True):
        super().__init__()
        self.stages = stages
        self.exit = exit_head
        self.emit_activation = emit_activation

    def forward(self, a: torch.Tensor):
        a = self.stages(a)
        logits = self.exit(a) if self.exit is not None else a
        return (a, logits) if self.emit_activation else (logits,)


class PersonalTrainStep(nn.Module):
    """``forward(x, y, w) -> (loss, *exit_logits, final_logits)``.

    ``w`` holds one weight per sample: 1 for a real label or a confident
    pseudo-label, 0 to ignore the sample (any non-negative value works). The loss
    is the sum over exits of the ``w``-weighted mean cross-entropy (divided by
    ``max(sum(w), 1)``), so a batch with no usable sample gives zero gradients.
    Logits come out detached: the host reads them for confidences and accuracy.
    """

    def __init__(self, net: MultiExitNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
        outs = self.net(x)
        denom = torch.clamp_min(w.sum(), 1.0)
        loss = torch.zeros((), dtype=x.dtype)
        for logits in outs[:-1]:
            ce = F.cross_entropy(logits, y, reduction="none")
            loss = loss + (ce * w).sum() / denom
        return (loss, *[o.detach() for o in outs])


class PersonalForward(nn.Module):
    """``forward(x) -> (*exit_logits, final_logits)`` for a whole batch (eval mode)."""

    def __init__(self, net: MultiExitNet):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        return tuple(self.net(x))


@dataclass(frozen=True)
class PersonalSpec:
    """What defines a multi-exit program (recorded in the personal manifest)."""

    model: str
    num_classes: int
    input_shape: tuple[int, int, int]
    exit_points: tuple[str, ...]
    exit_channels: int = 32
    seed: int = 0

    def to_dict(self) -> dict:
        return {"model": self.model, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape), "exit_points": list(self.exit_points),
                "exit_channels": self.exit_channels, "seed": self.seed}


def default_exit_points(model: str) -> tuple[str, ...]:
    """Every stage of the model except its classifier."""
    names = [n for n, _ in build_model(model, input_shape=get_spec(model).input_shape)
             .named_children()]
    return tuple(n for n in names if n != HEAD_STAGE)


_TORCHVISION_RESNET = {"conv1.": "stem.0.", "bn1.": "stem.1.", "fc.": "head.2."}


def normalise_state(state: dict, model: nn.Sequential) -> dict[str, torch.Tensor]:
    """Accept the backbone's own keys, a hiertrain ``full_model.pt`` (``edge.``/``cloud.``
    prefixes), a ``{"state_dict"|"model": ...}`` wrapper, or torchvision ResNet keys."""
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    want = set(model.state_dict())
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for prefix in ("module.", "edge.", "cloud."):
            if k.startswith(prefix) and k not in want:
                k = k[len(prefix):]
        if k not in want:
            for tv, ours in _TORCHVISION_RESNET.items():
                if k.startswith(tv):
                    k = ours + k[len(tv):]
        out[k] = v
    return out


def load_backbone(model: str, checkpoint: str | Path | None, *, num_classes: int,
                  input_shape: tuple[int, int, int], seed: int = 0) -> nn.Sequential:
    """The pretrained backbone (``checkpoint=None``: seeded random weights, for tests only)."""
    torch.manual_seed(seed)
    net = build_model(model, num_classes=num_classes, input_shape=input_shape)
    if checkpoint is None:
        return net.eval()
    path = Path(checkpoint)
    if not path.is_file():
        raise HiertrainError(f"backbone checkpoint {path} does not exist; pass a state dict file")
    state = load_weights(path, "backbone checkpoint")
    if not isinstance(state, dict):
        raise HiertrainError(f"backbone checkpoint {path} is not a state dict")
    try:
        net.load_state_dict(normalise_state(state, net))
    except RuntimeError as exc:
        raise HiertrainError(
            f"backbone checkpoint {path} does not fit {model} with {num_classes} classes and "
            f"input {list(input_shape)}: {str(exc).splitlines()[0]}"
        ) from None
    return net.eval()


@torch.no_grad()
def _stage_channels(backbone: nn.Sequential, input_shape: Sequence[int]) -> dict[str, int]:
    x = torch.zeros(1, *input_shape)
    out = {}
    for name, stage in backbone.named_children():
        x = stage(x)
        out[name] = int(x.shape[1])
    return out


def build_multi_exit(spec: PersonalSpec, backbone: nn.Sequential) -> MultiExitNet:
    """Attach fresh exits (seeded by ``spec.seed``) to a loaded backbone and freeze it."""
    backbone = backbone.eval()
    chans = _stage_channels(backbone, spec.input_shape)
    torch.manual_seed(spec.seed + 1)
    exits = {p: PersonalExit(chans[p], spec.num_classes, spec.exit_channels)
             for p in spec.exit_points}
    return MultiExitNet(backbone, exits)


def exit_state(net: MultiExitNet) -> dict[str, torch.Tensor]:
    """The trainable weights only, keyed like ``PersonalTrainStep.named_parameters()``."""
    return {f"net.{k}": v.detach().clone() for k, v in net.named_parameters()}


def load_personal_net(manifest: Manifest) -> MultiExitNet:
    """Rebuild the multi-exit network from the manifest, backbone and initial exit weights
    (the files of ``toolkit.core.artifacts.personal.load_personal_manifest``)."""
    s = manifest.data["spec"]
    spec = PersonalSpec(model=s["model"], num_classes=s["num_classes"],
                        input_shape=tuple(s["input_shape"]), exit_points=tuple(s["exit_points"]),
                        exit_channels=s["exit_channels"], seed=s["seed"])
    backbone = load_backbone(spec.model, manifest.path(BACKBONE), num_classes=spec.num_classes,
                             input_shape=spec.input_shape)
    net = build_multi_exit(spec, backbone)
    load_exit_state(net, load_weights(manifest.path(EXITS_INIT), "artifact",
                                      error=ManifestError),
                    str(manifest.path(EXITS_INIT)))
    return net


def load_exit_state(net: MultiExitNet, state: dict, what: str) -> None:
    """Copy exit weights (keys ``net.exits....``) into ``net``."""
    params = dict(net.named_parameters())
    want = {f"net.{k}" for k in params}
    if not isinstance(state, dict) or set(state) != want:
        raise HiertrainError(f"{what} does not hold this network's exit weights "
                             f"(expected {len(want)} tensors named net.exits...)")
    with torch.no_grad():
        for k, p in params.items():
            if tuple(state[f"net.{k}"].shape) != tuple(p.shape):
                raise HiertrainError(f"{what}: {k} has shape {list(state[f'net.{k}'].shape)}, "
                                     f"expected {list(p.shape)}")
            p.copy_(state[f"net.{k}"])
