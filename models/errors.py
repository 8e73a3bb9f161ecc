"""The error hierarchy. Every error sumfleet raises on purpose is a `SumfleetError`.

Messages name what was wrong and where (file, line, field), so the CLI can print them
as they are.
"""

from __future__ import annotations


class SumfleetError(Exception):
    """Raised for any failure sumfleet reports to its user (the root of the hierarchy)."""


class ConfigError(SumfleetError):
    """Raised when a setting, flag or environment variable has an unusable value."""


class InputError(SumfleetError):
    """Raised when an input corpus cannot be read or holds bad rows.

    `problems` lists every bad row found (as `RowProblem`), so a user can fix them all
    in one go rather than one per run.
    """

    def __init__(self, message: str, problems: list[RowProblem] | None = None) -> None:
        super().__init__(message)
        self.problems = problems or []


class RowProblem:
    """One bad row of an input: where it is and what is wrong with it."""

    __slots__ = ("line", "reason", "source")

    def __init__(self, source: str, line: int | None, reason: str) -> None:
        self.source = source  # file path, `<stdin>`, or a path inside an input directory
        self.line = line  # 1-based line number, or None where lines mean nothing (a whole file)
        self.reason = reason

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line is not None else self.source
        return f"{where}: {self.reason}"

    def __repr__(self) -> str:
        return f"RowProblem({self.source!r}, {self.line!r}, {self.reason!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RowProblem) and (self.source, self.line, self.reason) == (
            other.source,
            other.line,
            other.reason,
        )


class PromptError(SumfleetError):
    """Raised when a prompt template is unknown or malformed (no `{document}`, stray placeholders)."""


class ModelNotFoundError(SumfleetError):
    """Raised when a model name resolves to nothing usable offline."""


class AdapterError(SumfleetError):
    """Raised when an adapter is unknown, misnamed, made for another model, or cannot be tuned."""


class BatchNotFoundError(SumfleetError):
    """Raised when a batch id names no batch in the database."""


class DatabaseError(SumfleetError):
    """Raised when the database cannot be reached or its schema is not at the expected revision."""


class BrokerError(SumfleetError):
    """Raised when the message broker (Redis) cannot be reached."""


class NotPublished(SumfleetError):
    """Raised by submit when the batch is committed but publishing its messages failed.

    The batch is saved and will run: a worker's sweeper publishes it (or `sumfleet requeue`).
    Never submit it again; `batch_id` is the batch, `accepted` its documents.
    """

    def __init__(self, message: str, batch_id: str, accepted: int, problems: list[RowProblem]) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.accepted = accepted
        self.problems = problems


class InvalidTransition(SumfleetError):
    """Raised when code asks for a job or batch state change the state machine forbids."""


class WaitTimeout(SumfleetError, TimeoutError):
    """Raised by `Client.wait` when a batch has not ended within the timeout (it keeps running).

    `batch_id` is the batch and `status` its last status (state and counts), as the message says.
    """

    def __init__(self, message: str, batch_id: str, status: object) -> None:
        super().__init__(message)
        self.batch_id = batch_id
        self.status = status
