"""Bounces (spec section 9): a sent delivery may become ``bounced``, and every applied report is kept.

- ``delivery`` gains ``bounced_at``; its status may be ``bounced``. The trigger allows exactly one
  new step, ``sent`` -> ``bounced``, which sets the reason (``hard_bounce`` or ``blocked``), the
  detail (status code and diagnostic) and ``bounced_at`` and changes nothing else; a bounced row is
  final, like a sent one.
- ``bounce_report`` is new: one row per report applied to a delivery (a bounce, or a delay noted
  without changing the status), with the SHA-256 of its raw bytes (applying the same report to the
  same delivery twice changes nothing), what it says, and the raw report itself, or where the
  archive keeps it.

The status CHECK constraint must admit ``bounced``. PostgreSQL drops and adds it. SQLite has no ALTER
for a CHECK constraint: the table's definition is widened in place by SQLite's documented procedure
(writable_schema, a new schema version, the integrity check), so that no row, id, index or trigger is
copied, dropped or rewritten. Nothing existing is rewritten.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

FINAL = ("recipient_rejected", "message_rejected", "too_large", "smtp_error")
BOUNCE_REASONS = ("hard_bounce", "blocked")
STATUSES = ("pending", "sending", "sent", "failed", "skipped", "bounced")
# Every column of ``delivery`` at this revision but message_path (set once on a sent row), as in 0004.
FIXED = ("id", "run_id", "last_run_id", "doc_type", "ref_nbr", "customer_id", "mailing_id", "recipient",
         "recipient_key", "add_to", "format", "mode", "generation", "resend_of", "status", "reason", "detail",
         "message_id", "sender", "redirected_to", "attempts", "last_error", "claimed_by", "claimed_at",
         "sent_at", "attachment_sha256", "message_sha256", "created_at", "updated_at", "bounced_at")
# What the one step sent -> bounced may change.
BOUNCE_SETS = ("status", "reason", "detail", "bounced_at", "updated_at")
FORWARD = "delivery status may only move forward"
FIXED_MESSAGE = "a final delivery is never changed"
NEVER_DELETED = "deliveries are never deleted"
BOUNCE_MESSAGE = "a bounce sets only the reason, the detail and bounced_at"
STATUS_CHECK = "status IN ({})".format(", ".join(f"'{s}'" for s in STATUSES))


def _same(dialect: str, column: str) -> str:
    return f"OLD.{column} IS NEW.{column}" if dialect == "sqlite" else f"OLD.{column} IS NOT DISTINCT FROM NEW.{column}"


def _conditions(dialect: str) -> tuple[str, str, str, str, str]:
    """(moves forward, old row final, final row unchanged, is the bounce step, the bounce step is sound) in SQL."""
    finals = ", ".join(f"'{r}'" for r in FINAL)
    reasons = ", ".join(f"'{r}'" for r in BOUNCE_REASONS)
    forward = f"""(
    OLD.status = NEW.status
 OR (OLD.status = 'pending' AND NEW.status IN ('sending', 'skipped', 'failed'))
 OR (OLD.status = 'sending' AND NEW.status IN ('sent', 'failed', 'pending', 'skipped'))
 OR (OLD.status = 'sent' AND NEW.status = 'bounced')
 OR (OLD.status IN ('skipped', 'failed') AND COALESCE(OLD.reason, '') NOT IN ({finals})
     AND NEW.status IN ('pending', 'skipped', 'failed'))
)"""
    final = (f"(OLD.status IN ('sent', 'bounced') "
             f"OR (OLD.status IN ('skipped', 'failed') AND COALESCE(OLD.reason, '') IN ({finals})))")
    unchanged = " AND ".join(_same(dialect, c) for c in FIXED)
    unchanged = (f"({unchanged} AND ({_same(dialect, 'message_path')} "
                 "OR (OLD.status = 'sent' AND OLD.message_path IS NULL)))")
    bounce_step = "(OLD.status = 'sent' AND NEW.status = 'bounced')"
    kept = " AND ".join(_same(dialect, c) for c in (*FIXED, "message_path") if c not in BOUNCE_SETS)
    sound = (f"({kept} AND NEW.reason IN ({reasons}) AND NEW.bounced_at IS NOT NULL "
             "AND OLD.bounced_at IS NULL)")
    return forward, final, unchanged, bounce_step, sound


def trigger_statements(dialect: str) -> list[str]:
    """The triggers of this revision: 0004's, with the one step sent -> bounced and bounced rows final."""
    forward, final, unchanged, bounce_step, sound = _conditions(dialect)
    if dialect == "sqlite":
        return [
            "DROP TRIGGER IF EXISTS delivery_forward_only",
            "DROP TRIGGER IF EXISTS delivery_final_is_fixed",
            "DROP TRIGGER IF EXISTS delivery_bounce_is_sound",
            "DROP TRIGGER IF EXISTS delivery_never_deleted",
            f"""CREATE TRIGGER delivery_forward_only BEFORE UPDATE ON delivery
FOR EACH ROW WHEN NOT {forward}
BEGIN SELECT RAISE(ABORT, '{FORWARD}'); END""",
            f"""CREATE TRIGGER delivery_final_is_fixed BEFORE UPDATE ON delivery
FOR EACH ROW WHEN OLD.status = NEW.status AND {final} AND NOT {unchanged}
BEGIN SELECT RAISE(ABORT, '{FIXED_MESSAGE}'); END""",
            f"""CREATE TRIGGER delivery_bounce_is_sound BEFORE UPDATE ON delivery
FOR EACH ROW WHEN {bounce_step} AND NOT {sound}
BEGIN SELECT RAISE(ABORT, '{BOUNCE_MESSAGE}'); END""",
            f"""CREATE TRIGGER delivery_never_deleted BEFORE DELETE ON delivery
FOR EACH ROW BEGIN SELECT RAISE(ABORT, '{NEVER_DELETED}'); END""",
        ]
    if dialect == "postgresql":
        # The triggers of 0004 already call this function: replacing it is enough.
        return [f"""CREATE OR REPLACE FUNCTION delivery_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP IN ('DELETE', 'TRUNCATE') THEN
    RAISE EXCEPTION USING MESSAGE = '{NEVER_DELETED}';
  END IF;
  IF NOT {forward} THEN
    RAISE EXCEPTION USING MESSAGE = '{FORWARD}: ' || OLD.status || ' -> ' || NEW.status;
  END IF;
  IF {bounce_step} THEN
    IF NOT {sound} THEN
      RAISE EXCEPTION USING MESSAGE = '{BOUNCE_MESSAGE}: delivery ' || OLD.id;
    END IF;
  ELSIF {final} AND NOT {unchanged} THEN
    RAISE EXCEPTION USING MESSAGE = '{FIXED_MESSAGE}: delivery ' || OLD.id || ' is ' || OLD.status;
  END IF;
  RETURN NEW;
END $$"""]
    raise NotImplementedError(f"the ledger supports SQLite and PostgreSQL, not {dialect}")


OLD_STATUS_CHECK = "CHECK (status IN ('pending', 'sending', 'sent', 'failed', 'skipped'))"


def _widen_sqlite_status_check() -> None:
    """SQLite: admit ``bounced`` in ``ck_delivery_status`` in place, by SQLite's documented procedure for a
    schema change that leaves the stored rows as they are (https://sqlite.org/lang_altertable.html, "making
    other kinds of table schema changes"): the table's CREATE statement in sqlite_schema gets the wider
    CHECK, the schema version moves on, and the integrity check must pass. No row, id, index or trigger is
    touched; the rows already satisfy the wider constraint."""
    conn = op.get_bind()
    created = conn.exec_driver_sql("SELECT sql FROM sqlite_schema WHERE type = 'table' AND name = 'delivery'").scalar()
    if created.count(OLD_STATUS_CHECK) != 1:
        raise RuntimeError(f"delivery's status check is not the one revision 0001 made: {created!r}")
    version = conn.exec_driver_sql("PRAGMA schema_version").scalar()
    conn.exec_driver_sql("PRAGMA writable_schema = ON")
    conn.exec_driver_sql("UPDATE sqlite_schema SET sql = ? WHERE type = 'table' AND name = 'delivery'",
                         (created.replace(OLD_STATUS_CHECK, f"CHECK ({STATUS_CHECK})"),))
    conn.exec_driver_sql(f"PRAGMA schema_version = {version + 1}")
    conn.exec_driver_sql("PRAGMA writable_schema = OFF")
    problems = conn.exec_driver_sql("PRAGMA integrity_check").scalars().all()
    if problems != ["ok"]:
        raise RuntimeError(f"the ledger's integrity check failed after widening the status check: {problems}")


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.add_column("delivery", sa.Column("bounced_at", sa.DateTime(timezone=True), nullable=True))
    if dialect == "sqlite":
        _widen_sqlite_status_check()
    else:
        op.drop_constraint("ck_delivery_status", "delivery", type_="check")
        op.create_check_constraint("ck_delivery_status", "delivery", STATUS_CHECK)
    for statement in trigger_statements(dialect):
        op.execute(statement)
    op.create_table(
        "bounce_report",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("delivery_id", sa.Integer, nullable=False),
        sa.Column("effect", sa.String(10), nullable=False),
        sa.Column("kind", sa.String(10), nullable=False),
        sa.Column("recipient", sa.String(254), nullable=True),
        sa.Column("status_code", sa.String(16), nullable=True),
        sa.Column("diagnostic", sa.Text, nullable=True),
        sa.Column("report_message_id", sa.String(250), nullable=True),
        sa.Column("run_id", sa.String(250), nullable=True),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("applied_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("raw", sa.LargeBinary, nullable=True),
        sa.Column("raw_path", sa.String(1024), nullable=True),
        sa.UniqueConstraint("sha256", "delivery_id", name="uq_bounce_report"),
        sa.CheckConstraint("effect IN ('bounced', 'noted')", name="ck_bounce_report_effect"),
    )
    op.create_index("ix_bounce_report_delivery_id", "bounce_report", ["delivery_id"])


def downgrade() -> None:
    raise NotImplementedError("the ledger is an audit history: it is never downgraded")
