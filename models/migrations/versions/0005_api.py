"""the HTTP API: keys, files (and their chunks), API batch records, rejected requests, webhook deliveries

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

RowId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _when(name: str, nullable: bool = True) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("secret_prefix", sa.String(32), nullable=False),
        sa.Column("webhook_secret", sa.String(128), nullable=False),
        _when("created_at", nullable=False),
        _when("revoked_at"),
    )
    op.create_table(
        "api_files",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("owner", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(512), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("api_batch_id", sa.String(40), nullable=True),
        _when("created_at", nullable=False),
    )
    op.create_index("ix_api_files_owner_created", "api_files", ["owner", "created_at"])
    op.create_table(
        "api_file_chunks",
        sa.Column("file_id", sa.String(40), sa.ForeignKey("api_files.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seq", sa.Integer(), primary_key=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "api_batches",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("batch_id", sa.String(32), sa.ForeignKey("batches.id", ondelete="SET NULL"), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("end_reason", sa.String(16), nullable=True),
        sa.Column("endpoint", sa.String(64), nullable=True),
        sa.Column("model", sa.String(512), nullable=True),
        sa.Column("input_file_id", sa.String(40), nullable=True),
        sa.Column("completion_window", sa.String(16), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=True),
        sa.Column("errors", sa.JSON(), nullable=True),
        sa.Column("callback_url", sa.Text(), nullable=True),
        sa.Column("output_file_id", sa.String(40), nullable=True),
        sa.Column("error_file_id", sa.String(40), nullable=True),
        _when("created_at", nullable=False),
        *(_when(name) for name in (
            "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
            "cancelling_at", "cancelled_at",
        )),
    )
    op.create_index("ix_api_batches_status", "api_batches", ["status"])
    op.create_index("ix_api_batches_owner_kind_created", "api_batches", ["owner", "kind", "created_at"])
    op.create_table(
        "api_rejections",
        sa.Column("id", RowId, primary_key=True, autoincrement=True),
        sa.Column("api_batch_id", sa.String(40), sa.ForeignKey("api_batches.id", ondelete="CASCADE"), nullable=False),
        sa.Column("line", sa.Integer(), nullable=False),
        sa.Column("custom_id", sa.String(512), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=False),
        sa.Column("code", sa.String(64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("param", sa.String(255), nullable=True),
    )
    op.create_index("ix_api_rejections_api_batch_id", "api_rejections", ["api_batch_id"])
    op.create_table(
        "api_webhook_deliveries",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("api_batch_id", sa.String(40), sa.ForeignKey("api_batches.id", ondelete="CASCADE"), nullable=False),
        sa.Column("owner", sa.String(32), sa.ForeignKey("api_keys.id"), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        _when("next_attempt_at", nullable=False),
        sa.Column("last_status", sa.Integer(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        _when("created_at", nullable=False),
        _when("delivered_at"),
    )
    op.create_index("ix_api_webhook_deliveries_api_batch_id", "api_webhook_deliveries", ["api_batch_id"])
    op.create_index("ix_api_webhook_deliveries_due", "api_webhook_deliveries", ["state", "next_attempt_at"])


def downgrade() -> None:
    op.drop_table("api_webhook_deliveries")
    op.drop_table("api_rejections")
    op.drop_table("api_batches")
    op.drop_table("api_file_chunks")
    op.drop_table("api_files")
    op.drop_table("api_keys")
