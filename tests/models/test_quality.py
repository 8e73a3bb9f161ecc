"""The quality checks on generated text (models/quality.py) and sentence trimming (models/text.py):
pure functions, each threshold checked on both of its sides."""

from __future__ import annotations

import pytest

from models.prompts import TEMPLATES, PromptPlan
from models.quality import (
    WARNINGS,
    is_echo,
    is_empty,
    is_repetitive,
    longest_shared_run,
    tokens,
    warnings_for,
)
from models.text import ends_sentence, trim_to_sentence

INSTRUCTIONS = PromptPlan(TEMPLATES["one-sentence"]).render(TEMPLATES["one-sentence"]["en"], "", "en")
DOCUMENT = (
    "The city council voted on Tuesday to restore the night ferry between the old harbour and the island "
    "villages. The service was cut three years ago to save money, leaving island workers without a way home."
)


# -- trimming to a sentence ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, trimmed",
    [
        ("The council voted. It will run every", "The council voted."),
        ("The ferry returns! Islanders cheered and", "The ferry returns!"),
        ('He said "it is back." Then the', 'He said "it is back."'),
        ("The ferry returns. (It is the old one.) It", "The ferry returns. (It is the old one.)"),
        ("The ferry (the old one.) It", None),  # one sentence to the splitter (pysbd): no cut inside it
        ("Born in 1990. Then he", "Born in 1990."),
        ("It cost $3.5 million. The", "It cost $3.5 million."),
        ("He met Dr. Smith. She", "He met Dr. Smith."),  # "Dr." ends no sentence
        ("1. The ferry returns. 2. The", "1. The ferry returns."),  # nor does a list number
        ("- The ferry returns.\n2. Islanders", "- The ferry returns."),
        ("今天下雨。我们在", "今天下雨。"),
        ("他说：“回来了。”然后", "他说：“回来了。”"),
        ("The council voted.  ", "The council voted."),  # already complete: unchanged but for spaces
        ("The council voted on Tuesday to", None),  # no complete sentence
        ("Mr. Smith said the", None),
        ("The U.S. economy grew", None),
        ("", None),
    ],
)
def test_trim_to_sentence(text: str, trimmed: str | None) -> None:
    assert trim_to_sentence(text) == trimmed
    if trimmed is not None:
        assert ends_sentence(trimmed)


def test_ends_sentence() -> None:
    assert ends_sentence("The council voted.") and ends_sentence("Really?!  ") and ends_sentence("下雨了。")
    assert ends_sentence('He said "yes."') and ends_sentence("It was big...")
    assert not ends_sentence("The council voted") and not ends_sentence("He met Mr.")
    assert not ends_sentence("Items: 1.") and not ends_sentence("")


# -- tokens and runs -------------------------------------------------------------------------------


def test_tokens_are_words_and_cjk_characters() -> None:
    assert tokens("Hello, World! 42 times") == ["hello", "world", "42", "times"]
    assert tokens("GDP增长５%，ok") == ["gdp", "增", "长", "5", "ok"]
    assert tokens("...!") == []


def test_longest_shared_run() -> None:
    assert longest_shared_run(["a", "b", "c", "d", "e"], ["x", "b", "c", "d", "y"]) == 3
    assert longest_shared_run(["a", "b", "a", "b", "c"], ["b", "a", "b", "c"]) == 4
    assert longest_shared_run(["a"], ["b"]) == 0 and longest_shared_run([], ["a"]) == 0


# -- the detectors ---------------------------------------------------------------------------------


def test_empty() -> None:
    assert is_empty(None) and is_empty("") and is_empty("  ") and is_empty("... !")
    assert not is_empty("ok") and not is_empty("3") and not is_empty("好")


def test_echo_of_the_instructions() -> None:
    # "Summarize the following article in one sentence" is 7 tokens: a run of 60% of it, 5 tokens, echoes it
    assert tokens(INSTRUCTIONS) == ["summarize", "the", "following", "article", "in", "one", "sentence"]
    assert is_echo("Summarize the following article in one sentence: the ferry.", INSTRUCTIONS)
    assert is_echo("Sure! The following article in one line says the ferry returns.", INSTRUCTIONS)  # 5 tokens
    assert not is_echo("The following article in brief: the ferry returns.", INSTRUCTIONS)  # 4 tokens
    # Chinese instructions are scored on characters: 请将以下文章简化为一句话 is 12, so 8 in a row echo it
    zh = PromptPlan(TEMPLATES["one-sentence"]).render(TEMPLATES["one-sentence"]["zh"], "", "zh")
    assert is_echo("以下文章简化为一句话：轮渡恢复了。", zh)
    assert not is_echo("以下文章说轮渡恢复了。", zh)
    # instructions under 3 tokens (the tldr template's "TL;DR:") are not checked
    assert not is_echo("TL;DR the ferry is back", "\n\nTL;DR:")


def test_echo_of_the_documents_opening() -> None:
    opening = "The city council voted on Tuesday to restore the night ferry between the old harbour"
    assert is_echo(opening + ".", document=DOCUMENT)  # 15 tokens, all from the opening
    # 12 copied tokens that are at least half of the output: an echo; 11, or under half, is not
    copied = "The city council voted on Tuesday to restore the night ferry between"
    assert is_echo(copied + " and islanders are glad of it now.", document=DOCUMENT)  # 12 of 19 tokens
    twelve_more = " so islanders working late shifts can get home again after a wait."
    assert is_echo(copied + twelve_more, document=DOCUMENT)  # 12 of 24: half
    assert not is_echo(copied + twelve_more + " Good.", document=DOCUMENT)  # 12 of 25
    assert not is_echo("The city council voted on Tuesday to restore the night ferry.", document=DOCUMENT)  # 11
    # only the opening counts: a copy from beyond the document's first 256 tokens is a quote, not an echo
    long_document = " ".join(f"word{i}" for i in range(300)) + " " + opening
    assert not is_echo(opening, document=long_document)
    assert is_echo(opening, document=opening + " " + long_document)


def test_repetition() -> None:
    assert is_repetitive("the ferry said that the ferry said that the ferry said that")  # a 4-gram 3 times
    assert is_repetitive("no no no no no no")  # one word 6 times in a row: "no no no no" 3 times
    assert not is_repetitive("no no no no no")  # 5 times: "no no no no" twice only
    assert is_repetitive("The ferry is back on Tuesday. The ferry is back on Tuesday.")  # a sentence twice
    assert not is_repetitive("The ferry is back. The ferry is back.")  # a sentence of 4 tokens twice
    assert not is_repetitive("The ferry between the harbour and the villages runs again from March.")
    assert is_repetitive("轮渡恢复了轮渡恢复了轮渡恢复了")  # characters: 轮渡恢复 3 times
    assert not is_repetitive(DOCUMENT)


def test_warnings_for() -> None:
    assert warnings_for("The ferry is back.", instructions=INSTRUCTIONS, document=DOCUMENT) == []
    assert warnings_for("", finish_reason="length") == ["empty"] == warnings_for(None)
    assert warnings_for("The ferry is back. It runs", finish_reason="length") == ["truncated"]
    assert warnings_for("The ferry is back. It runs", finish_reason="stop") == []
    assert warnings_for("The ferry is back.", finish_reason="length") == []  # the limit fell on a sentence end
    looped = "Summarize the following article in one sentence. " * 3
    found = warnings_for(looped.strip(), instructions=INSTRUCTIONS, document=DOCUMENT, finish_reason="length")
    assert found == ["echo", "repetition"]  # in WARNINGS order
    assert warnings_for(looped + "Summarize the", instructions=INSTRUCTIONS, finish_reason="length") == [
        "echo",
        "repetition",
        "truncated",
    ]
    assert WARNINGS == ("empty", "echo", "repetition", "truncated")
