"""Length-aware packing of documents into generation batches (no torch here)."""

from __future__ import annotations

from collections.abc import Sequence


def plan_batches(lengths: Sequence[int], max_new_tokens: int, budget: int, max_batch: int) -> list[list[int]]:
    """Indices of `lengths` grouped into batches, shortest prompts first.

    A batch pads every prompt to its longest, and each row then grows by up to
    `max_new_tokens`, so a batch costs (longest + max_new_tokens) x size tokens; that
    stays within `budget` (a single over-long document still gets a batch of its own),
    and a batch holds at most `max_batch` documents.
    """
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        # sorted ascending, so the newcomer is the longest of the batch
        cost = (lengths[index] + max_new_tokens) * (len(current) + 1)
        if current and (cost > budget or len(current) >= max_batch):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches
