"""What the cut at each split point reveals, as ``benchmarks/privacy.py`` measured it.

The planner cannot train an attacker for every plan, so it reports the measured
reconstruction quality for the shipped models on CIFAR-10-sized inputs (3x32x32):
the int8 cut at the exported initial weights, attacked by ``toolkit.privacy.attack``.
``leakage.json`` is written by that benchmark (never by hand); other models, input
shapes or trained weights: ``toolkit attack`` measures them.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

LEAKAGE_FILE = Path(__file__).with_name("leakage.json")
MEASURED_SHAPE = (3, 32, 32)


@cache
def _table() -> dict:
    try:
        return json.loads(LEAKAGE_FILE.read_text())
    except (OSError, ValueError):
        return {}


def measured_leak(model: str, split: str, input_shape) -> dict | None:
    """``{"psnr", "ssim", "baseline_psnr", "baseline_ssim"}`` for an int8 cut, or None."""
    if tuple(input_shape) != MEASURED_SHAPE:
        return None
    return _table().get("cuts", {}).get(f"{model}/{split}")
