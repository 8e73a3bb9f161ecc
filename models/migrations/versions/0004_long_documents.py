"""long documents (pieces, levels) and jobs that carry their own request (chat messages)

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("pieces", sa.Integer(), nullable=True))
        jobs.add_column(sa.Column("levels", sa.Integer(), nullable=True))
        jobs.add_column(sa.Column("request", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("request")
        jobs.drop_column("levels")
        jobs.drop_column("pieces")
