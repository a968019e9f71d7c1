"""Imports of what a lean install leaves out, failing in one line that names the extra to add.

A board installs ``toolkit/deploy/board-requirements.txt`` (the edge runtime's imports, nothing
more) and a server ``hiertrain[cloud]``; the build machine ``hiertrain[all]``. The extras are in
``pyproject.toml``; docs/deploy.md says which install needs which.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from toolkit.core.errors import HiertrainError


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """``import module``, or HiertrainError: ``purpose`` needs it, install ``hiertrain[extra]``."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise HiertrainError(
            f"{purpose} needs {top}, which is not installed here (a lean install leaves it "
            f"out); pip install 'hiertrain[{extra}]' or pip install {top}"
        ) from None
