"""The database: connection pools (SQLAlchemy engines, called `database` here), sessions, migrations."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, CursorResult, Engine, Result, create_engine, event
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from models.errors import DatabaseError
from models.settings import hide_password

MIGRATIONS = Path(__file__).with_name("migrations")


def open_database(url: str) -> Engine:
    """A connection pool for `url`; SQLite gets WAL and a busy timeout so a reader never blocks a writer."""
    try:
        if url.startswith("sqlite"):
            database = create_engine(url, connect_args={"timeout": 30})
            event.listen(database, "connect", _sqlite_pragmas)
            return database
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    except (ArgumentError, NoSuchModuleError) as error:
        raise DatabaseError(f"database URL {hide_password(url)!r} is not usable: {error}") from None


def _sqlite_pragmas(dbapi_connection: Any, _record: object) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched (`Session.execute` types its result as a plain `Result`)."""
    return cast(CursorResult[Any], result).rowcount


def session_factory(database: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (results outlive their transaction)."""
    return sessionmaker(database, expire_on_commit=False)


def _alembic_config(database: Engine) -> Config:
    config = _script_config()
    config.attributes["connection_engine"] = database
    return config


def head_revision() -> str:
    """The newest migration this code knows."""
    head = ScriptDirectory.from_config(_script_config()).get_current_head()
    assert head is not None
    return head


def _script_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def current_revision(database: Engine) -> str | None:
    """The migration the database is at, or None for an empty database."""
    with _connect(database) as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(database: Engine) -> str:
    """Migrate the database to the newest revision; returns it."""
    with _connect(database):
        pass  # fail with a clear message before Alembic's own traceback
    command.upgrade(_alembic_config(database), "head")
    return head_revision()


def ensure_schema(database: Engine, *, migrate: bool) -> None:
    """Make sure the schema is current: migrate it (`migrate`) or refuse with a clear message."""
    current = current_revision(database)
    if current == head_revision():
        return
    if migrate:
        upgrade(database)
        return
    raise DatabaseError(
        f"database {hide_password(str(database.url))} is at schema revision {current or 'none (empty)'}, "
        f"this code needs {head_revision()}: run `sumfleet db upgrade`"
    )


# what a server that is up answers when waiting cannot help: refuse at once instead of retrying
PERMANENT_CONNECT_ERRORS = (
    "password authentication failed",
    "authentication failed",
    "no password supplied",
    "does not exist",
    "pg_hba.conf",
)


def wait_for_database(database: Engine, on_wait: Callable[[str, float], None], max_delay: float = 30.0) -> None:
    """Return once the database accepts a connection. While it cannot be reached or is still
    starting (connection refused, a timeout, "the database system is starting up", a host name not
    resolving yet), call `on_wait(reason, delay)` and retry after `delay` seconds: 1, 2, 4 ... at most
    `max_delay`. A refusal that waiting cannot fix (wrong credentials, no such database or role)
    raises `DatabaseError` at once."""
    delay = 1.0
    while True:
        try:
            with database.connect():
                return
        except OperationalError as error:
            reason = (str(error.orig or error).strip().splitlines() or [type(error).__name__])[0]
            if any(phrase in str(error.orig or error) for phrase in PERMANENT_CONNECT_ERRORS):
                raise DatabaseError(f"cannot reach database {hide_password(str(database.url))}: {reason}") from None
            on_wait(reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, max_delay)


def _connect(database: Engine) -> Connection:
    try:
        return database.connect()
    except OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        raise DatabaseError(f"cannot reach database {hide_password(str(database.url))}: {reason}") from None
