"""Database engines, sessions and schema migrations (Alembic)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from models.errors import DatabaseError

MIGRATIONS = Path(__file__).with_name("migrations")


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets WAL and a busy timeout so a reader never blocks a writer."""
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30})
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
    except (ArgumentError, NoSuchModuleError) as error:
        raise DatabaseError(f"database URL {hide_password(url)!r} is not usable: {error}") from None


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that keep loaded attributes after commit (results outlive their transaction)."""
    return sessionmaker(engine, expire_on_commit=False)


def hide_password(url: str) -> str:
    """`url` with any password replaced by ***, for messages and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _alembic_config(engine: Engine) -> Config:
    config = _script_config()
    config.attributes["connection_engine"] = engine
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


def current_revision(engine: Engine) -> str | None:
    """The migration the database is at, or None for an empty database."""
    with _connect(engine) as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine) -> str:
    """Migrate the database to the newest revision; returns it."""
    with _connect(engine):
        pass  # fail with a clear message before Alembic's own traceback
    command.upgrade(_alembic_config(engine), "head")
    return head_revision()


def ensure_schema(engine: Engine, *, migrate: bool) -> None:
    """Make sure the schema is current: migrate it (`migrate`) or refuse with a clear message."""
    current = current_revision(engine)
    if current == head_revision():
        return
    if migrate:
        upgrade(engine)
        return
    raise DatabaseError(
        f"database {hide_password(str(engine.url))} is at schema revision {current or 'none (empty)'}, "
        f"this code needs {head_revision()}: run `sumfleet db upgrade`"
    )


def _connect(engine: Engine):  # type: ignore[no-untyped-def]
    try:
        return engine.connect()
    except OperationalError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        raise DatabaseError(f"cannot reach database {hide_password(str(engine.url))}: {reason}") from None
