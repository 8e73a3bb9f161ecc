"""Putting chunk messages on the broker: job ids only, never document text (claim-check)."""

from __future__ import annotations

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from sqlalchemy.orm import Session, sessionmaker

from models import defaults
from models.errors import BrokerError
from models.states import JobState
from models.store import get_batch, iter_claimable_chunks, iter_job_id_chunks, mark_published


def check_broker(app: Celery) -> None:
    """Fail fast, with the URL in the message, when the broker does not answer."""
    url = app.conf.broker_url
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0.5, timeout=5)
    except Exception as error:  # kombu wraps socket errors in several types
        safe = _hide_password(url)
        raise BrokerError(f"cannot reach the broker at {safe}: {error} (set SUMFLEET_BROKER_URL)") from None


def publish_batch(
    app: Celery,
    sessions: sessionmaker[Session],
    batch_id: str,
    chunk_size: int,
    only_expired: bool = False,
) -> int:
    """Publish the batch's claimable jobs (queued, or running on an expired lease) as chunk messages.

    `only_expired` publishes just the running jobs whose worker died. Returns the chunk count.
    """
    chunks = 0
    with sessions.begin() as session:
        queue = get_batch(session, batch_id).queue
        if not only_expired:
            mark_published(session, batch_id)
    ids = (
        iter_job_id_chunks(sessions, batch_id, chunk_size, (JobState.RUNNING,), expired_only=True)
        if only_expired
        else iter_claimable_chunks(sessions, batch_id, chunk_size)
    )
    try:
        with app.producer_or_acquire() as producer:
            for job_ids in ids:
                app.send_task(defaults.TASK_NAME, args=[batch_id, job_ids], queue=queue, producer=producer)
                chunks += 1
    except KombuOperationalError as error:
        raise BrokerError(
            f"lost the broker after publishing {chunks} chunk(s) of batch {batch_id}: {error}; "
            f"the batch is saved, run `sumfleet requeue {batch_id}` when the broker is back"
        ) from None
    return chunks


def _hide_password(url: str) -> str:
    from kombu.utils.url import maybe_sanitize_url

    return maybe_sanitize_url(url)
