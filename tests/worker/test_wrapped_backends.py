"""What wraps a backend in a worker process (heartbeat progress, metrics) sees continuous batches:
`generate_stream` is wrapped like `generate`, with a backend that streams three one-row steps."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import REGISTRY

from models.metrics import meter_generation
from worker.heartbeat import Heartbeat, beat_on_generate


def test_every_step_of_a_continuous_batch_that_finishes_rows_is_progress() -> None:
    def stream(rows: list[int]) -> object:
        for row in rows:
            yield [(row, None)]

    engine = SimpleNamespace(backend=SimpleNamespace(generate=lambda rows: [], generate_stream=stream))
    heartbeat = Heartbeat(None, "me:1", lease_seconds=600, limit=3600)  # type: ignore[arg-type]
    beat_on_generate(engine, heartbeat)
    heartbeat.hold([1])
    steps = engine.backend.generate_stream([0, 1, 2])
    heartbeat._last_progress -= 100  # as if the last progress were long ago
    assert heartbeat.stalled_for() > 99
    assert next(steps) == [(0, None)]
    assert heartbeat.stalled_for() < 5  # a step that finished rows counts
    heartbeat._last_progress -= 100
    assert list(steps) == [[(1, None)], [(2, None)]] and heartbeat.stalled_for() < 5


def test_a_continuous_batch_is_metered_as_one_call_of_all_its_rows() -> None:
    def stream(rows: list[int]) -> object:
        for row in rows:
            yield [(row, None)]

    model = "metered-stream"
    engine = SimpleNamespace(
        backend=SimpleNamespace(generate=lambda rows: [], generate_stream=stream, is_out_of_memory=lambda e: False)
    )
    meter_generation(engine, model)

    def sample(name: str) -> float:
        return REGISTRY.get_sample_value(name, {"model": model}) or 0.0

    assert list(engine.backend.generate_stream([0, 1, 2])) == [[(0, None)], [(1, None)], [(2, None)]]
    assert sample("sumfleet_generate_seconds_count") == 1
    assert sample("sumfleet_generate_batch_size_count") == 1 and sample("sumfleet_generate_batch_size_sum") == 3
