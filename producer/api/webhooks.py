"""Completion webhooks: signing, verifying (for receivers), and delivering with retries.

When a batch with a callback URL ends, the API POSTs the batch object (JSON) to it with:

    Sumfleet-Event: batch.completed          (or batch.failed, batch.expired, batch.cancelled)
    Sumfleet-Delivery: whd_...               (the same on every retry of one delivery: dedupe on it)
    Sumfleet-Timestamp: 1767225600           (Unix seconds when this attempt was signed)
    Sumfleet-Signature: v1=<hex>             (HMAC-SHA256 of f"{timestamp}.{body}" with the key's webhook secret)

A receiver checks the signature over the raw body and rejects timestamps older than a few
minutes (replay protection): `verify_signature` does both. A delivery is retried with
exponential backoff until the receiver answers 2xx, and its state lives in the database, so
a restarted API process resumes it: delivered at least once.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

import httpx
from sqlalchemy.orm import Session, sessionmaker

from models import defaults
from models.api_store import claim_delivery, due_deliveries, record_attempt
from models.errors import SumfleetError
from models.settings import Settings
from producer.api.checks import private_address

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Sumfleet-Signature"
TIMESTAMP_HEADER = "Sumfleet-Timestamp"
EVENT_HEADER = "Sumfleet-Event"
DELIVERY_HEADER = "Sumfleet-Delivery"
SCHEME = "v1"  # the signature scheme: HMAC-SHA256 over "<timestamp>.<body>", hex


class InvalidSignature(SumfleetError):
    """Raised by `verify_signature` when a delivery's signature or timestamp does not check out."""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The `Sumfleet-Signature` value for `body` sent at `timestamp`."""
    mac = hmac.new(secret.encode("utf-8"), str(timestamp).encode("ascii") + b"." + body, hashlib.sha256)
    return f"{SCHEME}={mac.hexdigest()}"


def verify_signature(
    secret: str,
    body: bytes,
    timestamp: str | None,
    signature: str | None,
    *,
    tolerance: float = defaults.WEBHOOK_TOLERANCE,
    now: float | None = None,
) -> None:
    """Check a webhook delivery; raise `InvalidSignature` saying why unless it is genuine and fresh.

    `body` is the raw request body (bytes, before any JSON parsing), `timestamp` and `signature`
    the `Sumfleet-Timestamp` and `Sumfleet-Signature` headers, `secret` the `whsec_...` secret
    shown by `sumfleet keys create`. A timestamp more than `tolerance` seconds from `now`
    (default: the clock) is refused, so a captured delivery cannot be replayed later.

        from producer.api.webhooks import verify_signature
        verify_signature(SECRET, request.body, request.headers["Sumfleet-Timestamp"],
                         request.headers["Sumfleet-Signature"])
    """
    if not timestamp or not signature:
        raise InvalidSignature(f"missing {TIMESTAMP_HEADER} or {SIGNATURE_HEADER} header")
    try:
        sent = int(timestamp)
    except ValueError:
        raise InvalidSignature(f"{TIMESTAMP_HEADER} is not a Unix time: {timestamp!r}") from None
    current = time.time() if now is None else now
    if abs(current - sent) > tolerance:
        raise InvalidSignature(
            f"timestamp {sent} is {current - sent:+.0f}s from now; the tolerance is {tolerance:.0f}s"
        )
    expected = sign(secret, sent, body)
    offered = [part.strip() for part in signature.split(",") if part.strip().startswith(f"{SCHEME}=")]
    if not any(hmac.compare_digest(expected, candidate) for candidate in offered):
        raise InvalidSignature("signature does not match the body (wrong secret, or the body was changed)")


def headers_for(secret: str, body: bytes, event: str, delivery_id: str, timestamp: int | None = None) -> dict[str, str]:
    """The headers of one attempt, signed now."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "Content-Type": "application/json",
        "User-Agent": "sumfleet-webhooks/1",
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }


def backoff(settings: Settings, attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones: backoff x 2^(attempts-1), capped."""
    return min(settings.api_webhook_backoff * 2 ** max(attempts - 1, 0), defaults.WEBHOOK_MAX_DELAY)


def deliver_due(sessions: sessionmaker[Session], settings: Settings, http: httpx.Client) -> int:
    """One attempt for every due delivery this process can claim; returns how many were attempted."""
    from models.tables import ApiKey

    with sessions() as session:
        due = due_deliveries(session)
    attempted = 0
    hold = settings.api_webhook_timeout + 30  # another process may retry only after this attempt surely ended
    for delivery_id in due:
        with sessions.begin() as session:
            delivery = claim_delivery(session, delivery_id, hold)
            if delivery is None:
                continue  # another API process took it
            key = session.get(ApiKey, delivery.owner)
            secret = key.webhook_secret if key is not None else ""
            url, event, payload, attempts = delivery.url, delivery.event, delivery.payload, delivery.attempts
        attempted += 1
        body = payload.encode("utf-8")
        status: int | None = None
        error: str | None = None
        refused = None if settings.api_webhook_private else private_address(urlsplit(url).hostname or "")
        if refused is not None:  # the name resolves to a private address now: never sent, not retried
            error = f"refused: {url} resolves to the private or local address {refused} (SUMFLEET_API_WEBHOOK_PRIVATE)"
        else:
            try:
                response = http.post(url, content=body, headers=headers_for(secret, body, event, delivery_id))
                status = response.status_code
                if not 200 <= status < 300:
                    error = f"receiver answered {status}"
            except httpx.HTTPError as failure:
                error = f"{type(failure).__name__}: {failure}"
        delivered = error is None
        last_try = refused is not None or attempts >= settings.api_webhook_attempts
        retry_in = None if delivered or last_try else backoff(settings, attempts)
        with sessions.begin() as session:
            record_attempt(session, delivery_id, delivered=delivered, status=status, error=error, retry_in=retry_in)
        if delivered:
            log.info("webhook %s %s delivered to %s (attempt %d)", delivery_id, event, url, attempts)
        elif retry_in is None:
            log.warning("webhook %s %s to %s given up after %d attempts: %s", delivery_id, event, url, attempts, error)
        else:
            log.info("webhook %s %s to %s failed (%s); retry in %.1fs", delivery_id, event, url, error, retry_in)
    return attempted


def parse_headers(headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(timestamp, signature) from a mapping of request headers, whatever their case."""
    lowered = {k.lower(): v for k, v in headers.items()}
    return lowered.get(TIMESTAMP_HEADER.lower()), lowered.get(SIGNATURE_HEADER.lower())
