"""Completion webhooks: signing, verifying (for receivers), and delivering with retries.

When a batch with a callback URL ends, the API POSTs the batch object (JSON) to it, signed two
ways. The Standard Webhooks headers (https://www.standardwebhooks.com/, what OpenAI's own
webhooks send, so `openai.OpenAI().webhooks.unwrap(body, headers, secret=...)` and any Standard
Webhooks library verify them):

    webhook-id: whd_...                      (the delivery: the same on every retry, dedupe on it)
    webhook-timestamp: 1767225600            (Unix seconds when this attempt was signed)
    webhook-signature: v1,<base64>           (HMAC-SHA256 of f"{id}.{timestamp}.{body}", keyed with the
                                              bytes the key's `whsec_<base64>` secret encodes)

and sumfleet's own, kept for one more release (deprecated):

    Sumfleet-Event: batch.completed          (or batch.failed, batch.expired, batch.cancelled)
    Sumfleet-Delivery: whd_...               (the webhook-id)
    Sumfleet-Timestamp: 1767225600           (the webhook-timestamp)
    Sumfleet-Signature: v1=<hex>             (HMAC-SHA256 of f"{timestamp}.{body}" keyed with the secret's text)

A receiver checks the signature over the raw body and rejects timestamps older than a few
minutes (replay protection): `verify_signature` does both for the Sumfleet-* headers. Secrets
made before sumfleet wrote them as standard base64 are URL-safe base64; `standard_secret` gives
the `whsec_<base64>` form of such a secret that Standard Webhooks libraries take.

A delivery is retried with exponential backoff until the receiver answers 2xx, and its state
lives in the database, so a restarted API process resumes it: delivered at least once. Each
attempt resolves the URL's host once, refuses it if any address is not public (unless
SUMFLEET_API_WEBHOOK_PRIVATE), and connects to exactly an address it checked (`PinnedTransport`;
the URL's host still goes in the Host header and in TLS's SNI and certificate check), so a name
that resolves to a public address and then to a private one cannot redirect the signed POST.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import ssl
import time
import typing
from collections.abc import Mapping
from urllib.parse import urlsplit

import httpcore
import httpx
from sqlalchemy.orm import Session, sessionmaker

from models import defaults
from models.api_store import claim_delivery, due_deliveries, record_attempt
from models.errors import SumfleetError
from models.settings import Settings
from producer.api.checks import Resolver, first_private, resolve_host

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Sumfleet-Signature"
TIMESTAMP_HEADER = "Sumfleet-Timestamp"
EVENT_HEADER = "Sumfleet-Event"
DELIVERY_HEADER = "Sumfleet-Delivery"
SCHEME = "v1"  # the signature scheme: HMAC-SHA256 over "<timestamp>.<body>", hex

# Standard Webhooks (https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md)
STANDARD_ID_HEADER = "webhook-id"
STANDARD_TIMESTAMP_HEADER = "webhook-timestamp"
STANDARD_SIGNATURE_HEADER = "webhook-signature"
SECRET_PREFIX = "whsec_"


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


def standard_key(secret: str) -> bytes:
    """The HMAC key of the Standard Webhooks signature: the bytes a `whsec_<base64>` secret encodes.

    Standard base64 as the spec has it; a secret in URL-safe base64 (`-`, `_`, no padding: how
    keys made before wrote it) stands for the bytes it encodes too. Any other secret is used
    as its UTF-8 text (as Standard Webhooks libraries do with a secret without the prefix).
    """
    if not secret.startswith(SECRET_PREFIX):
        return secret.encode("utf-8")
    encoded = secret[len(SECRET_PREFIX) :]
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        pass
    try:
        return base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return secret.encode("utf-8")


def standard_secret(secret: str) -> str:
    """The `whsec_<standard base64>` form of a key's webhook secret, for Standard Webhooks libraries
    and OpenAI's `client.webhooks.unwrap(..., secret=...)` (the same text for a secret already in it)."""
    if not secret.startswith(SECRET_PREFIX):
        return secret
    return SECRET_PREFIX + base64.b64encode(standard_key(secret)).decode("ascii")


def sign_standard(secret: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` value (Standard Webhooks, `v1,<base64>`) for `body` of delivery
    `message_id` sent at `timestamp`."""
    signed = f"{message_id}.{timestamp}.".encode() + body
    mac = hmac.new(standard_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode("ascii")


def headers_for(secret: str, body: bytes, event: str, delivery_id: str, timestamp: int | None = None) -> dict[str, str]:
    """The headers of one attempt, signed now (both Standard Webhooks and the Sumfleet-* headers)."""
    timestamp = int(time.time()) if timestamp is None else timestamp
    return {
        "Content-Type": "application/json",
        "User-Agent": "sumfleet-webhooks/1",
        STANDARD_ID_HEADER: delivery_id,
        STANDARD_TIMESTAMP_HEADER: str(timestamp),
        STANDARD_SIGNATURE_HEADER: sign_standard(secret, delivery_id, timestamp, body),
        EVENT_HEADER: event,
        DELIVERY_HEADER: delivery_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: sign(secret, timestamp, body),
    }


# --- sending to a checked address -----------------------------------------------------------------


class _PinnedBackend(httpcore.NetworkBackend):
    """Opens every TCP connection to `address`, whatever host name it is asked for."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._system = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        return self._system.connect_tcp(
            self.address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
        )

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("webhooks are not sent over Unix sockets")

    def sleep(self, seconds: float) -> None:
        self._system.sleep(seconds)


class PinnedTransport(httpx.HTTPTransport):
    """An httpx transport that connects to `address` (an IP address, resolved and checked before)
    and nowhere else: no name resolution of its own, no proxy from the environment. The request's
    URL still makes the Host header, and over https the TLS server name (SNI) and the host name
    the certificate is verified against."""

    def __init__(self, address: str, *, verify: ssl.SSLContext | bool = True) -> None:
        context = (
            verify if isinstance(verify, ssl.SSLContext) else httpx.create_ssl_context(verify=verify, trust_env=False)
        )
        super().__init__(verify=context, trust_env=False)
        self.address = address
        self._pool = httpcore.ConnectionPool(
            ssl_context=context, max_connections=1, network_backend=_PinnedBackend(address)
        )


def post_pinned(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    address: str,
    *,
    timeout: float | httpx.Timeout,
    verify: ssl.SSLContext | bool = True,
) -> int:
    """POST `body` to `url` over a connection to `address` only; the status the receiver answered
    (its body is not read). Raises `httpx.HTTPError` when that fails."""
    transport = PinnedTransport(address, verify=verify)
    with (
        httpx.Client(transport=transport, timeout=timeout, follow_redirects=False, trust_env=False) as client,
        client.stream("POST", url, content=body, headers=dict(headers)) as response,
    ):
        return response.status_code


class Attempt(typing.NamedTuple):
    status: int | None  # the receiver's answer, None when none came
    error: str | None  # None when delivered (2xx)
    final: bool  # refused for good: not to be retried


def attempt_delivery(
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    allow_private: bool,
    timeout: float,
    resolve: Resolver = resolve_host,
    verify: ssl.SSLContext | bool = True,
) -> Attempt:
    """One attempt: resolve the URL's host once, refuse it if any address is private (unless
    `allow_private`), POST over a connection to a checked address (the next one when an address
    does not connect, within `timeout` for all connecting)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = resolve(host, port)
    except (OSError, ValueError) as failure:  # the name may resolve again later: retried
        return Attempt(None, f"cannot resolve {host!r}: {getattr(failure, 'strerror', None) or failure}", False)
    if not allow_private and (refused := first_private(addresses)) is not None:
        return Attempt(
            None,
            f"refused: {url} resolves to the private or local address {refused} (SUMFLEET_API_WEBHOOK_PRIVATE)",
            True,
        )
    deadline = time.monotonic() + timeout
    error = f"cannot resolve {host!r}: no address"
    for address in addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            status = post_pinned(
                url, body, headers, address, timeout=httpx.Timeout(timeout, connect=left), verify=verify
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as failure:  # nothing was sent: try the next address
            error = f"{type(failure).__name__}: {failure} (at {address})"
            continue
        except httpx.HTTPError as failure:
            return Attempt(None, f"{type(failure).__name__}: {failure} (at {address})", False)
        return Attempt(status, None if 200 <= status < 300 else f"receiver answered {status}", False)
    return Attempt(None, error, False)


def backoff(settings: Settings, attempts: int) -> float:
    """Seconds before the next try after `attempts` failed ones: backoff x 2^(attempts-1), capped."""
    return min(settings.api_webhook_backoff * 2 ** max(attempts - 1, 0), defaults.WEBHOOK_MAX_DELAY)


def deliver_due(
    sessions: sessionmaker[Session],
    settings: Settings,
    *,
    resolve: Resolver = resolve_host,
) -> int:
    """One attempt for every due delivery this process can claim; returns how many were attempted.

    Each attempt connects through a client of its own pinned to the address it checked
    (`attempt_delivery`). `resolve` is how host names are resolved (the system resolver).
    """
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
        status, error, final = attempt_delivery(
            url,
            body,
            headers_for(secret, body, event, delivery_id),
            allow_private=settings.api_webhook_private,
            timeout=settings.api_webhook_timeout,
            resolve=resolve,
        )
        context = {"delivery_id": delivery_id}
        delivered = error is None
        last_try = final or attempts >= settings.api_webhook_attempts
        retry_in = None if delivered or last_try else backoff(settings, attempts)
        with sessions.begin() as session:
            record_attempt(session, delivery_id, delivered=delivered, status=status, error=error, retry_in=retry_in)
        if delivered:
            log.info("webhook %s %s delivered to %s (attempt %d)", delivery_id, event, url, attempts, extra=context)
        elif retry_in is None:
            log.warning(
                "webhook %s %s to %s given up after %d attempts: %s",
                delivery_id,
                event,
                url,
                attempts,
                error,
                extra=context,
            )
        else:
            log.info(
                "webhook %s %s to %s failed (%s); retry in %.1fs",
                delivery_id,
                event,
                url,
                error,
                retry_in,
                extra=context,
            )
    return attempted


def parse_headers(headers: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(timestamp, signature) from a mapping of request headers, whatever their case."""
    lowered = {k.lower(): v for k, v in headers.items()}
    return lowered.get(TIMESTAMP_HEADER.lower()), lowered.get(SIGNATURE_HEADER.lower())
