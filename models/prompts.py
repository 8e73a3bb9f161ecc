"""Prompt templates: the named library (a variant per language), custom templates, rendering.

A template is text with a `{document}` placeholder, and optionally `{max_words}` and
`{language}`, filled from the batch's parameters. Literal braces are written `{{` and `}}`.
The variant follows each document's language (a script-based check) unless the batch fixes
it. Both sides use this module: the producer checks prompts at submit time, the worker
renders them.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field

from models.errors import PromptError
from models.text import LANGUAGES, detect_language

PLACEHOLDERS = frozenset({"document", "max_words", "language"})  # what a template may use
ANY = "*"  # the variant key of a custom template: one text for every language
DEFAULT_MAX_WORDS = 50  # {max_words} when the batch does not set it

TEMPLATES: dict[str, dict[str, str]] = {
    "one-sentence": {
        "en": "Summarize the following article in one sentence:\n\n{document}",
        "zh": "请将以下文章简化为一句话：\n\n{document}",
    },
    "headline": {
        "en": "Write a short headline for the following article:\n\n{document}",
        "zh": "请为以下文章写一个简短的标题：\n\n{document}",
    },
    "bullets": {
        "en": "Summarize the following article in three bullet points:\n\n{document}",
        "zh": "请用三个要点总结以下文章：\n\n{document}",
    },
    "paragraph": {
        "en": "Summarize the following article in one paragraph of at most {max_words} words:\n\n{document}",
        "zh": "请用不超过{max_words}个字的一段话总结以下文章：\n\n{document}",
    },
    "tldr": {
        "en": "{document}\n\nTL;DR:",
        "zh": "{document}\n\n总结：",
    },
}

# The prompt for each piece of a long document (map-reduce); the batch's own template
# summarizes the joined piece summaries at the end.
PIECE_TEMPLATES: dict[str, str] = {
    "en": "Summarize the following part of a longer article in a few sentences:\n\n{document}",
    "zh": "请用几句话概括以下长文的一部分：\n\n{document}",
}


@dataclass(frozen=True)
class Prompt:
    """A resolved prompt: its name (`custom` for user text) and its variants by language."""

    name: str
    variants: dict[str, str]

    @property
    def template(self) -> str:
        """The variant shown first (English, or the custom text)."""
        return self.variants.get("en") or next(iter(self.variants.values()))


@dataclass(frozen=True)
class PromptPlan:
    """What a worker needs to prompt each document of a batch."""

    variants: dict[str, str]
    language: str = "auto"  # "auto": per document; or a fixed language code
    values: dict[str, object] = field(default_factory=dict)  # max_words, ...

    def for_document(self, text: str) -> tuple[str, str, str]:
        """(variant key, template, language) for this document."""
        language = detect_language(text) if self.language == "auto" else self.language
        for key in (language, "en", ANY):
            if key in self.variants:
                return key, self.variants[key], language
        key, template = next(iter(self.variants.items()))
        return key, template, language

    def render(self, template: str, document: str, language: str) -> str:
        """`template` filled in: the document, {max_words}, and {language} as a name (Chinese, ...)."""
        return render(template, document, {**self.values, "language": LANGUAGES.get(language, LANGUAGES["en"])})


def resolve_prompt(spec: str) -> Prompt:
    """A template name from the library, or custom template text containing `{document}`."""
    if spec in TEMPLATES:
        return Prompt(spec, dict(TEMPLATES[spec]))
    if "{" not in spec:
        known = ", ".join(sorted(TEMPLATES))
        raise PromptError(
            f"unknown prompt template {spec!r}; known templates: {known} "
            "(or give your own text containing {document})"
        )
    check_template(spec)
    return Prompt("custom", {ANY: spec})


def check_template(template: str) -> None:
    """Raise `PromptError` unless `template` parses, uses `{document}`, and no unknown placeholder."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as error:
        raise PromptError(f"prompt template does not parse: {error} (write literal braces as {{{{ and }}}})") from None
    unknown = sorted({f for f in fields if f not in PLACEHOLDERS})
    if unknown:
        shown = ", ".join("{" + f + "}" for f in unknown)
        known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
        raise PromptError(f"prompt template uses unknown placeholder(s) {shown}; the known ones are {known}")
    if "document" not in fields:
        raise PromptError("prompt template has no {document} placeholder: where should the document go?")


def check_language(language: str) -> str:
    if language != "auto" and language not in LANGUAGES:
        raise PromptError(f"unknown language {language!r}: use auto or one of {', '.join(LANGUAGES)}")
    return language


def render(template: str, document: str, values: Mapping[str, object] | None = None) -> str:
    """The template with the document (and other values) put in place; the document's braces stay."""
    filled = {"max_words": DEFAULT_MAX_WORDS, "language": LANGUAGES["en"], **(values or {})}
    return template.format(document=document, **filled)
