"""Prompt templates: the named library, custom templates, and rendering.

A template is text with a `{document}` placeholder. Literal braces are written `{{` and `}}`.
This module is light (no torch), so the producer can validate prompts at submit time.
"""

from __future__ import annotations

import string
from dataclasses import dataclass

from models.errors import PromptError

PLACEHOLDERS = frozenset({"document"})  # placeholders a template may use

TEMPLATES: dict[str, str] = {
    "one-sentence": "Summarize the following article in one sentence:\n\n{document}",
    "headline": "Write a short headline for the following article:\n\n{document}",
    "bullets": "Summarize the following article in three bullet points:\n\n{document}",
    "tldr": "{document}\n\nTL;DR:",
    "paragraph": "Summarize the following article in one short paragraph:\n\n{document}",
    "one-sentence-zh": "请将以下文章简化为一句话：\n\n{document}",
    "headline-zh": "请为以下文章写一个简短的标题：\n\n{document}",
    "bullets-zh": "请用三个要点总结以下文章：\n\n{document}",
}


@dataclass(frozen=True, slots=True)
class Prompt:
    """A resolved prompt: its name (`custom` for user text) and its template text."""

    name: str
    template: str


def resolve_prompt(spec: str) -> Prompt:
    """A template name from the library, or custom template text containing `{document}`."""
    if spec in TEMPLATES:
        return Prompt(spec, TEMPLATES[spec])
    if "{" not in spec:
        known = ", ".join(sorted(TEMPLATES))
        raise PromptError(
            f"unknown prompt template {spec!r}; known templates: {known} "
            "(or give your own text containing {document})"
        )
    check_template(spec)
    return Prompt("custom", spec)


def check_template(template: str) -> None:
    """Raise `PromptError` unless `template` parses and uses `{document}` and no unknown placeholder."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as error:
        raise PromptError(f"prompt template does not parse: {error} (write literal braces as {{{{ and }}}})") from None
    unknown = sorted({f for f in fields if f not in PLACEHOLDERS})
    if unknown:
        shown = ", ".join("{" + f + "}" for f in unknown)
        raise PromptError(f"prompt template uses unknown placeholder(s) {shown}; only {{document}} is filled in")
    if "document" not in fields:
        raise PromptError("prompt template has no {document} placeholder: where should the document go?")


def render(template: str, document: str) -> str:
    """The template with the document put in its place (the document's own braces are left alone)."""
    return template.format(document=document)
