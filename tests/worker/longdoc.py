"""Long test documents, written here (no corpus text): a made-up town's report, any length."""

from __future__ import annotations

import random

_TOWNS = ["Ardmoor", "Belcastle", "Corran", "Dunwich Vale", "Elmstead", "Fairhollow"]
_SUBJECTS = [
    ("the river crossing", "ferry", "passengers"),
    ("the public library", "reading room", "visitors"),
    ("the harbour wall", "repair crew", "tonnes of stone"),
    ("the school kitchens", "lunch service", "meals"),
    ("the night buses", "timetable", "riders"),
    ("the community orchard", "volunteer group", "trees"),
    ("the fire station", "rescue team", "call-outs"),
    ("the market square", "stall holders", "traders"),
]
_SENTENCES = [
    "In {month}, {subject} in {town} reported {n} {unit}, up from {m} a year before.",
    "The council said the {thing} would keep running through the winter if the budget allowed.",
    "Residents of {town} told the committee that {subject} mattered more to them than new roads.",
    "A survey of {n} households found that most people used {subject} at least once a month.",
    "Officials estimated that the {thing} cost {n} thousand pounds to run in {month}.",
    "The mayor of {town} promised a decision on {subject} before the end of {month}.",
    "Critics argued that the money for the {thing} should go to housing instead.",
    "Engineers inspected {subject} in {month} and found {n} faults that needed repair.",
    "The local paper in {town} printed {n} letters about the {thing} in a single week.",
    "A pilot scheme will test a cheaper version of the {thing} for {n} weeks.",
]
_MONTHS = ["January", "March", "April", "June", "August", "October", "November"]


def long_document(words: int = 5200, seed: int = 7) -> str:
    """Chapters of paragraphs of sentences, at least `words` words, deterministic for a seed."""
    rng = random.Random(seed)
    paragraphs: list[str] = []
    count = 0
    chapter = 0
    while count < words:
        chapter += 1
        subject, thing, unit = _SUBJECTS[chapter % len(_SUBJECTS)]
        town = _TOWNS[chapter % len(_TOWNS)]
        paragraphs.append(f"Chapter {chapter}: {subject} in {town}")
        for _ in range(3):
            sentences = []
            for _ in range(rng.randint(4, 7)):
                template = rng.choice(_SENTENCES)
                sentences.append(
                    template.format(
                        subject=subject,
                        thing=thing,
                        unit=unit,
                        town=town,
                        month=rng.choice(_MONTHS),
                        n=rng.randint(3, 900),
                        m=rng.randint(3, 900),
                    )
                )
            paragraph = " ".join(sentences)
            paragraphs.append(paragraph)
            count += len(paragraph.split())
    return "\n\n".join(paragraphs)
