"""The ledger as release 1 created it: ``delivery``, ``mailing_run`` and the forward-only trigger.

A ledger made by release 1 has exactly this schema and no ``alembic_version``: ``upgrade()`` stamps it
with this revision instead of running it.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

import sqlalchemy as sa
from alembic import op

from include.invoice_mailing.migrations import forward_only

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

RELEASE_1_FINAL = ("recipient_rejected", "message_rejected", "sender_rejected", "too_large",
                   "smtputf8_unsupported", "smtp_error")


def upgrade() -> None:
    op.create_table(
        "delivery",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("last_run_id", sa.String(250), nullable=False),
        sa.Column("doc_type", sa.String(3), nullable=False),
        sa.Column("ref_nbr", sa.String(15), nullable=False),
        sa.Column("customer_id", sa.String(10), nullable=False),
        sa.Column("mailing_id", sa.String(20), nullable=False),
        sa.Column("recipient", sa.String(254), nullable=False),
        sa.Column("recipient_key", sa.String(254), nullable=False),
        sa.Column("add_to", sa.String(3), nullable=False),
        sa.Column("format", sa.String(10), nullable=False),
        sa.Column("mode", sa.String(10), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("resend_of", sa.Integer, nullable=True),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("reason", sa.String(40), nullable=True),
        sa.Column("detail", sa.Text, nullable=True),
        sa.Column("message_id", sa.String(250), nullable=True),
        sa.Column("sender", sa.String(254), nullable=True),
        sa.Column("redirected_to", sa.String(254), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("claimed_by", sa.String(120), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attachment_sha256", sa.String(64), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("doc_type", "ref_nbr", "mailing_id", "recipient_key", "format", "mode", "generation",
                            name="uq_delivery"),
        sa.CheckConstraint("status IN ('pending', 'sending', 'sent', 'failed', 'skipped')",
                           name="ck_delivery_status"),
        sa.CheckConstraint("mode IN ('live', 'dry_run', 'redirect')", name="ck_delivery_mode"),
    )
    op.create_table(
        "mailing_run",
        sa.Column("run_id", sa.String(250), primary_key=True),
        sa.Column("logical_date", sa.DateTime(timezone=True)),
        sa.Column("mode", sa.String(10), nullable=False),
        sa.Column("params", sa.JSON, nullable=False),
        sa.Column("summary", sa.JSON, nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    for statement in forward_only.create(op.get_bind().dialect.name, RELEASE_1_FINAL):
        op.execute(statement)


def downgrade() -> None:
    raise NotImplementedError("the ledger is an audit history: it is never downgraded")
