"""`Client.wait`: returns a batch that has ended, and raises, naming the batch and its counts, when
the timeout passes first (it never hands back an unfinished batch as if it were done)."""

from __future__ import annotations

import time

import pytest

from models.errors import SumfleetError, WaitTimeout
from models.settings import Settings
from models.states import JobState
from models.store import iter_job_id_chunks
from producer.client import Client
from worker.chunk import ChunkProcessor
from worker.lead import LeadEngine


def test_wait_raises_on_timeout_and_returns_an_ended_batch(sqlite_settings: Settings) -> None:
    client = Client(sqlite_settings)
    batch_id = client.submit(["One. Two.", "Three. Four.", "Five. Six."], model="lead", publish=False).batch_id
    started = time.monotonic()
    with pytest.raises(WaitTimeout) as caught:
        client.wait(batch_id, timeout=0.5, poll=0.1)
    assert time.monotonic() - started < 5
    error = caught.value
    assert isinstance(error, TimeoutError) and isinstance(error, SumfleetError)
    assert str(error).startswith(f"batch {batch_id} has not ended after 0.5s: queued, 0/3 done (queued 3)")
    assert error.batch_id == batch_id and error.status.counts == {"queued": 3}  # type: ignore[attr-defined]

    ids = [i for chunk in iter_job_id_chunks(client.sessions, batch_id, 100, [JobState.QUEUED]) for i in chunk]
    ChunkProcessor(client.sessions, LeadEngine("lead", 3), "w").process(batch_id, ids)
    status = client.wait(batch_id, timeout=5, poll=0.1)
    assert status.done and status.counts == {"succeeded": 3}
    client.close()
