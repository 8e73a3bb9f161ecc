"""Alembic environment: runs migrations on the engine sumfleet hands over (never an ini file)."""

from alembic import context

from models.tables import Base

engine = context.config.attributes["connection_engine"]
with engine.begin() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()
