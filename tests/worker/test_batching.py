"""Length-aware packing (`worker.batching`), as the pipeline uses it: shortest rows first, one batch at a time."""

from __future__ import annotations

from worker.batching import batch_cost, take_batch


def _packed(lengths: list[int], max_new_tokens: int, budget: int, max_batch: int) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    ordered = [lengths[i] for i in order]
    batches, start = [], 0
    while start < len(order):
        end = take_batch(ordered, start, max_new_tokens, budget, max_batch)
        batches.append(order[start:end])
        start = end
    return batches


def test_batches_respect_the_budget() -> None:
    lengths = [50, 10, 30, 10, 100, 20]
    plan = _packed(lengths, max_new_tokens=10, budget=100, max_batch=8)
    assert [i for batch in plan for i in batch] == [1, 3, 5, 2, 0, 4]
    for batch in plan:
        assert batch_cost(max(lengths[i] for i in batch), 10, len(batch)) <= 100 or len(batch) == 1
    assert plan == [[1, 3, 5], [2], [0], [4]]


def test_batches_are_capped_and_an_oversize_row_gets_a_batch_of_its_own() -> None:
    assert _packed([5] * 7, max_new_tokens=5, budget=10_000, max_batch=3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert _packed([500], max_new_tokens=64, budget=100, max_batch=4) == [[0]]
    assert _packed([], 8, 100, 4) == []


def test_a_backend_that_gives_rows_cells_in_blocks_is_packed_by_the_blocks() -> None:
    # 220 prompt + 48 new tokens = 268 cells: unaligned 3 such rows fit 1024; in blocks of 256 a row takes 512
    assert batch_cost(220, 48, 3) == 804 and batch_cost(220, 48, 3, align=256) == 1536
    assert batch_cost(200, 48, 4, align=256) == 1024  # 248 fits one block
    assert take_batch([220] * 6, 0, 48, 1024, 8) == 3
    assert take_batch([220] * 6, 0, 48, 1024, 8, align=256) == 2
    assert take_batch([200] * 6, 0, 48, 1024, 8, align=256) == 4
