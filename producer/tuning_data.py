"""Training and held-out pairs for `sumfleet tune`: documents with their reference summaries, read
by the same readers as `submit`; a row without a usable reference is a bad row, named by line."""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from models.errors import InputError, RowProblem
from producer.inputs import read_documents

SHOWN = 10  # bad rows named in the error before "and N more"


def examples_from(
    path: str, reference_field: str, text_field: str | None, max_chars: int, limit: int | None = None
) -> list[tuple[str, str]]:
    """(document, reference) pairs of `path`, every row checked; bad rows refuse the whole input."""
    problems: list[RowProblem] = []
    pairs: list[tuple[str, str]] = []
    for document in read_documents(path, problems, text_field=text_field, max_chars=max_chars):
        reference = document.meta.get(reference_field)
        if not isinstance(reference, str) or not reference.strip():
            what = "has no" if reference is None else "has an empty or non-string"
            problems.append(RowProblem(document.source, document.line, f'{what} reference field "{reference_field}"'))
            continue
        pairs.append((document.text, reference))
        if limit is not None and len(pairs) >= limit:
            break
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:SHOWN])
        more = f"\n  ... and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
        raise InputError(f"{path}: {len(problems)} bad training row(s); nothing was tuned:\n{listed}{more}", problems)
    if not pairs:
        raise InputError(f"{path}: no training pairs (documents with a {reference_field!r} reference)")
    return pairs


def split_heldout(
    pairs: list[tuple[str, str]], fraction: float, seed: int
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out): a `fraction` of the pairs held out, chosen by `seed`, the order kept."""
    if not 0 < fraction < 1:
        raise InputError(f"--eval-fraction must be between 0 and 1, got {fraction}")
    chosen = set(random.Random(seed).sample(range(len(pairs)), max(1, round(len(pairs) * fraction))))
    return [p for i, p in enumerate(pairs) if i not in chosen], [p for i, p in enumerate(pairs) if i in chosen]


def describe_scores(scores: dict[str, Any]) -> str:
    """The held-out table (zero-shot, adapter, Lead-3) and the verdict on ROUGE-2, in words."""
    rows = [f"held-out ROUGE F1 in % on {scores['n']} documents: mean [95% bootstrap interval]"]
    for label, key in (("zero-shot prompt", "zero_shot"), ("adapter", "adapter"), ("Lead-3", "lead3")):
        cells = "  ".join(
            f"{rouge} {100 * s['mid']:.2f} [{100 * s['low']:.2f}, {100 * s['high']:.2f}]"
            for rouge, s in scores[key].items()
        )
        rows.append(f"  {label:<17} {cells}")
    tuned, zero = scores["adapter"]["rouge2"], scores["zero_shot"]["rouge2"]
    if tuned["low"] > zero["high"]:
        rows.append("the adapter beats the zero-shot prompt on ROUGE-2: the 95% intervals do not overlap")
    elif tuned["mid"] > zero["mid"]:
        rows.append("the adapter scores higher on ROUGE-2 than the zero-shot prompt, but the 95% intervals overlap")
    else:
        rows.append("the adapter does NOT beat the zero-shot prompt on ROUGE-2")
    return "\n".join(rows)


@contextmanager
def tqdm_bar() -> Iterator[Callable[[int, int, float], None]]:
    """A progress bar on stderr (steps, loss, ETA) and the callback that moves it."""
    from tqdm import tqdm

    with tqdm(unit="step", file=sys.stderr, dynamic_ncols=True) as bar:

        def progress(step: int, total: int, loss: float) -> None:
            bar.total = total
            bar.n = step
            bar.set_postfix(loss=f"{loss:.3f}")
            bar.refresh()

        yield progress
