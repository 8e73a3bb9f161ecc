"""workers: the worker registry (each process, what it serves, its heartbeat)

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("id", sa.String(255), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("model", sa.String(512), nullable=False),
        sa.Column("queue", sa.String(255), nullable=False),
        sa.Column("device", sa.String(64), nullable=True),
        sa.Column("dtype", sa.String(32), nullable=True),
        sa.Column("version", sa.String(32), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("documents", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("current_batch", sa.String(32), nullable=True),
        sa.Column("stopped_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_workers_queue", "workers", ["queue"])
    op.create_index("ix_workers_heartbeat_at", "workers", ["heartbeat_at"])


def downgrade() -> None:
    op.drop_index("ix_workers_heartbeat_at", "workers")
    op.drop_index("ix_workers_queue", "workers")
    op.drop_table("workers")
