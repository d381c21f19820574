"""Final means final: the trigger fires on every UPDATE of a delivery, and no delivery is deleted.

The trigger of revisions 0001 and 0002 fired only on ``UPDATE OF status``: a sent row's reason,
``sent_at``, ``message_sha256`` or recipient could be rewritten, and any row deleted. From this
revision, on SQLite and PostgreSQL alike:

- the status moves only forward, with the final reasons of revision 0002 (unchanged);
- a final row (``sent``, or refused by the server's verdict on a recipient or a message) is never
  changed. An UPDATE that changes nothing passes; the one exception is the archive's
  ``message_path`` of a sent row, which may be set once, after the ``sent`` commit (it is written
  after it so that the window in which a message can arrive twice stays one UPDATE);
- a delivery is never deleted (nor, on PostgreSQL, the table truncated).

``ix_delivery_status`` lets every night find the deliveries still open. ``lost_claim`` is new: each
time an attempt found, after the SMTP server had taken its message, that another attempt had taken
over its claim (a message that may have arrived twice), it says so there.
Existing rows are not rewritten.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

FINAL = ("recipient_rejected", "message_rejected", "too_large", "smtp_error")
# Every column of ``delivery`` at this revision but message_path: a later column is fixed on final
# rows only once a later migration restates this trigger with it.
FIXED = ("id", "run_id", "last_run_id", "doc_type", "ref_nbr", "customer_id", "mailing_id", "recipient",
         "recipient_key", "add_to", "format", "mode", "generation", "resend_of", "status", "reason", "detail",
         "message_id", "sender", "redirected_to", "attempts", "last_error", "claimed_by", "claimed_at",
         "sent_at", "attachment_sha256", "message_sha256", "created_at", "updated_at")
FORWARD = "delivery status may only move forward"
FIXED_MESSAGE = "a final delivery is never changed"
NEVER_DELETED = "deliveries are never deleted"


def _same(dialect: str, column: str) -> str:
    return f"OLD.{column} IS NEW.{column}" if dialect == "sqlite" else f"OLD.{column} IS NOT DISTINCT FROM NEW.{column}"


def _conditions(dialect: str) -> tuple[str, str, str]:
    """(the status moves forward, the old row is final, the final row is unchanged) in SQL."""
    finals = ", ".join(f"'{r}'" for r in FINAL)
    forward = f"""(
    OLD.status = NEW.status
 OR (OLD.status = 'pending' AND NEW.status IN ('sending', 'skipped', 'failed'))
 OR (OLD.status = 'sending' AND NEW.status IN ('sent', 'failed', 'pending', 'skipped'))
 OR (OLD.status IN ('skipped', 'failed') AND COALESCE(OLD.reason, '') NOT IN ({finals})
     AND NEW.status IN ('pending', 'skipped', 'failed'))
)"""
    final = f"(OLD.status = 'sent' OR (OLD.status IN ('skipped', 'failed') AND COALESCE(OLD.reason, '') IN ({finals})))"
    unchanged = " AND ".join(_same(dialect, c) for c in FIXED)
    unchanged = (f"({unchanged} AND ({_same(dialect, 'message_path')} "
                 "OR (OLD.status = 'sent' AND OLD.message_path IS NULL)))")
    return forward, final, unchanged


def statements(dialect: str) -> list[str]:
    forward, final, unchanged = _conditions(dialect)
    if dialect == "sqlite":
        return [
            "DROP TRIGGER IF EXISTS delivery_forward_only",
            f"""CREATE TRIGGER delivery_forward_only BEFORE UPDATE ON delivery
FOR EACH ROW WHEN NOT {forward}
BEGIN SELECT RAISE(ABORT, '{FORWARD}'); END""",
            f"""CREATE TRIGGER delivery_final_is_fixed BEFORE UPDATE ON delivery
FOR EACH ROW WHEN OLD.status = NEW.status AND {final} AND NOT {unchanged}
BEGIN SELECT RAISE(ABORT, '{FIXED_MESSAGE}'); END""",
            f"""CREATE TRIGGER delivery_never_deleted BEFORE DELETE ON delivery
FOR EACH ROW BEGIN SELECT RAISE(ABORT, '{NEVER_DELETED}'); END""",
        ]
    if dialect == "postgresql":
        return [
            f"""CREATE OR REPLACE FUNCTION delivery_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP IN ('DELETE', 'TRUNCATE') THEN
    RAISE EXCEPTION USING MESSAGE = '{NEVER_DELETED}';
  END IF;
  IF NOT {forward} THEN
    RAISE EXCEPTION USING MESSAGE = '{FORWARD}: ' || OLD.status || ' -> ' || NEW.status;
  END IF;
  IF {final} AND NOT {unchanged} THEN
    RAISE EXCEPTION USING MESSAGE = '{FIXED_MESSAGE}: delivery ' || OLD.id || ' is ' || OLD.status;
  END IF;
  RETURN NEW;
END $$""",
            "DROP TRIGGER IF EXISTS delivery_forward_only ON delivery",
            """CREATE TRIGGER delivery_forward_only BEFORE UPDATE ON delivery
FOR EACH ROW EXECUTE FUNCTION delivery_forward_only()""",
            """CREATE TRIGGER delivery_never_deleted BEFORE DELETE ON delivery
FOR EACH ROW EXECUTE FUNCTION delivery_forward_only()""",
            """CREATE TRIGGER delivery_never_truncated BEFORE TRUNCATE ON delivery
FOR EACH STATEMENT EXECUTE FUNCTION delivery_forward_only()""",
        ]
    raise NotImplementedError(f"the ledger supports SQLite and PostgreSQL, not {dialect}")


def upgrade() -> None:
    for statement in statements(op.get_bind().dialect.name):
        op.execute(statement)
    op.create_index("ix_delivery_status", "delivery", ["status"])
    op.create_table(
        "lost_claim",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("delivery_id", sa.Integer, nullable=False),
        sa.Column("run_id", sa.String(250), nullable=False),
        sa.Column("claimed_by", sa.String(120), nullable=False),
        sa.Column("held_by", sa.String(120), nullable=True),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("message_sha256", sa.String(64), nullable=True),
        sa.Column("noted_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    raise NotImplementedError("the ledger is an audit history: it is never downgraded")
