"""batches.idempotency_key: a retried submission with the same key returns the first batch

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batches:
        batches.add_column(sa.Column("idempotency_key", sa.String(300), nullable=True))
        batches.create_unique_constraint("uq_batches_idempotency_key", ["idempotency_key"])


def downgrade() -> None:
    with op.batch_alter_table("batches") as batches:
        batches.drop_constraint("uq_batches_idempotency_key", type_="unique")
        batches.drop_column("idempotency_key")
