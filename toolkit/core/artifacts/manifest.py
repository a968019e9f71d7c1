"""The artifacts manifest: one versioned JSON document, validated against its schema.

The JSON Schema in ``toolkit/core/artifacts/schemas/manifest.v1.json`` is the single source of
truth; this module validates against it, verifies artifact hashes, and gives
typed access to the few fields the runtimes read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from toolkit.core.errors import ManifestError
from toolkit.core.privacy import Privacy

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
_SCHEMA_PATH = Path(__file__).parent / "schemas" / f"manifest.v{SCHEMA_VERSION}.json"


@cache
def schema() -> dict:
    return json.loads(_SCHEMA_PATH.read_text())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def validate(data: object, source: str = "manifest") -> None:
    if isinstance(data, dict) and data.get("schema_version") not in (None, SCHEMA_VERSION):
        raise ManifestError(
            f"{source} has schema_version {data.get('schema_version')!r}; this hiertrain reads "
            f"version {SCHEMA_VERSION}: re-export the artifacts with this toolkit"
        )
    try:
        jsonschema.validate(data, schema())
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(top level)"
        message = " ".join(exc.message.split())  # one line, whatever value it quotes
        if len(message) > 200:
            message = message[:197] + "..."
        raise ManifestError(f"{source} is invalid at {where}: {message}") from None


@dataclass(frozen=True)
class Manifest:
    data: dict
    root: Path

    def path(self, artifact: str) -> Path:
        return self.root / artifact

    @property
    def model_name(self) -> str:
        return self.data["model"]["name"]

    @property
    def num_classes(self) -> int:
        return self.data["model"]["num_classes"]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.data["model"]["input_shape"])

    @property
    def split(self) -> str:
        return self.data["split"]["point"]

    @property
    def batch_size(self) -> int:
        return self.data["batch_size"]

    @property
    def cut_shape(self) -> tuple[int, ...]:
        return tuple(self.data["cut"]["shape"])

    @property
    def privacy(self) -> Privacy:
        """The defence the board applies to the cut (``toolkit.core.privacy``); manifests
        without one mean ``none``."""
        return Privacy.from_dict(self.data.get("privacy"))

    @property
    def codec_name(self) -> str:
        """The activation codec (``toolkit.core.protocol.codec``); manifests without one mean
        ``int8``."""
        return self.data.get("codec", {}).get("name", "int8")


def read_json(path: Path) -> Any:
    """An artifacts record (manifest, personal.json, baked.json): any unreadable file is one
    ``ManifestError`` line, never a traceback."""
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from None
    except RecursionError:  # JSON nested thousands deep: no record looks like that
        raise ManifestError(f"cannot read {path}: JSON nested too deeply") from None


def load_manifest(root: str | Path, *, verify: bool = True) -> Manifest:
    """Read, validate and (by default) hash-check an artifacts directory."""
    root = Path(root)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"{root} has no {MANIFEST_NAME}: is it the --out directory of 'toolkit export'?"
        )
    data = read_json(path)
    validate(data, str(path))
    manifest = Manifest(data=data, root=root)
    if verify:
        verify_artifacts(manifest)
    return manifest


def verify_artifacts(manifest: Manifest) -> None:
    for name, entry in manifest.data["artifacts"].items():
        p = manifest.path(name)
        if not p.is_file():
            raise ManifestError(f"artifact {p} named in the manifest is missing")
        digest = sha256_file(p)
        if digest != entry["sha256"]:
            raise ManifestError(
                f"artifact {p} does not match the manifest (sha256 {digest[:12]}... != "
                f"{entry['sha256'][:12]}...): re-export or copy the whole directory again"
            )
