"""``python -m edge_runtime`` == ``edge-runtime``."""

import sys

from edge_runtime.cli import main

sys.exit(main())
