"""Adding a batch's jobs in bulk, in flat memory whatever the corpus size.

Rows are written a page at a time: with PostgreSQL COPY (psycopg), elsewhere with multi-row
INSERTs. Duplicate ids are found without keeping every id: a Bloom filter of fixed size says
"new" for sure or "maybe seen"; a maybe is settled against the page not yet written and the
batch's rows already written (the unique index on batch and id), so a false positive costs one
indexed lookup and a real duplicate is reported with the line where the id was first seen.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from models.counters import count_moves
from models.states import JobState
from models.tables import Batch, Job

PAGE_ROWS = 5000  # rows written per COPY / INSERT
PAGE_BYTES = 16 * 1024 * 1024  # or fewer, when their texts reach this many bytes
BLOOM_BITS = 1 << 27  # 16 MiB: about 1 false "maybe" in 10^7 ids at 1M ids, 3 in 1,000 at 10M
BLOOM_HASHES = 5
_COLUMNS = ("batch_id", "doc_id", "line", "text", "meta", "request", "state", "attempts", "created_at")
_COPY = f"COPY jobs ({', '.join(_COLUMNS)}) FROM STDIN"


class SeenIds:
    """A Bloom filter of ids: `add` says whether an id may have been added before (never a false no)."""

    def __init__(self, bits: int = BLOOM_BITS, hashes: int = BLOOM_HASHES) -> None:
        assert bits & (bits - 1) == 0, "a power of two"
        self.mask = bits - 1
        self.hashes = hashes
        self.bits = bytearray(bits // 8)  # zero pages cost no memory until a bit in them is set

    def add(self, key: str) -> bool:
        """Add `key`; True if it may have been added before."""
        digest = int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=32).digest())
        seen = True
        for _ in range(self.hashes):
            position = digest & self.mask
            digest >>= 40
            byte, bit = position >> 3, 1 << (position & 7)
            if not self.bits[byte] & bit:
                seen = False
                self.bits[byte] |= bit
        return seen


@dataclass(frozen=True, slots=True)
class Duplicate:
    """An id met a second time: where it was first seen (its line, or None where rows have none)."""

    first_line: int | None


def add_jobs(session: Session, batch: Batch, rows: Iterable[Mapping[str, Any]]) -> int:
    """Add one queued job per row (`doc_id`, `text`, optional `line`, `meta`, `request`); returns the count.

    For callers whose ids are unique already; a duplicate id raises `ValueError`.
    """
    writer = JobWriter(session, batch)
    for row in rows:
        fields = {key: row.get(key) for key in ("line", "meta", "request")}
        if writer.add(row["doc_id"], row["text"], **fields) is not None:
            raise ValueError(f"duplicate id {row['doc_id']!r} in batch {batch.id}")
    return writer.close()


class JobWriter:
    """Writes the jobs of one batch inside the caller's transaction; `close` counts them on the batch."""

    def __init__(self, session: Session, batch: Batch, page_rows: int = PAGE_ROWS) -> None:
        self.session = session
        self.batch = batch
        self.page_rows = page_rows
        self.seen = SeenIds()
        self.pending: dict[str, tuple[Any, ...]] = {}  # doc id -> row, in order, not written yet
        self.pending_bytes = 0
        self.written = 0
        self.copy = session.get_bind().dialect.driver == "psycopg"
        self.created_at = batch.created_at

    def add(
        self,
        doc_id: str,
        text: str,
        *,
        line: int | None = None,
        meta: dict[str, Any] | None = None,
        request: dict[str, Any] | None = None,
    ) -> Duplicate | None:
        """Queue a job; a `Duplicate` (and nothing added) when the batch has this id already."""
        if self.seen.add(doc_id):
            duplicate = self._first(doc_id)
            if duplicate is not None:
                return duplicate
        self.pending[doc_id] = (
            self.batch.id,
            doc_id,
            line,
            text,
            meta or None,
            request,
            JobState.QUEUED.value,
            0,
            self.created_at,
        )
        self.pending_bytes += len(text)
        if len(self.pending) >= self.page_rows or self.pending_bytes >= PAGE_BYTES:
            self._flush()
        return None

    def close(self) -> int:
        """Write what is pending and count every job on the batch (total, queued); returns the count."""
        self._flush()
        self.batch.total += self.written
        count_moves(self.session, self.batch.id, {JobState.QUEUED: self.written})
        self.session.flush()
        self.session.refresh(self.batch)
        return self.written

    def _first(self, doc_id: str) -> Duplicate | None:
        """Where `doc_id` was first added to this batch, if it was (the Bloom filter only says maybe)."""
        row = self.pending.get(doc_id)
        if row is not None:
            return Duplicate(row[2])
        found = self.session.execute(
            select(Job.line).where(Job.batch_id == self.batch.id, Job.doc_id == doc_id)
        ).first()
        return None if found is None else Duplicate(found[0])

    def _flush(self) -> None:
        if not self.pending:
            return
        rows = list(self.pending.values())
        if self.copy:
            raw = self.session.connection().connection.driver_connection
            with raw.cursor() as cursor, cursor.copy(_COPY) as copy:  # type: ignore[union-attr]
                for row in rows:
                    copy.write_row((*row[:4], _json(row[4]), _json(row[5]), *row[6:]))
        else:  # the ORM's JSON type serializes meta and request itself
            self.session.execute(insert(Job), [dict(zip(_COLUMNS, row, strict=True)) for row in rows])
        self.written += len(rows)
        self.pending.clear()
        self.pending_bytes = 0


def _json(value: dict[str, Any] | None) -> str | None:
    return None if value is None else json.dumps(value)
