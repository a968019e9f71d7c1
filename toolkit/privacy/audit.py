"""``toolkit attack``: what your own artifacts' cut reveals, measured with your own images.

Runs ``toolkit.privacy.attack`` against exported artifacts as they would run on a
board: the edge with its exported (or, with ``weights``, trained) weights, the
manifest's defence and codec. Public images come from the data set's train
split, the images to rebuild from its test split (standing in for the board's
own, which the attacker never sees).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from toolkit.core.artifacts.manifest import load_manifest
from toolkit.core.artifacts.safeload import load_weights
from toolkit.core.data.datasets import load_dataset, normalize
from toolkit.core.errors import HiertrainError
from toolkit.core.models.segments import load_segments
from toolkit.core.privacy import public_state
from toolkit.core.protocol.codec import parse_codec
from toolkit.core.protocol.quant import QuantScheme
from toolkit.privacy.attack import AttackConfig, observed_cuts, run_attack, save_grid


@dataclass(frozen=True)
class AuditConfig:
    artifacts: Path
    data: str | None = None  # a load_dataset source; None: digits
    weights: Path | None = None  # edge weights (edge_weights-<device>.pt); None: the export's
    public: int = 2000
    heldout: int = 256
    attack: AttackConfig = AttackConfig()
    grid: Path | None = None


def audit(cfg: AuditConfig, progress: Callable[[str], None] = lambda _m: None) -> dict:
    manifest = load_manifest(cfg.artifacts)
    step = load_segments(manifest).step
    source = "exported initial weights"
    if cfg.weights is not None:
        state = load_weights(Path(cfg.weights), "edge weights")
        try:
            step.load_state_dict(public_state(state))
        except RuntimeError as exc:
            raise HiertrainError(f"{cfg.weights} does not fit the edge in {cfg.artifacts}: "
                                 f"{str(exc).splitlines()[0]}") from None
        source = str(cfg.weights)
    shape = manifest.input_shape
    norm = manifest.data["model"]["normalization"]
    mean, std = norm["mean"], norm["std"]
    public = load_dataset(cfg.data, "train", input_shape=shape, limit=cfg.public, seed=1)
    heldout = load_dataset(cfg.data, "test", input_shape=shape, limit=cfg.heldout, seed=2)
    px, hx = normalize(public.x, mean, std), normalize(heldout.x, mean, std)
    codec = parse_codec(manifest.codec_name)
    scheme = QuantScheme.from_dict(manifest.data["quantization"])
    privacy = manifest.privacy
    batch = manifest.batch_size
    progress(f"computing cuts of {len(px)} public and {len(hx)} held-out images")
    pc = observed_cuts(step.edge, px, codec=codec, scheme=scheme, privacy=privacy, batch=batch)
    hc = observed_cuts(step.edge, hx, codec=codec, scheme=scheme, privacy=privacy, batch=batch)
    result, rebuilt = run_attack(pc, px, hc, hx, mean=mean, std=std, cfg=cfg.attack,
                                 progress=progress)
    if cfg.grid is not None:
        save_grid([("original", heldout.x), ("rebuilt", rebuilt)], cfg.grid)
    return {"artifacts": str(cfg.artifacts), "model": manifest.model_name,
            "split": manifest.split, "codec": codec.name, "privacy": privacy.spec(),
            "weights": source, "data": public.name, **result.to_dict()}


def describe(r: dict) -> str:
    """The verdict ``toolkit attack`` prints."""
    gain = r["psnr"] - r["baseline_psnr"]
    return (
        f"{r['model']} split at {r['split']}, codec {r['codec']}, privacy {r['privacy']} "
        f"({r['weights']}): an attacker trained on {r['public']} public images rebuilds "
        f"{r['heldout']} held-out images at PSNR {r['psnr']:.1f} dB, SSIM {r['ssim']:.3f}; "
        f"knowing nothing (the mean image) gives {r['baseline_psnr']:.1f} dB, "
        f"{r['baseline_ssim']:.3f}, so the cut adds {gain:+.1f} dB"
    )
