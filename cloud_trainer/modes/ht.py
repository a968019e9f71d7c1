"""``--mode ht`` (this method): the cloud segment learns from the edges' int8 cut activations.

The strategy interface's defaults are ht's answers, so this mode adds nothing to them;
it has its own module so that every mode is looked up the same way.
"""

from __future__ import annotations

from cloud_trainer.modes.base import ModeStrategy


class HtMode(ModeStrategy):
    name = "ht"
