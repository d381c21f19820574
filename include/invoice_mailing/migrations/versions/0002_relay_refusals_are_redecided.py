"""A relay's refusal of the sender (MAIL FROM, AUTH) or of SMTPUTF8 is re-decided the next night.

Release 1 made ``sender_rejected`` and ``smtputf8_unsupported`` final: one misconfigured account or
relay failed every recipient for good. They are the account's or the relay's problem, mended by
fixing the setting, so from this revision only the server's verdicts on a recipient or a message
(``recipient_rejected``, ``message_rejected``, ``too_large``, ``smtp_error``) are final. Rows are
not rewritten; the trigger is replaced.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27
"""

from alembic import op

from include.invoice_mailing.migrations import forward_only

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

FINAL = ("recipient_rejected", "message_rejected", "too_large", "smtp_error")


def upgrade() -> None:
    for statement in forward_only.create(op.get_bind().dialect.name, FINAL):
        op.execute(statement)


def downgrade() -> None:
    raise NotImplementedError("the ledger is an audit history: it is never downgraded")
