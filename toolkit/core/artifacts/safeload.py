"""Loading ``.pt`` files without trusting them: ``weights_only`` and one-line errors.

Every state dict and checkpoint hiertrain reads -- artifacts, edge weights,
cloud checkpoints, personalised exits, and edge weights arriving over MQTT --
goes through ``torch.load(..., weights_only=True)``: the unpickler then builds
only tensors, plain containers and numbers, so a crafted file cannot run code
(a ``__reduce__`` payload is refused before anything is called). This module
is the one place that does it for files, and that turns torch's multi-line
refusal (which also suggests ``weights_only=False``, the unsafe way out) into
one sentence naming the file.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Any

from toolkit.core.errors import HiertrainError

_UNPICKLER_DETAIL = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\. Please use|\n\n|$)", re.S)


def describe_load_error(exc: BaseException) -> str:
    """One line for a failed ``torch.load``: what was refused, without torch's advice."""
    text = str(exc)
    if isinstance(exc, pickle.UnpicklingError) and "Weights only load failed" in text:
        m = _UNPICKLER_DETAIL.search(text)
        detail = " ".join(m.group(1).split()) if m else "not a plain state dict"
        return f"it holds more than tensors and plain containers, refused ({detail})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {lines[0] if lines else 'no detail'}"


def load_weights(source: str | Path | bytes, what: str, *,
                 error: type[HiertrainError] = HiertrainError) -> Any:
    """``torch.load(source, weights_only=True)`` on CPU; ``error`` (one line) when it fails.

    ``source`` is a path or the bytes of a file; ``what`` names it in the error
    ("checkpoint", "weights file"...).
    """
    import torch

    where = "message" if isinstance(source, (bytes, bytearray)) else str(source)
    if not isinstance(source, (bytes, bytearray)) and not Path(source).is_file():
        raise error(f"{what} {where} does not exist")
    try:
        f: Any = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 -- any failure to unpickle is bad input
        raise error(f"cannot load {what} {where}: {describe_load_error(exc)}") from None
