"""The bounce mailbox's messages read and left there: each is parsed once.

``mailbox_message`` is new: one row per message the bounce reader read and left in its folder for good
(an auto-reply, a person's answer, a message that cannot be read), named by its mailbox, the folder's
UIDVALIDITY and its UID (RFC 3501: together they name one message for ever). The next pass does not fetch
or parse it again. A report that names no delivery yet is not recorded: it may apply on a later pass.
Nothing existing is changed.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mailbox_message",
        sa.Column("mailbox", sa.String(500), primary_key=True),     # conn id, login@host:port and folder
        sa.Column("uidvalidity", sa.BigInteger, primary_key=True),
        sa.Column("uid", sa.BigInteger, primary_key=True),
        sa.Column("kind", sa.String(12), nullable=False),            # bounces.Kind: other, auto_reply, unreadable
        sa.Column("reason", sa.Text, nullable=True),                 # why it was left (addresses masked)
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("the ledger is an audit history: it is never downgraded")
