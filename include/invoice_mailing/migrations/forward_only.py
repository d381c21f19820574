"""The trigger that lets a delivery's status move only forward, as each migration states it.

A migration passes the reasons that are final in its revision; this module only turns them into
the trigger's DDL for SQLite and PostgreSQL. Changing the final reasons is a new migration.
"""

from __future__ import annotations

MESSAGE = "delivery status may only move forward"


def condition(final_reasons: tuple[str, ...]) -> str:
    finals = ", ".join(f"'{r}'" for r in final_reasons)
    return f"""(
    (OLD.status = NEW.status AND OLD.status <> 'sent')
 OR (OLD.status = 'pending' AND NEW.status IN ('sending', 'skipped', 'failed'))
 OR (OLD.status = 'sending' AND NEW.status IN ('sent', 'failed', 'pending', 'skipped'))
 OR (OLD.status IN ('skipped', 'failed') AND COALESCE(OLD.reason, '') NOT IN ({finals})
     AND NEW.status IN ('pending', 'skipped', 'failed'))
)"""


def create(dialect: str, final_reasons: tuple[str, ...]) -> list[str]:
    """Statements that (re)create the trigger on ``delivery``."""
    if dialect == "sqlite":
        return ["DROP TRIGGER IF EXISTS delivery_forward_only", f"""
CREATE TRIGGER delivery_forward_only BEFORE UPDATE OF status ON delivery
FOR EACH ROW WHEN NOT {condition(final_reasons)}
BEGIN SELECT RAISE(ABORT, '{MESSAGE}'); END"""]
    if dialect == "postgresql":
        return [f"""
CREATE OR REPLACE FUNCTION delivery_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF NOT {condition(final_reasons)} THEN
    RAISE EXCEPTION USING MESSAGE = '{MESSAGE}: ' || OLD.status || ' -> ' || NEW.status;
  END IF;
  RETURN NEW;
END $$""", "DROP TRIGGER IF EXISTS delivery_forward_only ON delivery", """
CREATE TRIGGER delivery_forward_only BEFORE UPDATE OF status ON delivery
FOR EACH ROW EXECUTE FUNCTION delivery_forward_only()"""]
    raise NotImplementedError(f"the ledger supports SQLite and PostgreSQL, not {dialect}")
