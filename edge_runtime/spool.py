"""The edge's on-disk outbox: every message waits here until it is safe to forget.

Why on disk: a board loses power, its link drops, the broker restarts. Training
must go on meanwhile and nothing produced may be lost, so each message is
written to an SQLite database (WAL journal: an append is one small transaction,
and a process killed at any instant leaves every committed row intact) before
the publisher thread sends it.

When a row may go:

* an activation batch (a row with a ``seq``): only when the cloud trainer acks
  it as trained *and checkpointed* (:class:`toolkit.core.protocol.messages.Ack`). A broker's
  PUBACK is not enough: a broker or a cloud trainer that crashes after it can
  still lose the batch, and then it is sent again from here;
* anything else (retained weights and status): after the broker's PUBACK.

The spool is bounded in bytes (``mqtt.spool_mb`` of the board profile, or
``--spool-mb``). The policy when it is full is **block**: ``append`` waits for
room, which stalls the training loop (back-pressure) and loses nothing. A spool
is never dropped from silently: training a batch the cloud never sees would
make the run incomplete, which the cloud reports but cannot repair.

The database also remembers the next sequence number ever appended
(``next_seq``), so an edge resumed from an older checkpoint knows which of the
batches it trains again were already spooled and must not be sent twice with
other contents (``edge_runtime.train``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolkit.core.errors import HiertrainError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS msgs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    seq INTEGER,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    retain INTEGER NOT NULL,
    kind TEXT NOT NULL,
    props TEXT
);
CREATE INDEX IF NOT EXISTS msgs_seq ON msgs(seq);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

SPOOL_VERSION = "1"


@dataclass
class SpoolRow:
    id: int
    seq: int | None
    topic: str
    payload: bytes
    retain: bool
    kind: str
    properties: dict[str, Any] | None


def _props_to_json(props: Mapping[str, Any] | None) -> str | None:
    if not props:
        return None
    out = dict(props)
    if "correlation_data" in out:
        cd = out["correlation_data"]
        out["correlation_data"] = (cd.encode() if isinstance(cd, str) else bytes(cd)).hex()
    if "user_properties" in out:
        up = out["user_properties"]
        out["user_properties"] = [list(kv) for kv in (up.items() if isinstance(up, Mapping)
                                                      else up)]
    return json.dumps(out)


def _props_from_json(text: str | None) -> dict[str, Any] | None:
    if not text:
        return None
    out = json.loads(text)
    if "correlation_data" in out:
        out["correlation_data"] = bytes.fromhex(out["correlation_data"])
    if "user_properties" in out:
        out["user_properties"] = [tuple(kv) for kv in out["user_properties"]]
    return out


class Spool:
    """A bounded, persistent FIFO of messages; thread-safe (one connection, one lock).

    ``path`` None keeps the database in memory (same code, no durability): for
    callers that have nowhere to write.
    """

    def __init__(self, path: str | Path | None, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("spool size must be >= 1 byte")
        self.path = Path(path) if path is not None else None
        self.max_bytes = max_bytes
        self._cond = threading.Condition()
        try:
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path) if self.path else ":memory:",
                                       check_same_thread=False, isolation_level=None)
            if self.path is not None:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")  # a power cut keeps commits
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('version', ?)", (SPOOL_VERSION,))
            version = self._meta("version")
            self._bytes, self._count = self._db.execute(
                "SELECT COALESCE(SUM(LENGTH(payload)), 0), COUNT(*) FROM msgs").fetchone()
        except sqlite3.Error as exc:
            raise HiertrainError(
                f"cannot open the spool {self.path} ({exc}); pass a writable --spool-dir or "
                "delete the file if it is damaged"
            ) from None
        if version != SPOOL_VERSION:
            raise HiertrainError(f"{self.path} is spool version {version}, not {SPOOL_VERSION}; "
                                 "delete it or use another --spool-dir")
        self.peak_bytes = self._bytes
        self.full_waits = 0
        self.wait_s = 0.0  # time appends spent waiting for room

    def _meta(self, key: str, default: str | None = None) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    # ------------------------------------------------------------------ state
    @property
    def bytes(self) -> int:
        with self._cond:
            return self._bytes

    def __len__(self) -> int:
        with self._cond:
            return self._count

    @property
    def next_seq(self) -> int:
        """One more than the largest ``seq`` ever appended (0 for a new spool)."""
        with self._cond:
            return int(self._meta("next_seq", "0") or 0)

    @property
    def ever_acked(self) -> bool:
        """Whether a cloud trainer has ever acked a batch of this spool (kept on disk, so a
        restarted edge knows its trainer acks even before the next ack arrives)."""
        with self._cond:
            return self._meta("acked") == "1"

    def mark_acked(self) -> None:
        with self._cond:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('acked', '1')")

    def last_id(self) -> int:
        """The newest row's id (0 when empty): what an earlier process left to send."""
        with self._cond:
            return int(self._db.execute("SELECT COALESCE(MAX(id), 0) FROM msgs").fetchone()[0])

    def first_id_after(self, row_id: int) -> int | None:
        """The oldest row id above ``row_id``, without reading its payload."""
        with self._cond:
            r = self._db.execute("SELECT MIN(id) FROM msgs WHERE id > ?", (row_id,)).fetchone()
        return None if r[0] is None else int(r[0])

    def pending_seqs(self) -> list[int]:
        """Sequence numbers still waiting for the cloud's ack, in order."""
        with self._cond:
            return [r[0] for r in self._db.execute(
                "SELECT seq FROM msgs WHERE seq IS NOT NULL ORDER BY seq")]

    # ---------------------------------------------------------------- changes
    def append(self, topic: str, payload: bytes, *, retain: bool = False, kind: str = "act",
               properties: Mapping[str, Any] | None = None, seq: int | None = None,
               timeout: float | None = None, failed: Any = None) -> int:
        """Store one message, waiting while the spool is full (the block policy).

        A message bigger than the whole spool is taken when the spool is empty
        (else it could never be). ``failed()`` (optional) is polled while
        waiting and may raise to stop the wait. Returns the row id.
        """
        size = len(payload)
        start = time.monotonic()
        with self._cond:
            waited = False
            while self._count and self._bytes + size > self.max_bytes:
                if not waited:
                    self.full_waits += 1
                    waited = True
                if failed is not None:
                    failed()
                if timeout is not None and time.monotonic() - start > timeout:
                    raise HiertrainError(
                        f"the spool {self.path or '(memory)'} stayed full "
                        f"({self._bytes} of {self.max_bytes} bytes) for {timeout:.0f} s: "
                        "the cloud trainer is not acknowledging batches; check it and the "
                        "broker, or give a bigger --spool-mb"
                    )
                self._cond.wait(0.1)
            if waited:
                self.wait_s += time.monotonic() - start
            try:
                self._db.execute("BEGIN")
                cur = self._db.execute(
                    "INSERT INTO msgs (seq, topic, payload, retain, kind, props) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (seq, topic, bytes(payload), int(retain), kind, _props_to_json(properties)))
                if seq is not None:
                    self._db.execute(
                        "INSERT INTO meta VALUES ('next_seq', ?) ON CONFLICT(key) DO UPDATE "
                        "SET value = MAX(CAST(value AS INTEGER), CAST(excluded.value AS INTEGER))",
                        (str(seq + 1),))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise HiertrainError(
                    f"cannot write the spool {self.path} ({exc}); check free space"
                ) from None
            self._bytes += size
            self._count += 1
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            self._cond.notify_all()
            return int(cur.lastrowid)

    def next_after(self, row_id: int) -> SpoolRow | None:
        """The oldest row with an id above ``row_id`` (the sender's cursor)."""
        with self._cond:
            r = self._db.execute(
                "SELECT id, seq, topic, payload, retain, kind, props FROM msgs WHERE id > ? "
                "ORDER BY id LIMIT 1", (row_id,)).fetchone()
        if r is None:
            return None
        return SpoolRow(r[0], r[1], r[2], bytes(r[3]), bool(r[4]), r[5], _props_from_json(r[6]))

    def wait_for_rows(self, timeout: float) -> None:
        """Sleep until something is appended (or ``timeout``)."""
        with self._cond:
            self._cond.wait(timeout)

    def delete(self, row_id: int) -> None:
        self._delete("id = ?", (row_id,))

    def delete_through(self, row_id: int) -> int:
        """Delete every row up to ``row_id`` (those the broker has acknowledged)."""
        return self._delete("id <= ?", (row_id,))

    def confirm(self, low: int, above: Iterable[int] = ()) -> int:
        """Delete the batches with ``seq < low`` or in ``above``; returns how many."""
        n = self._delete("seq IS NOT NULL AND seq < ?", (low,))
        extra = sorted(set(above))
        for i in range(0, len(extra), 500):
            chunk = extra[i:i + 500]
            n += self._delete(f"seq IN ({','.join('?' * len(chunk))})", tuple(chunk))
        return n

    def clear(self) -> int:
        """Forget everything, ``next_seq`` too (a fresh start of the run)."""
        with self._cond:
            self._db.execute("DELETE FROM meta WHERE key = 'next_seq'")
        return self._delete("1 = 1", ())

    def _delete(self, where: str, params: tuple) -> int:
        with self._cond:
            row = self._db.execute(
                f"SELECT COALESCE(SUM(LENGTH(payload)), 0), COUNT(*) FROM msgs WHERE {where}",
                params).fetchone()
            if not row[1]:
                return 0
            self._db.execute(f"DELETE FROM msgs WHERE {where}", params)
            self._bytes -= row[0]
            self._count -= row[1]
            self._cond.notify_all()
            return int(row[1])

    def close(self) -> None:
        with self._cond:
            try:
                self._db.close()
            except sqlite3.Error:
                pass
