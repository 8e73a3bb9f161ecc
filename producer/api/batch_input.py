"""Reading an OpenAI batch input file: one `{custom_id, method, url, body}` request per line.

Two kinds of problem, as OpenAI has them:
- a line that is not a request of this batch (bad JSON, no `custom_id`, a duplicate one, wrong
  `method` or `url`, no `body`, another `model`) fails the whole batch: it is created with
  status `failed` and these `errors` (`line` 1-based);
- a well-formed request whose body cannot be run (no user message, `max_tokens` out of range,
  `n` > 1, ...) is refused alone: it goes to the batch's error file with status code 400 and
  the rest of the batch runs.

A runnable request becomes a `Document` whose `request` carries the chat messages, the token
limit and the temperature, and whose text is the last user message.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from models import defaults
from models.errors import RowProblem
from models.model_names import canonical_model
from producer.api.checks import unstorable
from producer.inputs import Document

CHAT_COMPLETIONS = "/v1/chat/completions"  # the one endpoint batches may use
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_CUSTOM_ID = 512  # characters (the jobs table's doc_id)
MAX_ERRORS = 100  # validation errors listed before the rest are only counted


class LineError(RowProblem):
    """A line that fails the whole batch: OpenAI's `{code, message, param, line}`."""

    __slots__ = ("code", "param")

    def __init__(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        super().__init__("input file", line, message)
        self.code = code
        self.param = param

    def as_openai(self) -> dict[str, Any]:
        message = f"line {self.line}: {self.reason}" if self.line is not None else self.reason
        return {"code": self.code, "message": message, "param": self.param, "line": self.line}


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request refused on its own (its line goes to the error file with status 400)."""

    line: int
    custom_id: str
    code: str
    message: str
    param: str | None

    def row(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "custom_id": self.custom_id,
            "status_code": 400,
            "code": self.code,
            "message": self.message,
            "param": self.param,
        }


def _kind(value: object) -> str:
    names = {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }
    return names.get(type(value), type(value).__name__)


def _parse(raw: bytes) -> tuple[Any, str | None]:
    """(the JSON value, None) or (None, why the line is not JSON)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte {e.start + 1})"
    try:
        return json.loads(text), None
    except json.JSONDecodeError as e:
        return None, f"not valid JSON ({e.msg} at column {e.colno})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"


def first_model(lines: Iterable[bytes]) -> tuple[int, str] | None:
    """(line, `body.model`) of the first line that has one: the model selects the batch's queue."""
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        value, _ = _parse(raw)
        if isinstance(value, dict) and isinstance(value.get("body"), dict):
            model = value["body"].get("model")
            if isinstance(model, str) and model.strip():
                return number, model.strip()
    return None


class BatchInput:
    """Checks the lines of an input file and yields its runnable requests as Documents.

    `errors` (the batch fails) and `rejected` (single requests refused) fill up while
    `documents()` is consumed. Once any error is found no more documents are yielded,
    but every line is still checked so all errors are reported at once.
    """

    def __init__(
        self,
        lines: Iterable[bytes],
        *,
        endpoint: str,
        model: str | None,
        max_requests: int,
        max_chars: int,
        default_max_tokens: int,
    ) -> None:
        self.lines = lines
        self.endpoint = endpoint
        self.model = model
        self.max_requests = max_requests
        self.max_chars = max_chars
        self.default_max_tokens = default_max_tokens
        self.errors: list[LineError] = []
        self.hidden_errors = 0  # errors beyond MAX_ERRORS, only counted
        self.rejected: list[Rejected] = []
        self.requests = 0
        self._seen: dict[str, int] = {}
        self._model_line: int | None = None

    def error(self, line: int | None, code: str, message: str, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(LineError(line, code, message, param))
        else:
            self.hidden_errors += 1

    def openai_errors(self) -> list[dict[str, Any]]:
        listed = [e.as_openai() for e in self.errors]
        if self.hidden_errors:
            listed.append(
                {
                    "code": "too_many_errors",
                    "message": f"... and {self.hidden_errors} more error(s) not listed",
                    "param": None,
                    "line": None,
                }
            )
        return listed

    def documents(self) -> Iterator[Document]:
        for number, raw in enumerate(self.lines, start=1):
            if not raw.strip():
                continue  # blank lines (a trailing newline) are not requests
            self.requests += 1
            if self.requests > self.max_requests:
                self.error(
                    number,
                    "too_many_tasks",
                    f"more than {self.max_requests:,} requests in one batch (SUMFLEET_API_MAX_DOCUMENTS)",
                )
                return
            document = self._line(number, raw)
            if document is not None and not self.errors:
                yield document

    def _line(self, number: int, raw: bytes) -> Document | None:
        value, problem = _parse(raw)
        if problem is not None:
            self.error(number, "invalid_json_line", problem)
            return None
        if not isinstance(value, dict):
            self.error(number, "invalid_json_line", f"expected a JSON object, got {_kind(value)}")
            return None
        custom_id = value.get("custom_id")
        if custom_id is None:
            self.error(number, "missing_custom_id", "missing custom_id", "custom_id")
            return None
        if not isinstance(custom_id, str) or not custom_id.strip():
            what = "is empty" if isinstance(custom_id, str) else f"must be a string, got {_kind(custom_id)}"
            self.error(number, "invalid_custom_id", f"custom_id {what}", "custom_id")
            return None
        if problem := unstorable(custom_id):
            self.error(number, "invalid_custom_id", f"custom_id {problem}", "custom_id")
            return None
        if len(custom_id) > MAX_CUSTOM_ID:
            self.error(
                number,
                "invalid_custom_id",
                f"custom_id is {len(custom_id)} characters; the limit is {MAX_CUSTOM_ID}",
                "custom_id",
            )
            return None
        first = self._seen.setdefault(custom_id, number)
        if first != number:
            self.error(
                number,
                "duplicate_custom_id",
                f"duplicate custom_id {json.dumps(custom_id)} (first at line {first})",
                "custom_id",
            )
            return None
        method = value.get("method")
        if method != "POST":
            got = "it is missing" if method is None else f"got {json.dumps(method)}"
            self.error(number, "invalid_method", f'method must be "POST", {got}', "method")
            return None
        url = value.get("url")
        if url != self.endpoint:
            got = "it is missing" if url is None else f"got {json.dumps(url)}"
            self.error(number, "invalid_url", f'url must be "{self.endpoint}" (the batch\'s endpoint), {got}', "url")
            return None
        body = value.get("body")
        if not isinstance(body, dict):
            got = "it is missing" if body is None else f"got {_kind(body)}"
            self.error(number, "invalid_body", f"body must be a JSON object, {got}", "body")
            return None
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            self.error(number, "missing_model", "body.model is required (a model name string)", "body.model")
            return None
        if self.model is None or canonical_model(model) != canonical_model(self.model):
            self.error(
                number,
                "mismatched_model",
                f"body.model {json.dumps(model)} differs from {json.dumps(self.model)}, the model of the batch's "
                "first request; all requests of a batch must use the same model",
                "body.model",
            )
            return None
        return self._request(number, custom_id, body)

    def _reject(self, number: int, custom_id: str, code: str, message: str, param: str | None) -> None:
        self.rejected.append(Rejected(number, custom_id, code, message, param))

    def _request(self, number: int, custom_id: str, body: dict[str, Any]) -> Document | None:
        """The runnable request of a well-formed line, or None once it is rejected on its own."""
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            what = "is missing" if messages is None else "must be a non-empty array of messages"
            self._reject(
                number,
                custom_id,
                "missing_required_parameter" if messages is None else "invalid_value",
                f"messages {what}",
                "messages",
            )
            return None
        normalized: list[dict[str, str]] = []
        chars = 0
        for i, message in enumerate(messages):
            where = f"messages[{i}]"
            if not isinstance(message, dict):
                self._reject(
                    number, custom_id, "invalid_value", f"{where} must be an object, got {_kind(message)}", where
                )
                return None
            role = message.get("role")
            if role not in ROLES:
                self._reject(
                    number,
                    custom_id,
                    "invalid_value",
                    f"{where}.role must be one of {', '.join(ROLES)}, got {json.dumps(role)}",
                    f"{where}.role",
                )
                return None
            content = _content(message.get("content"))
            if content is None:
                self._reject(
                    number,
                    custom_id,
                    "invalid_value",
                    f"{where}.content must be a string or an array of text parts",
                    f"{where}.content",
                )
                return None
            if problem := unstorable(content):
                self._reject(number, custom_id, "invalid_value", f"{where}.content {problem}", f"{where}.content")
                return None
            chars += len(content)
            normalized.append({"role": ROLES[role], "content": content})
        user = next((m["content"] for m in reversed(normalized) if m["role"] == "user"), None)
        if user is None or not user.strip():
            self._reject(
                number, custom_id, "invalid_value", "messages must include a user message with text", "messages"
            )
            return None
        if chars > self.max_chars:
            self._reject(
                number,
                custom_id,
                "context_length_exceeded",
                f"the messages are {chars:,} characters; the limit is {self.max_chars:,}",
                "messages",
            )
            return None
        limit = defaults.MAX_NEW_TOKENS_LIMIT
        max_tokens = self.default_max_tokens
        for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins when both are given
            given = body.get(name)
            if given is None:
                continue
            if isinstance(given, bool) or not isinstance(given, int) or not 1 <= given <= limit:
                self._reject(
                    number,
                    custom_id,
                    "invalid_value",
                    f"{name} must be an integer between 1 and {limit}, got {json.dumps(given)}",
                    name,
                )
                return None
            max_tokens = given
        temperature = body.get("temperature", 1.0)
        if temperature is None:
            temperature = 1.0
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            self._reject(
                number,
                custom_id,
                "invalid_value",
                f"temperature must be a number between 0 and 2, got {json.dumps(temperature)}",
                "temperature",
            )
            return None
        n = body.get("n", 1)
        if n not in (1, None):
            self._reject(
                number,
                custom_id,
                "invalid_value",
                f"n must be 1 (one completion per request), got {json.dumps(n)}",
                "n",
            )
            return None
        if body.get("stream"):
            self._reject(number, custom_id, "invalid_value", "stream is not supported in a batch", "stream")
            return None
        request = {"messages": normalized, "max_new_tokens": max_tokens, "temperature": float(temperature)}
        return Document(id=custom_id, text=user.strip(), source="input file", line=number, meta={}, request=request)


def _content(value: object) -> str | None:
    """A message's text: a string, or the text parts of an array joined; None if not text."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        texts = []
        for part in value:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                return None
            texts.append(part["text"])
        return "\n".join(texts)
    return None
