"""The approval brake: each night's volume, and every approval asked and answered.

``mailing_run`` gains ``volume`` (what extract found due: documents, customers, total per currency),
empty for the nights before this revision; the brake compares tonight with the median of the last
nights (for an older night without a volume, its count of documents sent). ``night_approval`` is new:
one row each time a night was held for a person, with the numbers shown to the approver and, once
answered, the decision (``approved``, ``rejected`` or ``timed_out``), who made it and when. A row's
request is never changed; its decision is written once. Nothing existing is rewritten.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("mailing_run", sa.Column("volume", sa.JSON, nullable=True))
    op.create_table(
        "night_approval",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("asked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("decision", sa.String(20), nullable=True),
        sa.Column("decided_by", sa.String(250), nullable=True),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("decision IS NULL OR decision IN ('approved', 'rejected', 'timed_out')",
                           name="ck_night_approval_decision"),
    )
    op.create_index("ix_night_approval_run_id", "night_approval", ["run_id"])


def downgrade() -> None:
    raise NotImplementedError("the ledger is an audit history: it is never downgraded")
