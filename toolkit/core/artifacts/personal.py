"""Personal (multi-exit) artifacts at run time: names, manifests, exit weights, exit policy.

``toolkit export --personalise`` writes the artifacts, ``edge-runtime personalise``
writes the personalised state (``exits.pt``, ``policy.json``) and ``toolkit bake``
may add segments with those exit weights baked in (``baked.json``). Everything the
board needs to *read* these lives here, in the run-time core, so that the edge
runtime never imports the build side (``toolkit.build.personal_export`` writes
them, with the same names from this module). Rebuilding the network from these files is
``toolkit.core.models.personal.load_personal_net`` (models read artifacts, not the reverse).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path

import jsonschema

from toolkit.core.artifacts.manifest import Manifest, read_json, sha256_file, verify_artifacts
from toolkit.core.errors import HiertrainError, ManifestError

PERSONAL_MANIFEST = "personal.json"
PERSONAL_SCHEMA = "hiertrain.personal"
PERSONAL_SCHEMA_VERSION = 1
TRAIN_PTE = "personal_train.pte"
FORWARD_PTE = "personal_forward.pte"
FULL_PTE = "personal_full.pte"
BACKBONE = "backbone.pt"
EXITS_INIT = "exits_init.pt"

# the personalised state: 'edge-runtime personalise --out DIR'
EXITS_FILE = "exits.pt"
POLICY_FILE = "policy.json"
REPORT_FILE = "report.json"

# exit weights baked into one policy's segments: 'toolkit bake'
BAKED_MANIFEST = "baked.json"
BAKED_SCHEMA = "hiertrain.personal_baked"
BAKED_SCHEMA_VERSION = 1

_SCHEMAS = Path(__file__).resolve().parent / "schemas"


def segment_file(k: int) -> str:
    """The shipped early-exit segment ``k`` (exit weights as inputs)."""
    return f"personal_seg{k}.pte"


def baked_segment_file(k: int) -> str:
    """Segment ``k`` of a baked policy (exit weights as constants)."""
    return f"baked_seg{k}.pte"


@cache
def _schema(name: str) -> dict:
    return json.loads((_SCHEMAS / name).read_text())


def _validate(data: object, schema_file: str, source: str) -> None:
    try:
        jsonschema.validate(data, _schema(schema_file))
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        raise ManifestError(f"{source} is invalid at {where}: {exc.message}") from None


def validate_personal(data: object, source: str) -> None:
    _validate(data, f"personal.v{PERSONAL_SCHEMA_VERSION}.json", source)


def validate_baked(data: object, source: str) -> None:
    _validate(data, f"personal_baked.v{BAKED_SCHEMA_VERSION}.json", source)


def is_personal(root: str | Path) -> bool:
    return (Path(root) / PERSONAL_MANIFEST).is_file()


def load_personal_manifest(root: str | Path, *, verify: bool = True) -> Manifest:
    root = Path(root)
    path = root / PERSONAL_MANIFEST
    if not path.is_file():
        raise ManifestError(f"{root} has no {PERSONAL_MANIFEST}: is it the --out directory of "
                            "'toolkit export --personalise'?")
    data = read_json(path)
    validate_personal(data, str(path))
    manifest = Manifest(data=data, root=root)
    if verify:
        verify_artifacts(manifest)
    return manifest


def exit_state_digest(state: dict) -> str:
    """sha256 of exit weights (names, dtypes, shapes, values): which weights a bake used.

    Computed from the tensors, not a file, so ``exits.pt`` and its directory, or the same
    weights saved twice, give the same digest.
    """
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@dataclass
class ExitPolicy:
    """Thresholds per exit (``None``: never exit there); ``terminal`` answers the rest."""

    exit_points: list[str]
    thresholds: list[float | None]
    terminal: str  # an exit point, or "final" (the backbone's own classifier)
    target_accuracy: float | None = None
    calibration: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ExitPolicy:
        try:
            return cls(exit_points=list(d["exit_points"]), thresholds=list(d["thresholds"]),
                       terminal=str(d["terminal"]), target_accuracy=d.get("target_accuracy"),
                       calibration=dict(d.get("calibration", {})))
        except (KeyError, TypeError) as exc:
            raise HiertrainError(f"exit policy is malformed ({exc}); re-run "
                                 "'edge-runtime personalise'") from None

    @classmethod
    def fixed(cls, exit_points: Sequence[str], threshold: float) -> ExitPolicy:
        """One threshold for every exit, the deepest exit terminal (no calibration)."""
        return cls(list(exit_points), [threshold] * len(exit_points), exit_points[-1])

    def chain(self) -> list[int]:
        """Indices into ``[*exit_points, "final"]`` a sample may visit, terminal last."""
        names = [*self.exit_points, "final"]
        if self.terminal not in names:
            raise HiertrainError(f"terminal exit {self.terminal!r} is not one of {names}")
        return list(range(names.index(self.terminal) + 1))

    def keep(self) -> list[int]:
        """The chain positions a sample can leave at: a threshold, or the terminal."""
        chain = self.chain()
        return [k for k in chain if k == chain[-1] or self.thresholds[k] is not None]

    def decide(self, k: int, confidence: float) -> bool:
        """Whether a sample leaves at chain position ``k`` with this confidence."""
        if k == self.chain()[-1]:
            return True
        t = self.thresholds[k]
        return t is not None and confidence >= t


def load_state_dir(path: str | Path) -> tuple[dict, ExitPolicy | None]:
    """``exits.pt`` (and ``policy.json`` if present) from a personalise ``--out`` directory
    or an ``exits.pt`` file."""
    from toolkit.core.artifacts.safeload import load_weights

    p = Path(path)
    f = p / EXITS_FILE if p.is_dir() else p
    if not f.is_file():
        raise HiertrainError(f"{p} holds no {EXITS_FILE}; pass the --out directory of "
                             "'edge-runtime personalise'")
    state = load_weights(f, "exit weights")
    pol = f.parent / POLICY_FILE
    policy = None
    if pol.is_file():
        try:
            policy = ExitPolicy.from_dict(json.loads(pol.read_text()))
        except json.JSONDecodeError as exc:
            raise HiertrainError(f"cannot read {pol}: {exc}") from None
    return state, policy


def resolve_policy(exit_points: Sequence[str], policy: ExitPolicy | None,
                   threshold: float | None) -> ExitPolicy:
    """The policy of a run: ``--threshold`` (one for every exit) over the calibrated one."""
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise HiertrainError(f"threshold must be in [0, 1], got {threshold}")
        return ExitPolicy.fixed(list(exit_points), threshold)
    if policy is None:
        raise HiertrainError("no exit policy: pass --weights with the --out directory of "
                             "'edge-runtime personalise' (it holds policy.json) or --threshold")
    return policy


@dataclass(frozen=True)
class ExitChoice:
    """What a multi-exit run executes: the artifacts, the exit weights and the policy.

    The board's ``infer`` and the build side's ``toolkit bake`` resolve them alike, so a
    bake is made for exactly what ``infer`` will look it up by.
    """

    manifest: Manifest
    exit_points: list[str]
    state: dict | None  # None: the exits as exported
    policy: ExitPolicy
    source: str  # where the weights came from, for reports


def choose_exits(artifacts: str | Path, weights: str | Path | None,
                 threshold: float | None) -> ExitChoice:
    """Load the personal artifacts, the weights (``--weights``) and the run's policy."""
    manifest = load_personal_manifest(artifacts)
    points = list(manifest.data["spec"]["exit_points"])
    state, policy, source = None, None, "initial exits"
    if weights is not None:
        state, policy = load_state_dir(weights)
        source = str(weights)
    return ExitChoice(manifest, points, state, resolve_policy(points, policy, threshold), source)


@dataclass(frozen=True)
class BakedSegments:
    """Segments of one policy with one set of exit weights baked in, verified."""

    keep: list[int]
    files: list[Path]
    backends: list[str]


def bake_hint(root: str | Path) -> str:
    return (f"run 'toolkit bake --artifacts {root} --weights STATE_DIR' with the same "
            "--weights and --threshold first")


def find_baked(manifest: Manifest, exits_digest: str, keep: Sequence[int]
               ) -> tuple[BakedSegments | None, str]:
    """The baked segments for these exit weights and exit positions, or ``(None, why not)``.

    A bake belongs to one ``personal.json`` (its sha256 is recorded), one set of exit
    weights and one set of kept exits; a stale bake is not used. Files that do not match
    their recorded sha256 are a ManifestError (copied half, or tampered with).
    """
    path = manifest.path(BAKED_MANIFEST)
    if not path.is_file():
        return None, f"{manifest.root} has no {BAKED_MANIFEST}"
    data = read_json(path)
    validate_baked(data, str(path))
    if data["personal_sha256"] != sha256_file(manifest.path(PERSONAL_MANIFEST)):
        return None, f"{path} was baked for other artifacts"
    if data["exits_digest"] != exits_digest:
        return None, f"{path} was baked with other exit weights"
    if list(data["keep"]) != list(keep):
        return None, (f"{path} was baked for exits {data['keep']}, this policy answers at "
                      f"{list(keep)}")
    files = []
    for seg in data["segments"]:
        p = manifest.path(seg["file"])
        if not p.is_file():
            raise ManifestError(f"baked segment {p} named in {path} is missing")
        if sha256_file(p) != seg["sha256"]:
            raise ManifestError(f"baked segment {p} does not match {path}: bake again or "
                                "copy the whole directory again")
        files.append(p)
    return BakedSegments(keep=list(keep), files=files,
                         backends=[s["backend"] for s in data["segments"]]), ""
