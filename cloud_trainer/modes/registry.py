"""Mode name -> strategy: the one place that knows every mode the cloud trainer runs.

The training loop never imports this module (it is handed a strategy), so the
loop and the modes cannot import each other in a circle.
"""

from __future__ import annotations

from collections.abc import Callable

from cloud_trainer.config import CloudConfig
from cloud_trainer.modes.base import ModeStrategy
from cloud_trainer.modes.ht import HtMode
from cloud_trainer.modes.split import SplitMode
from cloud_trainer.modes.upload import UploadMode
from toolkit.core.protocol.modes import check_mode

STRATEGIES: dict[str, Callable[[CloudConfig], ModeStrategy]] = {
    "ht": lambda cfg: HtMode(),
    "split": lambda cfg: SplitMode(grad_bits=cfg.grad_bits),
    "cloud": lambda cfg: UploadMode(),
}
"""One factory per ``toolkit.core.protocol.modes.MODES`` entry."""


def strategy_for(cfg: CloudConfig) -> ModeStrategy:
    """A fresh strategy for ``cfg.mode`` (HiertrainError naming the choices if unknown)."""
    return STRATEGIES[check_mode(cfg.mode)](cfg)
