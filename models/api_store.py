"""Every read and write of the HTTP API's tables: keys, files, API batch records, webhook deliveries.

Like `models.store`, state changes are conditional UPDATEs (`WHERE status = <expected>`), so two
API processes running the same background pass never both act on one batch or one delivery.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, delete, exists, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from models.counters import Counts, counts_of
from models.db import rowcount
from models.errors import InputError
from models.states import JobState
from models.store import as_utc, utcnow
from models.tables import ApiBatch, ApiFile, ApiFileChunk, ApiKey, ApiRejection, Batch, Job, WebhookDelivery

KEY_PREFIX = "sk-sumfleet-"  # API key secrets start with this
WEBHOOK_SECRET_PREFIX = "whsec_"  # and webhook signing secrets with this


def hash_secret(secret: str) -> str:
    """How a key's secret is stored: SHA-256 (the secret is 256 random bits, so no salt or stretching)."""
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_id(prefix: str, nbytes: int = 12) -> str:
    return prefix + secrets.token_hex(nbytes)


def _lookable(object_id: str) -> bool:
    """Whether an id from a request can be looked up (the database refuses NUL and lone surrogates)."""
    return len(object_id) <= 64 and not any(c == "\x00" or "\ud800" <= c <= "\udfff" for c in object_id)


# --- keys ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NewKey:
    """A key just created: the only moment its secret (and webhook secret) are known in full."""

    id: str
    name: str | None
    secret: str
    webhook_secret: str
    rate_limit_per_minute: int | None = None
    documents_per_day: int | None = None
    batches_in_flight: int | None = None


def _check_limits(**limits: int | None) -> None:
    for name, value in limits.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise InputError(
                f"{name} must be a whole number >= 0 (0: unlimited) or unset (the server's); got {value!r}"
            )


def create_key(
    session: Session,
    name: str | None = None,
    *,
    rate_limit_per_minute: int | None = None,
    documents_per_day: int | None = None,
    batches_in_flight: int | None = None,
) -> NewKey:
    """A new key. Each limit: None follows the server's setting (SUMFLEET_API_...), 0 is unlimited, N is N."""
    _check_limits(
        rate_limit_per_minute=rate_limit_per_minute,
        documents_per_day=documents_per_day,
        batches_in_flight=batches_in_flight,
    )
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(
        id=new_id("key_", 8),
        name=name,
        secret_hash=hash_secret(secret),
        secret_prefix=secret[: len(KEY_PREFIX) + 4],
        # Standard Webhooks form: whsec_ + standard base64 of 32 random bytes (the HMAC key)
        webhook_secret=WEBHOOK_SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii"),
        created_at=utcnow(),
        rate_limit_per_minute=rate_limit_per_minute,
        documents_per_day=documents_per_day,
        batches_in_flight=batches_in_flight,
    )
    session.add(key)
    session.flush()
    return NewKey(key.id, name, secret, key.webhook_secret, rate_limit_per_minute, documents_per_day, batches_in_flight)


UNCHANGED: Any = object()  # `set_key_limits`: leave this limit as it is


def set_key_limits(
    session: Session,
    key_id: str,
    *,
    rate_limit_per_minute: int | None = UNCHANGED,
    documents_per_day: int | None = UNCHANGED,
    batches_in_flight: int | None = UNCHANGED,
) -> ApiKey | None:
    """Change a key's limits (None: back to the server's setting); None when there is no such key."""
    given = {
        name: value
        for name, value in (
            ("rate_limit_per_minute", rate_limit_per_minute),
            ("documents_per_day", documents_per_day),
            ("batches_in_flight", batches_in_flight),
        )
        if value is not UNCHANGED
    }
    _check_limits(**given)
    key = session.get(ApiKey, key_id)
    if key is None:
        return None
    for name, value in given.items():
        setattr(key, name, value)
    session.flush()
    return key


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))


def revoke_key(session: Session, key_id: str) -> ApiKey | None:
    """Revoke a key (idempotent); None when there is no such key."""
    key = session.get(ApiKey, key_id)
    if key is not None and key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def key_for_secret(session: Session, secret: str) -> ApiKey | None:
    """The key whose secret this is (revoked or not), or None."""
    if any("\ud800" <= c <= "\udfff" for c in secret):
        return None  # not encodable, so no key's secret
    return session.scalar(select(ApiKey).where(ApiKey.secret_hash == hash_secret(secret)))


# --- files --------------------------------------------------------------------------------------


def add_upload(
    session: Session,
    owner: str,
    filename: str,
    purpose: str,
    chunks: Iterable[bytes],
    expires_after: int | None = None,
) -> ApiFile:
    """Store an uploaded file piece by piece (each `chunks` item one row); returns it with its size.
    `expires_after`: seconds after its creation that it expires (None: kept until deleted)."""
    now = utcnow()
    file = ApiFile(
        id=new_id("file-"),
        owner=owner,
        kind="upload",
        purpose=purpose,
        filename=filename,
        size=0,
        created_at=now,
        expires_at=None if expires_after is None else now + timedelta(seconds=expires_after),
    )
    session.add(file)
    session.flush()
    size = 0
    for seq, data in enumerate(chunks):
        session.add(ApiFileChunk(file_id=file.id, seq=seq, data=data))
        session.flush()
        session.expunge_all()  # keep only the current piece in memory
        size += len(data)
    session.execute(update(ApiFile).where(ApiFile.id == file.id).values(size=size))
    file.size = size
    return file


def add_generated_file(
    session: Session, owner: str, api_batch_id: str, kind: str, size: int, expires_after: int | None = None
) -> ApiFile:
    """Record a batch's output or error file (its lines are generated from the jobs when read)."""
    now = utcnow()
    file = ApiFile(
        id=new_id("file-"),
        owner=owner,
        kind=kind,
        purpose="batch_output",
        filename=f"{api_batch_id}_{kind}.jsonl",
        size=size,
        api_batch_id=api_batch_id,
        created_at=now,
        expires_at=None if expires_after is None else now + timedelta(seconds=expires_after),
    )
    session.add(file)
    session.flush()
    return file


def expired(file: ApiFile, now: datetime | None = None) -> bool:
    """Whether a file has expired (it is gone for its owner, whether or not it is deleted yet)."""
    return file.expires_at is not None and as_utc(file.expires_at) <= (now or utcnow())


def get_file(session: Session, owner: str, file_id: str, *, lock: bool = False) -> ApiFile | None:
    """The file if `owner` has it and it has not expired; another key's file is as absent as a missing one.
    `lock`: hold its row until the transaction ends (a delete or a batch's claim on it waits)."""
    if not _lookable(file_id):
        return None
    if lock:
        query = select(ApiFile).where(ApiFile.id == file_id).with_for_update(key_share=True)
        file = session.scalar(query.execution_options(populate_existing=True))
    else:
        file = session.get(ApiFile, file_id)
    return file if file is not None and file.owner == owner and not expired(file) else None


def _being_validated(file_id: Any) -> Any:
    """SQL: a batch in `validating` reads this upload (its bytes must stay until it has)."""
    return exists().where(ApiBatch.input_file_id == file_id, ApiBatch.status == "validating")


def delete_file(session: Session, owner: str, file_id: str) -> bool:
    """Delete `owner`'s file (an upload's bytes with it); False when `owner` has no such file.

    A batch made from an upload keeps running (its requests are jobs already); a deleted
    output or error file is simply gone, though its batch still names it. An upload a batch is
    still validating is gone for its owner at once (it expires now) and its bytes are deleted by
    the background pass once the batch has read them.
    """
    file = get_file(session, owner, file_id, lock=True)
    if file is None:
        return False
    if session.scalar(select(_being_validated(file.id))):
        file.expires_at = utcnow()
        session.flush()
        return True
    session.execute(delete(ApiFileChunk).where(ApiFileChunk.file_id == file.id))
    session.delete(file)
    return True


def prune_expired_files(sessions: sessionmaker[Session], now: datetime | None = None, limit: int = 100) -> int:
    """Delete up to `limit` expired files (an upload's bytes with them), one transaction each; returns how many.

    An upload a batch is still validating waits until the batch has read it; a batch that has
    read its file keeps its requests (they are jobs).
    """
    now = now or utcnow()
    with sessions() as session:
        due = list(
            session.scalars(
                select(ApiFile.id)
                .where(ApiFile.expires_at <= now, ~_being_validated(ApiFile.id))
                .order_by(ApiFile.expires_at)
                .limit(limit)
            )
        )
    deleted = 0
    for file_id in due:
        with sessions.begin() as session:
            query = select(ApiFile).where(ApiFile.id == file_id).with_for_update()
            file = session.scalar(query.execution_options(populate_existing=True))
            if file is None or not expired(file, now) or session.scalar(select(_being_validated(file.id))):
                continue  # deleted meanwhile, its expiry moved, or a batch took it for validation first
            session.execute(delete(ApiFileChunk).where(ApiFileChunk.file_id == file.id))
            session.delete(file)
            deleted += 1
    return deleted


def iter_upload(sessions: sessionmaker[Session], file_id: str) -> Iterator[bytes]:
    """The pieces of an uploaded file in order, one row read at a time."""
    seq = 0
    while True:
        with sessions() as session:
            data = session.scalar(
                select(ApiFileChunk.data).where(ApiFileChunk.file_id == file_id, ApiFileChunk.seq == seq)
            )
        if data is None:
            return
        yield bytes(data)
        seq += 1


def iter_upload_lines(sessions: sessionmaker[Session], file_id: str) -> Iterator[bytes]:
    """The lines of an uploaded file (without their line ends or a leading BOM), across piece boundaries."""
    pending = b""
    for seq, data in enumerate(iter_upload(sessions, file_id)):
        pending += data.removeprefix(b"\xef\xbb\xbf") if seq == 0 else data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r")
    if pending:
        yield pending.removesuffix(b"\r")


# --- listing ------------------------------------------------------------------------------------


def _page(
    session: Session, model: Any, query: Any, after: str | None, limit: int, owner: str
) -> tuple[list[Any], bool] | None:
    """Newest first, `limit` items after the item `after` (None: `after` names no item of `owner`)."""
    if after is not None:
        anchor = session.get(model, after) if _lookable(after) else None
        if anchor is None or anchor.owner != owner:
            return None
        query = query.where(
            or_(model.created_at < anchor.created_at, and_(model.created_at == anchor.created_at, model.id < anchor.id))
        )
    rows = list(session.scalars(query.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)))
    return rows[:limit], len(rows) > limit


def list_files(
    session: Session, owner: str, *, after: str | None, limit: int, purpose: str | None = None
) -> tuple[list[ApiFile], bool] | None:
    query = select(ApiFile).where(
        ApiFile.owner == owner, or_(ApiFile.expires_at.is_(None), ApiFile.expires_at > utcnow())
    )
    if purpose is not None:
        query = query.where(ApiFile.purpose == purpose)
    return _page(session, ApiFile, query, after, limit, owner)


def list_api_batches(
    session: Session, owner: str, kind: str, *, after: str | None, limit: int
) -> tuple[list[ApiBatch], bool] | None:
    query = select(ApiBatch).where(ApiBatch.owner == owner, ApiBatch.kind == kind)
    return _page(session, ApiBatch, query, after, limit, owner)


# --- API batch records --------------------------------------------------------------------------


def get_api_batch(session: Session, owner: str, api_batch_id: str, kind: str) -> ApiBatch | None:
    record = session.get(ApiBatch, api_batch_id) if _lookable(api_batch_id) else None
    return record if record is not None and record.owner == owner and record.kind == kind else None


def set_status(session: Session, api_batch_id: str, expected: Sequence[str], status: str, **values: Any) -> bool:
    """Move a record from one of the `expected` statuses to `status` (with `values`); False if it was not there."""
    result = session.execute(
        update(ApiBatch)
        .where(ApiBatch.id == api_batch_id, ApiBatch.status.in_(list(expected)))
        .values(status=status, **values),
        execution_options={"synchronize_session": False},
    )
    return rowcount(result) == 1


def active_api_batches(session: Session, statuses: Sequence[str]) -> list[str]:
    """Ids of records whose status is one of `statuses` (the background pass looks at each)."""
    return list(
        session.scalars(select(ApiBatch.id).where(ApiBatch.status.in_(list(statuses))).order_by(ApiBatch.created_at))
    )


def add_rejections(session: Session, api_batch_id: str, rows: Iterable[dict[str, Any]]) -> None:
    for row in rows:
        session.add(ApiRejection(api_batch_id=api_batch_id, **row))
    session.flush()


def iter_rejections(session: Session, api_batch_id: str, page: int = 500) -> Iterator[ApiRejection]:
    """The requests of a batch refused on their own, in line order, `page` at a time (read-only copies)."""
    last = 0
    while True:
        rows = list(
            session.scalars(
                select(ApiRejection)
                .where(ApiRejection.api_batch_id == api_batch_id, ApiRejection.id > last)
                .order_by(ApiRejection.id)
                .limit(page)
            )
        )
        if not rows:
            return
        for row in rows:
            session.expunge(row)
            yield row
        last = rows[-1].id


def rejection_counts(session: Session, api_batch_ids: Sequence[str]) -> dict[str, int]:
    if not api_batch_ids:
        return {}
    rows = session.execute(
        select(ApiRejection.api_batch_id, func.count())
        .where(ApiRejection.api_batch_id.in_(list(api_batch_ids)))
        .group_by(ApiRejection.api_batch_id)
    ).all()
    return {batch_id: n for batch_id, n in rows}


def job_totals(session: Session, batch_ids: Sequence[str]) -> dict[str, Counts]:
    """Per batch id: its counters (jobs by state, tokens of succeeded jobs), one query for any number of batches."""
    found = {
        batch.id: counts_of(batch) for batch in session.scalars(select(Batch).where(Batch.id.in_(list(batch_ids))))
    }
    return {batch_id: found.get(batch_id, Counts({})) for batch_id in batch_ids}


def live_running(session: Session, batch_id: str, now: datetime | None = None) -> int:
    """Running jobs of a batch whose worker still holds them (their lease has not run out)."""
    now = now or utcnow()
    return (
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.batch_id == batch_id,
                Job.state == JobState.RUNNING.value,
                or_(Job.lease_expires_at.is_(None), Job.lease_expires_at > now),
            )
        )
        or 0
    )


@dataclass(frozen=True, slots=True)
class JobLine:
    """What a batch output or error line needs of a job (never its text or messages)."""

    id: int
    custom_id: str
    state: str
    summary: str | None
    error: str | None
    prompt_tokens: int | None
    output_tokens: int | None
    max_new_tokens: int | None
    finished_at: datetime | None


def iter_job_lines(
    session: Session, batch_id: str, states: Sequence[str] | None = None, page: int = 500
) -> Iterator[JobLine]:
    """A batch's jobs (in `states`, or all) in submission order, `page` rows per query (bounded memory)."""
    last = 0
    columns = (
        Job.id,
        Job.doc_id,
        Job.state,
        Job.summary,
        Job.error,
        Job.prompt_tokens,
        Job.output_tokens,
        Job.request["max_new_tokens"].as_integer(),
        Job.finished_at,
    )
    while True:
        query = select(*columns).where(Job.batch_id == batch_id, Job.id > last)
        if states is not None:
            query = query.where(Job.state.in_(list(states)))
        rows = session.execute(query.order_by(Job.id).limit(page)).all()
        if not rows:
            return
        for row in rows:
            yield JobLine(*row)
        last = rows[-1][0]


# --- validating batches ---------------------------------------------------------------------------


def claim_validation(session: Session, api_batch_id: str, until: datetime, now: datetime | None = None) -> bool:
    """Take a `validating` batch whose claim is free or ran out (its process died) until `until`; False if
    it is not validating, or another process holds it."""
    now = now or utcnow()
    result = session.execute(
        update(ApiBatch)
        .where(
            ApiBatch.id == api_batch_id,
            ApiBatch.status == "validating",
            or_(ApiBatch.claimed_until.is_(None), ApiBatch.claimed_until < now),
        )
        .values(claimed_until=until),
        execution_options={"synchronize_session": False},
    )
    return rowcount(result) == 1


def renew_validation(session: Session, api_batch_id: str, until: datetime | None) -> bool:
    """Hold a `validating` batch until `until` (None: let any process take it now); False once it is not validating."""
    result = session.execute(
        update(ApiBatch)
        .where(ApiBatch.id == api_batch_id, ApiBatch.status == "validating")
        .values(claimed_until=until),
        execution_options={"synchronize_session": False},
    )
    return rowcount(result) == 1


def discard_validating(session: Session, api_batch_id: str) -> bool:
    """Delete a batch still `validating` (its creation was refused before it was answered); False if it moved on."""
    result = session.execute(
        delete(ApiBatch).where(ApiBatch.id == api_batch_id, ApiBatch.status == "validating"),
        execution_options={"synchronize_session": False},
    )
    return rowcount(result) == 1


def unclaimed_validations(session: Session, now: datetime | None = None, limit: int = 20) -> list[str]:
    """Ids of `validating` batches nobody holds (never taken, or their process died), oldest first."""
    now = now or utcnow()
    return list(
        session.scalars(
            select(ApiBatch.id)
            .where(
                ApiBatch.status == "validating",
                or_(ApiBatch.claimed_until.is_(None), ApiBatch.claimed_until < now),
            )
            .order_by(ApiBatch.created_at)
            .limit(limit)
        )
    )


# --- limits and quotas ----------------------------------------------------------------------------


def take_request(session: Session, key_id: str, per_minute: int, now: float) -> tuple[bool, float]:
    """Take one request from a key's token bucket (`per_minute` tokens, refilled evenly over a minute).

    One conditional UPDATE, so API processes sharing the database share the bucket exactly.
    Returns (taken, level): the tokens left after this request, or (refused) the level now.
    `now` is Unix seconds; a clock behind the last one counted refills nothing (it never drains).
    """
    capacity = float(per_minute)
    refill = capacity / 60.0
    elapsed = case(
        (ApiKey.rate_at.is_(None), 0.0),
        (ApiKey.rate_at < now, now - ApiKey.rate_at),
        else_=0.0,
    )
    refilled = func.coalesce(ApiKey.rate_tokens, capacity) + elapsed * refill
    level = case((refilled > capacity, capacity), else_=refilled)
    latest = case((or_(ApiKey.rate_at.is_(None), ApiKey.rate_at < now), now), else_=ApiKey.rate_at)
    left = session.execute(
        update(ApiKey)
        .where(ApiKey.id == key_id, level >= 1.0)
        .values(rate_tokens=level - 1.0, rate_at=latest)
        .returning(ApiKey.rate_tokens),
        execution_options={"synchronize_session": False},
    ).scalar()
    if left is not None:
        return True, float(left)
    row = session.execute(select(ApiKey.rate_tokens, ApiKey.rate_at).where(ApiKey.id == key_id)).one_or_none()
    if row is None or row[0] is None:
        return False, 0.0
    tokens, at = float(row[0]), float(row[1] or now)
    return False, min(capacity, tokens + max(0.0, now - at) * refill)


def lock_key(session: Session, key_id: str) -> ApiKey | None:
    """A key's row, held until the transaction ends: submissions of one key check their quotas one at a time.
    (FOR NO KEY UPDATE: rows that merely reference the key, such as an upload being written, do not wait.)"""
    query = select(ApiKey).where(ApiKey.id == key_id).with_for_update(key_share=True)
    return session.scalar(query.execution_options(populate_existing=True))


def documents_used(key: ApiKey, today: date) -> int:
    """Documents the key submitted on `today` (UTC)."""
    return key.documents_used if key.documents_day == today else 0


def count_documents(session: Session, key: ApiKey, today: date, documents: int) -> int:
    """Add `documents` to the key's count of `today` (call with its row locked); returns the new count."""
    used = documents_used(key, today) + documents
    key.documents_day, key.documents_used = today, used
    session.flush()
    return used


def open_batches(session: Session, owner: str, statuses: Sequence[str]) -> int:
    """How many of `owner`'s API batches are in one of `statuses`."""
    query = select(func.count()).select_from(ApiBatch).where(ApiBatch.owner == owner, ApiBatch.status.in_(statuses))
    return session.scalar(query) or 0


# --- webhook deliveries -------------------------------------------------------------------------


def add_delivery(
    session: Session, *, api_batch_id: str, owner: str, url: str, event: str, payload: str
) -> WebhookDelivery:
    now = utcnow()
    delivery = WebhookDelivery(
        id=new_id("whd_"),
        api_batch_id=api_batch_id,
        owner=owner,
        url=url,
        event=event,
        payload=payload,
        state="pending",
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    session.add(delivery)
    session.flush()
    return delivery


def due_deliveries(session: Session, limit: int = 20) -> list[str]:
    """Ids of pending deliveries whose next attempt is due, oldest first."""
    return list(
        session.scalars(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= utcnow())
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(limit)
        )
    )


def claim_delivery(session: Session, delivery_id: str, hold_seconds: float) -> WebhookDelivery | None:
    """Take a due delivery for one attempt: count the attempt and hold it for `hold_seconds`.

    The conditional UPDATE lets one process win; a process that dies mid-attempt leaves the
    delivery pending, and it is tried again once the hold runs out (at least once).
    """
    now = utcnow()
    won = rowcount(
        session.execute(
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.state == "pending",
                WebhookDelivery.next_attempt_at <= now,
            )
            .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=now + timedelta(seconds=hold_seconds)),
            execution_options={"synchronize_session": False},
        )
    )
    if not won:
        return None
    return session.get(WebhookDelivery, delivery_id, populate_existing=True)


def record_attempt(
    session: Session,
    delivery_id: str,
    *,
    delivered: bool,
    status: int | None,
    error: str | None,
    retry_in: float | None,
) -> None:
    """After an attempt: delivered, pending again in `retry_in` seconds, or (retry_in None) failed for good."""
    now = utcnow()
    values: dict[str, Any] = {"last_status": status, "last_error": error}
    if delivered:
        values |= {"state": "delivered", "delivered_at": now}
    elif retry_in is not None:
        values |= {"state": "pending", "next_attempt_at": now + timedelta(seconds=retry_in)}
    else:
        values |= {"state": "failed"}
    session.execute(
        update(WebhookDelivery)
        .where(WebhookDelivery.id == delivery_id, WebhookDelivery.state == "pending")
        .values(**values),
        execution_options={"synchronize_session": False},
    )


def deliveries_for(session: Session, api_batch_id: str) -> list[WebhookDelivery]:
    return list(
        session.scalars(
            select(WebhookDelivery)
            .where(WebhookDelivery.api_batch_id == api_batch_id)
            .order_by(WebhookDelivery.created_at)
        )
    )
