"""api limits: per-key rate limits and quotas, file expiry, background validation of batch input files

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as keys:
        keys.add_column(sa.Column("rate_limit_per_minute", sa.Integer(), nullable=True))
        keys.add_column(sa.Column("documents_per_day", sa.Integer(), nullable=True))
        keys.add_column(sa.Column("batches_in_flight", sa.Integer(), nullable=True))
        keys.add_column(sa.Column("rate_tokens", sa.Float(), nullable=True))
        keys.add_column(sa.Column("rate_at", sa.Float(), nullable=True))
        keys.add_column(sa.Column("documents_day", sa.Date(), nullable=True))
        keys.add_column(sa.Column("documents_used", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("api_files") as files:
        files.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("ix_api_files_expires_at", "api_files", ["expires_at"])
    with op.batch_alter_table("api_batches") as batches:
        batches.add_column(sa.Column("output_expires_after", sa.Integer(), nullable=True))
        batches.add_column(sa.Column("claimed_until", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_batches") as batches:
        batches.drop_column("claimed_until")
        batches.drop_column("output_expires_after")
    op.drop_index("ix_api_files_expires_at", "api_files")
    with op.batch_alter_table("api_files") as files:
        files.drop_column("expires_at")
    with op.batch_alter_table("api_keys") as keys:
        for column in (
            "documents_used",
            "documents_day",
            "rate_at",
            "rate_tokens",
            "batches_in_flight",
            "documents_per_day",
            "rate_limit_per_minute",
        ):
            keys.drop_column(column)
