"""batch counters (jobs per state, tokens of succeeded jobs), job input lines, indexes for keyset scans

Revision ID: 0006
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TOKENS = ("prompt", "output")


def upgrade() -> None:
    with op.batch_alter_table("batches") as batches:
        for state in STATES:
            batches.add_column(sa.Column(f"jobs_{state}", sa.Integer(), nullable=False, server_default="0"))
        for kind in TOKENS:
            batches.add_column(sa.Column(f"tokens_{kind}", sa.BigInteger(), nullable=False, server_default="0"))
    with op.batch_alter_table("jobs") as jobs:
        jobs.add_column(sa.Column("line", sa.Integer(), nullable=True))
    # existing batches: their counters from one recount
    for state in STATES:
        op.execute(
            f"UPDATE batches SET jobs_{state} = "
            f"(SELECT count(*) FROM jobs WHERE jobs.batch_id = batches.id AND jobs.state = '{state}')"
        )
    for kind in TOKENS:
        op.execute(
            f"UPDATE batches SET tokens_{kind} = (SELECT coalesce(sum({kind}_tokens), 0) FROM jobs "
            "WHERE jobs.batch_id = batches.id AND jobs.state = 'succeeded')"
        )
    # keyset scans: a batch's jobs of one state in id order (publishing, sweeping), and all of its
    # jobs in id order (results, pruning); batches newest first (listing)
    op.drop_index("ix_jobs_batch_state", table_name="jobs")
    op.create_index("ix_jobs_batch_state_id", "jobs", ["batch_id", "state", "id"])
    op.create_index("ix_jobs_batch_id", "jobs", ["batch_id", "id"])
    op.create_index("ix_batches_created", "batches", ["created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_batches_created", table_name="batches")
    op.drop_index("ix_jobs_batch_id", table_name="jobs")
    op.drop_index("ix_jobs_batch_state_id", table_name="jobs")
    op.create_index("ix_jobs_batch_state", "jobs", ["batch_id", "state"])
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("line")
    with op.batch_alter_table("batches") as batches:
        for kind in reversed(TOKENS):
            batches.drop_column(f"tokens_{kind}")
        for state in reversed(STATES):
            batches.drop_column(f"jobs_{state}")
