"""The end of an ht run: the edge exits only once the cloud trainer confirmed every batch.

Why: a batch leaves the spool only when the trainer acks it as trained *and
checkpointed*. A trainer acks after each periodic checkpoint, so at the end of a run
the last batches (up to ``--checkpoint-every`` of the cloud) are trained but not yet
durable; an edge that exits then leaves them to a trainer crash, which loses them with
nobody left to send them again. (That was the faults soak's stall: an edge resumed after
its last batch had seen no ack in its own process, skipped the wait, exited 0 without
even sending its spool, and the trainer waited for six batches that never came.)

So after "done" the edge waits, up to ``--confirm-timeout``, until every spooled batch is
acked, following the trainer's retained status (``hiertrain/<run>/cloud/status``) to
know whether there is a trainer to wait for:

* no status and no ack ever (no trainer for this run on this broker): nothing will ack,
  stop at once;
* ``done`` (the trainer finished the run): its status says how many of this edge's
  batches it trained and checkpointed; all of them -> confirmed (an edge resumed after
  the trainer's last ack), fewer -> it finished without them, stop at once;
* ``online``/``training``, or ``offline``/``error`` (a trainer that crashed or was
  stopped may be restarted, e.g. by systemd): wait, sending the spool again when a
  trainer comes (back) online and after 30 s without an ack.

Whatever is unconfirmed at the end stays in the spool for ``--resume``, and the run
ends incomplete (exit code 5, ``RunIncompleteError``). ``--confirm-timeout 0`` skips
all of this (the batches stay in the spool; exit 0).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from edge_runtime.publisher import Publisher
from edge_runtime.spool import Spool
from toolkit.core.errors import WireError
from toolkit.core.protocol.messages import CLOUD_DEVICE, decode_status

log = logging.getLogger("edge_runtime")

RESEND_AFTER_S = 30.0
"""Send the spool again after this long without an ack (a broker that lost batches)."""
PROGRESS_EVERY_S = 30.0
"""How often the wait logs where it stands."""
SETTLE_S = 2.0
"""How long after subscribing a retained status may take to arrive before "no status"
means "no trainer"."""
_POLL_S = 0.1


class TrainerWatch:
    """The run's cloud trainer as its retained status shows it (callback on the link's
    network thread: quick)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.state: str | None = None  # None: no status seen
        self.detail: dict[str, Any] = {}  # the trainer's per-device counts, at "done"
        self.onlines = 0  # times the trainer was seen coming online
        self.subscribed_at: float | None = None  # None: not subscribed (e.g. refused by ACL)
        # whether the running trainer averages the edges (--fleet-average); None: unknown
        self.averages: bool | None = None

    def on_status(self, topic: str, payload: bytes, props: dict[str, Any]) -> None:
        try:
            st = decode_status(payload)
        except WireError as exc:
            log.debug("ignored a cloud status: %s", exc)
            return
        if st.role != "cloud" or st.device != CLOUD_DEVICE:
            return
        with self._lock:
            if st.state == "online" and self.state != "online":
                self.onlines += 1
            self.state = st.state
            self.detail = dict(st.extra.get("per_device_detail") or {})
            if st.state in ("online", "training") and "fleet_average" in st.extra:
                self.averages = bool(st.extra["fleet_average"])

    def snapshot(self) -> tuple[str | None, dict[str, Any], int]:
        with self._lock:
            return self.state, dict(self.detail), self.onlines


@dataclass
class Confirmation:
    """How the wait ended: ``confirmed`` or, if not, why (for the log and the error)."""

    confirmed: bool
    waited_s: float
    reason: str = ""


def _done_covers(detail: dict[str, Any], device: str, produced: int) -> bool:
    """Whether a finished trainer's status says it trained all ``produced`` batches of
    ``device`` (failed steps count as processed, as in its ledger)."""
    d = detail.get(device)
    if not isinstance(d, dict):
        return False
    trained = int(d.get("trained") or 0) + int(d.get("failed") or 0)
    return d.get("published") == produced and trained >= produced


def wait_for_confirmation(publisher: Publisher, spool: Spool, watch: TrainerWatch, *,
                          run: str, device: str, timeout: float) -> Confirmation:
    """Wait until the trainer acked every spooled batch (see the module docstring)."""
    start = time.monotonic()
    deadline = start + timeout
    produced = spool.next_seq
    last_count, last_change = len(spool), start
    last_log = start
    onlines = watch.snapshot()[2]
    while True:
        pending = spool.pending_seqs()
        now = time.monotonic()
        if not pending:
            return Confirmation(True, now - start)
        state, detail, seen_online = watch.snapshot()
        if state == "done":
            if _done_covers(detail, device, produced):
                spool.confirm(produced)
                log.info("the cloud trainer finished the run with all %d batches of %s "
                         "checkpointed: %d spooled batch(es) confirmed", produced, device,
                         len(pending))
                return Confirmation(True, now - start)
            return Confirmation(False, now - start, (
                f"the cloud trainer of run {run} finished without confirming {len(pending)} "
                f"batch(es) of {device}"))
        if (state is None and watch.subscribed_at is not None
                and now - watch.subscribed_at > SETTLE_S
                and publisher.acks_seen == 0 and not spool.ever_acked):
            return Confirmation(False, now - start, (
                f"no cloud trainer for run {run} on this broker (no status, no ack) to "
                f"confirm {len(pending)} batch(es)"))
        if now >= deadline:
            return Confirmation(False, now - start, (
                f"the cloud trainer (state {state or 'unknown'}) did not confirm "
                f"{len(pending)} batch(es) within {timeout:g} s"))
        publisher.raise_if_failed()
        if seen_online != onlines:  # a trainer came (back) online: its session may be new
            onlines = seen_online
            publisher.rewind()
            last_change = now
        if len(spool) != last_count:
            last_count, last_change = len(spool), now
        elif now - last_change > RESEND_AFTER_S:
            log.info("no ack from the cloud trainer for %.0f s; sending %d batch(es) again",
                     RESEND_AFTER_S, len(pending))
            publisher.rewind()
            last_change = now
        if now - last_log >= PROGRESS_EVERY_S:
            log.info("waiting for the cloud trainer (state %s) to confirm %d batch(es): "
                     "seqs %d..%d, %.0f s left", state or "unknown", len(pending), pending[0],
                     pending[-1], deadline - now)
            last_log = now
        time.sleep(_POLL_S)
