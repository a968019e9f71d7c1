"""``python -m cloud_trainer``: same as the ``cloud-trainer`` console script."""

import sys

from cloud_trainer.cli import main

sys.exit(main())
