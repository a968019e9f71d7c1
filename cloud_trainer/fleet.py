"""The edges of a run as the cloud sees them: their statuses, the done rule, per-device counts.

The done rule (spec): every expected device has status ``done`` and the ledger
holds all of its seqs ``0..batches_published-1``. Kept out of the training loop
because it is pure bookkeeping over the :class:`DeviceRegistry` and the
:class:`Ledger`, the same in every mode.
"""

from __future__ import annotations

import logging
from typing import Any

from cloud_trainer.ingest import DeviceRegistry, StatusItem
from cloud_trainer.ledger import Ledger
from toolkit.core.protocol.messages import Status

log = logging.getLogger(__name__)


class Fleet:
    """Latest status per edge, who went offline, failed steps; the done rule over them."""

    def __init__(self, registry: DeviceRegistry, ledger: Ledger) -> None:
        self.registry = registry
        self.ledger = ledger
        self.statuses: dict[str, Status] = {}  # latest status per edge, except "offline"
        self.offline: set[str] = set()
        self.failed: dict[str, int] = {}  # training steps that raised, per device

    def on_status(self, item: StatusItem) -> None:
        st, device = item.status, item.device
        if st.state == "offline":
            # The edge's last will carries no counters; keep its last real status, so
            # an edge that died after saying "done" still counts as done.
            if device not in self.offline:
                self.offline.add(device)
                prev = self.statuses.get(device)
                if prev is None or prev.state != "done":
                    log.warning("edge %s went offline before it was done", device)
            return
        self.offline.discard(device)
        prev = self.statuses.get(device)
        self.statuses[device] = st
        if prev is None or prev.state != st.state:
            log.info("edge %s is %s (epoch %d, %d batches published)", device, st.state,
                     st.epoch, st.batches_published)
        if st.state == "error":
            log.warning("edge %s reports an error: %s", device, st.message)

    def complete(self) -> bool:
        if not self.registry.complete_roster():
            return False
        for device in self.registry.expected():
            st = self.statuses.get(device)
            if st is None or st.state != "done" or not self.ledger.covers(
                device, st.batches_published
            ):
                return False
        return True

    def incomplete(self) -> list[str]:
        """One phrase per device the done rule still waits for."""
        out = []
        for device in self.registry.expected():
            st = self.statuses.get(device)
            trained = self.ledger.trained_count(device)
            if st is None and trained == 0:
                if device not in self.registry.refused():
                    out.append(f"{device} never appeared")
            elif st is None or st.state != "done":
                state = "no status" if st is None else f"state {st.state}"
                out.append(f"{device} did not finish ({state}, {trained} batches trained)")
            elif not self.ledger.covers(device, st.batches_published):
                out.append(f"{device} is done but {trained} of its {st.batches_published} "
                           "batches arrived")
        out.extend(f"refused: {why}" for why in self.registry.refused().values())
        missing = self.registry.missing_count()
        if missing:
            out.append(f"{missing} more device(s) never came online (--devices "
                       f"{self.registry.count})")
        if not self.registry.expected() and not missing:
            out.append("no edge device ever came online")
        return out

    def per_device(self) -> dict[str, dict[str, Any]]:
        devices = sorted(set(self.registry.expected()) | set(self.registry.admitted())
                         | set(self.ledger.devices()))
        out = {}
        for d in devices:
            failed = self.failed.get(d, 0)
            st = self.statuses.get(d)
            out[d] = {
                "trained": self.ledger.trained_count(d) - failed,
                "published": st.batches_published if st is not None else None,
                "duplicates": self.ledger.duplicates(d),
                "failed": failed,
                "state": "offline" if d in self.offline else (st.state if st else None),
            }
        return out
