"""Prompt templates: the named library (a variant per language), custom templates, rendering.

A template is text with a `{document}` placeholder, and optionally `{max_words}` and
`{language}`, filled from the batch's parameters. Literal braces are written `{{` and `}}`.
The variant follows each document's language (`models.text.detect_language`) unless the batch
fixes it; a language without a variant of its own uses the English one. Both sides use this
module: the producer checks prompts at submit time, the worker renders them.
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
    if not spec.strip():
        raise PromptError("prompt is empty: give a template name or text containing {document}")
    if "{" not in spec:
        known = ", ".join(sorted(TEMPLATES))
        raise PromptError(
            f"unknown prompt template {spec!r}; known templates: {known} "
            "(or give your own text containing {document})"
        )
    check_template(spec)
    return Prompt("custom", {ANY: spec})


def _pieces(template: str) -> list[tuple[str, str | None]]:
    """(literal text, placeholder or None) pairs; `PromptError` for anything but bare known fields.

    Only `{document}`, `{max_words}` and `{language}` are allowed, bare: no conversion (`!r`),
    no format spec (`:>1000000000` would make every render allocate gigabytes), no attribute or
    index access. The same rule holds at submit, in the API, for tuned adapters, and in workers.
    """
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as error:
        raise PromptError(f"prompt template does not parse: {error} (write literal braces as {{{{ and }}}})") from None
    pieces: list[tuple[str, str | None]] = []
    for literal, name, spec, conversion in parsed:
        if name is not None:
            written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            if name not in PLACEHOLDERS:
                known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
                raise PromptError(f"prompt template uses unknown placeholder {written}; the known ones are {known}")
            if conversion:
                raise PromptError(
                    f"prompt template placeholder {written} has a conversion (!{conversion}): write {{{name}}}"
                )
            if spec:
                raise PromptError(
                    f"prompt template placeholder {written} has a format spec (:{spec}): write {{{name}}}"
                )
        pieces.append((literal, name))
    return pieces


def check_template(template: str) -> None:
    """Raise `PromptError` unless `template` parses, uses `{document}`, and only bare known placeholders."""
    if not template.strip():
        raise PromptError("prompt template is empty: give a template name or text containing {document}")
    if not any(name == "document" for _, name in _pieces(template)):
        raise PromptError("prompt template has no {document} placeholder: where should the document go?")


def check_language(language: str) -> str:
    """`language` as a batch's prompt language: "auto" (per document) or an ISO 639-1 code that
    detection can return ("fr", "de", "zh", ...; any case); raises `PromptError` for anything else."""
    code = language.strip().lower()
    if code != "auto" and code not in LANGUAGES:
        known = ", ".join(sorted(LANGUAGES))
        raise PromptError(f"unknown language {language!r}: use auto or an ISO 639-1 code, one of {known}")
    return code


def render(template: str, document: str, values: Mapping[str, object] | None = None) -> str:
    """The template with the document (and other values) put in place; the document's braces stay."""
    filled = {"max_words": DEFAULT_MAX_WORDS, "language": LANGUAGES["en"], **(values or {}), "document": document}
    return "".join(literal + ("" if name is None else str(filled[name])) for literal, name in _pieces(template))
