"""Length-aware packing of documents into generation batches (no torch here)."""

from __future__ import annotations

from collections.abc import Sequence


def batch_cost(longest: int, max_new_tokens: int, size: int, align: int = 1) -> int:
    """Tokens a batch occupies: every row padded to the longest prompt, then grown by max_new_tokens,
    then rounded up to a multiple of `align` (a backend whose KV cache gives each row cells in blocks)."""
    return -(-(longest + max_new_tokens) // align) * align * size


def take_batch(
    sorted_lengths: Sequence[int], start: int, max_new_tokens: int, budget: int, max_batch: int, align: int = 1
) -> int:
    """End index of the batch that starts at `start` in ascending `sorted_lengths`.

    The batch stays within `budget` and `max_batch` documents; a single document over the
    budget still gets a batch of its own.
    """
    end = start + 1
    while (
        end < len(sorted_lengths)
        and end - start < max_batch
        and batch_cost(sorted_lengths[end], max_new_tokens, end - start + 1, align) <= budget
    ):
        end += 1
    return end
