"""Progress bars of the edge runtime's loops: on a terminal only, and never with ``--quiet``.

Redirected output (a log file, systemd's journal, a test capturing it) gets no bars:
their carriage returns make a log unreadable. ``toolkit.core.entry.show_progress``
decides, the same way for the three CLIs.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from toolkit.core.entry import show_progress


def progress_bar(quiet: bool, iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr, disabled when ``quiet`` or stdout is not a terminal."""
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, disable=quiet or not show_progress(), **kwargs)
