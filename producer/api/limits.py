"""Per-key limits: requests per minute, documents per day, batches in flight; 429 with `Retry-After`.

Each limit is the key's own (`sumfleet keys create --requests-per-minute N ...`) or else the
server's setting (SUMFLEET_API_RATE_LIMIT_PER_MINUTE, ..._DOCUMENTS_PER_DAY, ..._BATCHES_IN_FLIGHT);
0 or unset is unlimited, and an unlimited limit costs nothing per request.

- **Requests per minute**: a token bucket per key (the limit is its size, refilled evenly over a
  minute), kept on the key's row in the database and taken with one conditional UPDATE, so every
  API process shares it exactly. The database rather than Redis: it is the one store every API
  process already uses on every request (the key lookup), it is the source of truth, and the
  broker need not be Redis. Answers carry OpenAI's `x-ratelimit-limit-requests`,
  `x-ratelimit-remaining-requests` and `x-ratelimit-reset-requests`; a refusal is 429
  `rate_limit_exceeded` with `Retry-After`, checked before the request's body is read.
- **Documents per day** (UTC): counted when a batch is submitted, in the transaction that writes
  it (documents of a native batch, runnable requests of an OpenAI batch); a batch that would pass
  the quota is refused whole: 429 `documents_per_day_exceeded`, naming the quota, the count used
  and when it resets (`Retry-After`: until then).
- **Batches in flight**: a key's batches validating, running, finishing or cancelling; one more
  is refused with 429 `batches_in_flight_exceeded`.

The key's row is locked while a submission checks its quotas, so submissions of one key through
any number of API processes are counted one at a time.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as clock

from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from models.api_store import count_documents, documents_used, lock_key, open_batches, take_request
from models.settings import Settings
from models.store import utcnow
from models.tables import ApiKey
from producer.api.errors import ApiError

IN_FLIGHT = ("validating", "in_progress", "finalizing", "cancelling")  # statuses a batch holds a slot in
IN_FLIGHT_RETRY = 60  # seconds: the `Retry-After` hint when a key has too many batches in flight


def effective(own: int | None, server: int | None) -> int | None:
    """The limit in force: the key's own, or else the server's; None when unlimited (0 or unset)."""
    value = own if own is not None else server
    return value or None


def _duration(seconds: float) -> str:
    """OpenAI's form of a reset time: `250ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest, 3):g}s"


@dataclass(frozen=True, slots=True)
class RateDecision:
    """One request counted against a key's requests-per-minute bucket."""

    key_id: str
    limit: int
    allowed: bool
    level: float  # tokens left after the request (allowed), or now (refused)

    @property
    def retry_after(self) -> int:
        """Whole seconds until the bucket holds a token again (at least 1)."""
        return max(1, math.ceil((1.0 - self.level) * 60.0 / self.limit))

    def headers(self) -> dict[str, str]:
        reset = max(0.0, (self.limit - self.level) * 60.0 / self.limit)  # until the bucket is full again
        found = {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(max(0, math.floor(self.level))),
            "x-ratelimit-reset-requests": _duration(reset),
        }
        if not self.allowed:
            found["Retry-After"] = str(self.retry_after)
        return found

    def refusal(self) -> ApiError:
        return ApiError(
            429,
            f"rate limit reached for API key {self.key_id} on requests per minute: limit {self.limit}, "
            f"used {self.limit}, requested 1; try again in {self.retry_after}s",
            type="requests",
            code="rate_limit_exceeded",
            headers=self.headers(),
        )


class RequestLimiter:
    """Counts each authenticated request against its key's requests-per-minute limit."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings

    def take(self, key: ApiKey) -> RateDecision | None:
        """Count one request of `key`; None when the key has no limit (nothing is written)."""
        limit = effective(key.rate_limit_per_minute, self.settings.api_rate_limit_per_minute)
        if limit is None:
            return None
        with self.sessions.begin() as session:
            if session.get_bind().dialect.name == "postgresql":
                # a count lost in a crash only lets a few requests more through: no need to wait for the disk
                session.execute(text("SET LOCAL synchronous_commit = off"))
            allowed, level = take_request(session, key.id, limit, time.time())
        return RateDecision(key.id, limit, allowed, level)


def _next_day(today: date) -> datetime:
    return datetime.combine(today + timedelta(days=1), clock(0), tzinfo=UTC)


def _documents_refusal(key_id: str, limit: int, used: int, documents: int | None, now: datetime) -> ApiError:
    resets = _next_day(now.date())
    wait = max(1, math.ceil((resets - now).total_seconds()))
    asked = "" if documents is None else f"this batch has {documents:,} document(s), and "
    whole = (
        f"; the batch alone is over the daily quota of {limit:,}: split it"
        if documents is not None and documents > limit
        else ""
    )
    return ApiError(
        429,
        f"documents-per-day quota exceeded for API key {key_id}: {asked}{used:,} of the {limit:,} documents a day "
        f"are used today (UTC); the quota resets at {resets.isoformat().replace('+00:00', 'Z')} "
        f"(in {wait:,} s){whole}",
        type="insufficient_quota",
        code="documents_per_day_exceeded",
        headers={"Retry-After": str(wait)},
    )


def _in_flight_refusal(key_id: str, limit: int, count: int) -> ApiError:
    return ApiError(
        429,
        f"batches-in-flight limit reached for API key {key_id}: {count} of {limit} batches are validating, "
        "running or finishing; create another once one has ended",
        type="insufficient_quota",
        code="batches_in_flight_exceeded",
        headers={"Retry-After": str(IN_FLIGHT_RETRY)},
    )


def admit(session: Session, key_id: str, settings: Settings, *, documents: int, new_batch: bool) -> None:
    """In the transaction that creates a batch of `key_id`: lock the key, refuse (429, `ApiError`) a batch
    over its batches in flight (`new_batch`) or its documents per day, and count `documents` for today."""
    known = session.get(ApiKey, key_id)
    if known is None:
        return
    in_flight = effective(known.batches_in_flight, settings.api_batches_in_flight) if new_batch else None
    if in_flight is None and effective(known.documents_per_day, settings.api_documents_per_day) is None:
        return  # nothing to count: no lock taken
    key = lock_key(session, key_id)
    if key is None:
        return
    if new_batch and (in_flight := effective(key.batches_in_flight, settings.api_batches_in_flight)) is not None:
        count = open_batches(session, key_id, IN_FLIGHT)
        if count >= in_flight:
            raise _in_flight_refusal(key_id, in_flight, count)
    per_day = effective(key.documents_per_day, settings.api_documents_per_day)
    if per_day is None or documents <= 0:
        return
    now = utcnow()
    used = documents_used(key, now.date())
    if used + documents > per_day:
        raise _documents_refusal(key_id, per_day, used, documents, now)
    count_documents(session, key, now.date(), documents)


def precheck(sessions: sessionmaker[Session], key_id: str, settings: Settings, *, documents: int | None) -> None:
    """Before the work of a new batch: 429 when it could not be admitted anyway (too many in flight,
    the day's documents used up, or `documents` more than are left). `admit` decides for good."""
    with sessions() as session:
        key = session.get(ApiKey, key_id)
        if key is None:
            return
        in_flight = effective(key.batches_in_flight, settings.api_batches_in_flight)
        if in_flight is not None and (count := open_batches(session, key_id, IN_FLIGHT)) >= in_flight:
            raise _in_flight_refusal(key_id, in_flight, count)
        per_day = effective(key.documents_per_day, settings.api_documents_per_day)
        if per_day is None:
            return
        now = utcnow()
        used = documents_used(key, now.date())
        if used + (documents or 1) > per_day:
            raise _documents_refusal(key_id, per_day, used, documents, now)
