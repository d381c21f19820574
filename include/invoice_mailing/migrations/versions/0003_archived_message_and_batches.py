"""The exact bytes each customer got, and which task instance and try mailed each batch.

``delivery`` gains ``message_sha256`` (SHA-256 of the bytes given to the SMTP server) and
``message_path`` (where the archive keeps them, a full ``ObjectStoragePath`` URL), both empty for
rows sent before this revision or with the archive off. ``mailing_task`` records each try of a
``mail_customers`` instance (run, map index, try number, its customers), so that the audit pages can
link a delivery to the task instance and try that last handled it. Nothing existing is rewritten.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN (nullable) on SQLite too: a batch copy of the table would drop its trigger.
    op.add_column("delivery", sa.Column("message_sha256", sa.String(64), nullable=True))
    op.add_column("delivery", sa.Column("message_path", sa.String(1024), nullable=True))
    op.create_table(
        "mailing_task",
        sa.Column("run_id", sa.String(250), primary_key=True),
        sa.Column("map_index", sa.Integer, primary_key=True),
        sa.Column("try_number", sa.Integer, primary_key=True),
        sa.Column("label", sa.String(250), nullable=False),
        sa.Column("customers", sa.JSON, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("the ledger is an audit history: it is never downgraded")
