"""``cloud-trainer --workers N``: N local workers of one run, started by torch's elastic launcher.

Why the launcher (``torch.distributed.launcher``, what ``torchrun`` runs): it sets the
environment every worker reads (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``...), hosts the
rendezvous, and when a worker dies it stops the others and starts the group again (up to
``--max-restarts`` times); the restarted group resumes from the leader's checkpoint
(``cloud_trainer.group``). Several machines: run ``torchrun --nnodes ... -m cloud_trainer
train ...`` on each instead; the workers need nothing else.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path

from cloud_trainer.checkpoint import SUMMARY
from toolkit.core.entry import ExitCode
from toolkit.core.errors import HiertrainError
from toolkit.core.transport.ports import free_port

log = logging.getLogger(__name__)


def strip_workers(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--workers N``/``--workers=N`` and ``--max-restarts``: what each
    worker runs."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--workers", "--max-restarts"):
            skip = True
            continue
        if arg.startswith(("--workers=", "--max-restarts=")):
            continue
        out.append(arg)
    return out


def launch_workers(n: int, worker_argv: Sequence[str], *, max_restarts: int = 3,
                   run_dir: str | Path | None = None) -> int:
    """Run ``python -m cloud_trainer <worker_argv>`` as ``n`` workers; the exit code.

    Workers end with 0 also when the run is incomplete (any other code would make the
    launcher restart them); the leader's ``cloud_summary.json`` then says what is missing,
    and this returns 5, as one trainer would.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if n < 2:
        raise HiertrainError(f"--workers must be >= 2 to start a group, got {n}")
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=f"hiertrain-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=max_restarts, monitor_interval=0.5,
    )
    log.info("starting %d cloud-trainer workers (restarted up to %d times)", n, max_restarts)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "cloud_trainer",
                                                          *worker_argv)
    except ChildFailedError as exc:
        failures = exc.failures
        codes = sorted({f.exitcode for f in failures.values()})
        log.error("the workers failed after %d restart(s): exit code(s) %s", max_restarts,
                  codes)
        return next((c for c in codes if c and c > 0), 1)
    if run_dir is not None:
        summary = Path(run_dir).expanduser() / SUMMARY
        try:
            if json.loads(summary.read_text()).get("missing"):
                return int(ExitCode.INCOMPLETE)
        except (OSError, ValueError):
            log.error("the workers ended without %s", summary)
            return 1
    return 0
