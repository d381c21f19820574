"""The ledger's schema changes only through Alembic: a ledger made by release 1 upgrades in place."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import insert, select, text, update
from sqlalchemy.exc import DBAPIError

from include.invoice_mailing import ledger, migrations
from include.invoice_mailing.ledger import delivery, mailing_run

FIXTURES = Path(__file__).parent / "fixtures"
STAMP = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)
LATER_COLUMNS = ("message_sha256", "message_path", "bounced_at")  # revisions 0003 and 0006


def release_1_ledger(engine) -> None:
    """The schema exactly as release 1's ``create_all`` made it (dumped from that release)."""
    sql = (FIXTURES / f"ledger_v1.{engine.dialect.name}.sql").read_text()
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.connection.executescript(sql)
        else:
            conn.exec_driver_sql(sql)


def release_1_rows(engine) -> list[dict]:
    """The delivery rows as release 1's columns show them (later revisions only add columns)."""
    with engine.connect() as conn:
        columns = [c.name for c in delivery.columns if c.name not in LATER_COLUMNS]
        return [dict(r) for r in conn.execute(select(*(delivery.c[c] for c in columns)).order_by(delivery.c.id))
                .mappings()]


def history_row(reason: str, status: str = "failed", recipient: str = "kari@bolgen.example") -> dict:
    return dict(run_id="scheduled__2026-11-24", last_run_id="scheduled__2026-11-24", doc_type="INV",
                ref_nbr="INV000101", customer_id="10001", mailing_id="INVOICE", recipient=recipient,
                recipient_key=recipient, add_to="To", format="PDF", mode="live", generation=0, status=status,
                reason=reason, detail="as release 1 wrote it", message_id="<INV000101.pdf.x@fjordlys.example>",
                attempts=1, created_at=STAMP, updated_at=STAMP)


def test_a_release_1_ledger_is_upgraded_in_place_keeping_its_history(backend):
    engine = backend["engines"][1]
    release_1_ledger(engine)
    with engine.begin() as conn:
        conn.execute(insert(delivery), [
            history_row("recipient_rejected", recipient="a@bolgen.example"),
            history_row("sender_rejected", recipient="b@bolgen.example"),
            history_row(None, status="sent", recipient="c@bolgen.example"),
        ])
        conn.execute(insert(mailing_run).values(run_id="scheduled__2026-11-24", mode="live", params={"dry_run": False},
                                                summary={"by_status": {"sent": 1}}, started_at=STAMP))
    before = release_1_rows(engine)

    assert migrations.upgrade(engine) == migrations.head()

    assert release_1_rows(engine) == before  # nothing rewritten
    # Rows sent before the archive existed say so: no hash, no path (revision 0003).
    assert {(r["message_sha256"], r["message_path"]) for r in ledger.all_deliveries(engine)} == {(None, None)}
    with engine.connect() as conn:
        assert conn.execute(select(mailing_run.c.summary)).scalar_one() == {"by_status": {"sent": 1}}
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one() == migrations.head()
    by_recipient = {r["recipient"]: r["id"] for r in before}
    # Release 1 made a refused sender final; now the account's problem is re-decided next night...
    with engine.begin() as conn:
        conn.execute(update(delivery).where(delivery.c.id == by_recipient["b@bolgen.example"]).values(status="pending"))
    # ...while the server's verdict on a recipient, and a sent delivery, stay final.
    for address in ("a@bolgen.example", "c@bolgen.example"):
        with pytest.raises(DBAPIError, match="may only move forward"), engine.begin() as conn:
            conn.execute(update(delivery).where(delivery.c.id == by_recipient[address]).values(status="pending"))


def test_a_new_ledger_gets_the_schema_the_code_expects(backend):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = backend["engines"][1]
    ledger.ensure_schema(engine)
    ledger.ensure_schema(engine)  # at the head: nothing to do
    with engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), ledger.ledger)
    assert differences == []


def test_after_the_upgrade_a_release_1_ledgers_final_rows_are_fixed_and_nothing_is_deleted(backend):
    engine = backend["engines"][1]
    release_1_ledger(engine)
    with engine.begin() as conn:
        conn.execute(insert(delivery), [
            history_row("recipient_rejected", recipient="a@bolgen.example"),
            {**history_row(None, status="sent", recipient="c@bolgen.example"), "sent_at": STAMP},
            history_row(None, status="pending", recipient="d@bolgen.example"),
        ])
    migrations.upgrade(engine)
    ids = {r["recipient"]: r["id"] for r in release_1_rows(engine)}
    sent, rejected, pending = ids["c@bolgen.example"], ids["a@bolgen.example"], ids["d@bolgen.example"]

    def refused(row_id, match="final delivery is never changed", **values):
        with pytest.raises(DBAPIError, match=match), engine.begin() as conn:
            conn.execute(update(delivery).where(delivery.c.id == row_id).values(**values))

    refused(sent, sent_at=datetime(2026, 11, 25, tzinfo=UTC))
    refused(sent, message_sha256="0" * 64)
    refused(sent, recipient="someone.else@bolgen.example")
    refused(sent, reason="recipient_rejected")
    refused(sent, last_error="rewritten")
    refused(rejected, reason="config_error")
    refused(rejected, detail="rewritten", last_run_id="scheduled__2026-11-25")
    for row_id in (sent, rejected, pending):
        with pytest.raises(DBAPIError, match="never deleted"), engine.begin() as conn:
            conn.execute(delivery.delete().where(delivery.c.id == row_id))
    before = release_1_rows(engine)

    # What the pipeline itself writes still passes: an UPDATE that changes nothing, the archive's
    # path of a sent message once, and anything of a row that is not final.
    with engine.begin() as conn:
        conn.execute(update(delivery).where(delivery.c.id.in_([sent, rejected])).values(mode="live"))
        conn.execute(update(delivery).where(delivery.c.id == pending).values(add_to="Cc", last_run_id="r2"))
    ledger.record_message_path(engine, [sent], "file:///archive/c.eml")
    refused(sent, message_path="file:///archive/elsewhere.eml")
    after = release_1_rows(engine)
    assert [r for r in after if r["id"] != pending] == [r for r in before if r["id"] != pending]
    assert {r["message_path"] for r in ledger.all_deliveries(engine, delivery.c.id == sent)} == {"file:///archive/c.eml"}


def schema_objects(engine) -> dict[str, set[str]]:
    """The triggers and indexes on ``delivery``, by name, as the database lists them."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            found = conn.execute(text("SELECT type, name FROM sqlite_master WHERE tbl_name = 'delivery' "
                                      "AND type IN ('trigger', 'index')")).all()
        else:
            found = [("trigger", n) for n in conn.execute(text(
                "SELECT tgname FROM pg_trigger WHERE tgrelid = 'delivery'::regclass AND NOT tgisinternal")).scalars()]
            found += [("index", n) for n in conn.execute(text(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'delivery'")).scalars()]
    objects: dict[str, set[str]] = {"trigger": set(), "index": set()}
    for kind, name in found:
        objects[kind].add(name)
    return objects


def test_revision_0006_keeps_every_row_id_index_and_trigger_of_a_0005_ledger(backend):
    """0006 widens the status CHECK constraint in place (SQLite has no ALTER for it: its documented schema
    edit; PostgreSQL drops and adds it): no row, id, index or trigger is lost, and on SQLite the table is
    not even copied (the same pages hold it)."""
    engine = backend["engines"][1]
    migrations.upgrade(engine, "0005")
    rows = [{**history_row(reason, status=status, recipient=f"{n}@bolgen.example"), "id": row_id,
             "message_sha256": "ab" * 32 if status == "sent" else None,
             "message_path": f"file:///archive/{n}.eml" if status == "sent" else None,
             "sent_at": STAMP if status == "sent" else None}
            for n, (row_id, status, reason) in enumerate([
                (3, "sent", None), (8, "failed", "recipient_rejected"), (9, "skipped", "no_address"),
                (15, "pending", None), (40, "failed", "config_error")])]
    with engine.begin() as conn:
        conn.execute(insert(delivery), rows)  # the columns given: those of revision 0005
    columns = [c for c in delivery.columns if c.name != "bounced_at"]
    objects = schema_objects(engine)

    def rows_now():
        with engine.connect() as conn:
            return [dict(r) for r in conn.execute(select(*columns).order_by(delivery.c.id)).mappings()]

    def root_page():
        with engine.connect() as conn:
            return conn.exec_driver_sql("SELECT rootpage FROM sqlite_schema WHERE name = 'delivery'").scalar()

    before = rows_now()
    page = root_page() if engine.dialect.name == "sqlite" else None

    assert migrations.upgrade(engine) == migrations.head()

    assert rows_now() == before  # every row, with its id
    if engine.dialect.name == "sqlite":
        assert root_page() == page  # the table itself, not a copy
    after = schema_objects(engine)
    assert after["index"] == objects["index"]
    # The same triggers, and on SQLite one more: the check on the step to bounced.
    assert after["trigger"] - objects["trigger"] <= {"delivery_bounce_is_sound"}
    assert objects["trigger"] <= after["trigger"]
    # ...and they still hold: a sent row is fixed, a server's verdict is final, nothing is deleted.
    with pytest.raises(DBAPIError, match="final delivery is never changed"), engine.begin() as conn:
        conn.execute(update(delivery).where(delivery.c.id == 3).values(detail="rewritten"))
    with pytest.raises(DBAPIError, match="may only move forward"), engine.begin() as conn:
        conn.execute(update(delivery).where(delivery.c.id == 8).values(status="pending"))
    with pytest.raises(DBAPIError, match="never deleted"), engine.begin() as conn:
        conn.execute(delivery.delete().where(delivery.c.id == 15))
    with pytest.raises(DBAPIError), engine.begin() as conn:  # the CHECK constraint still holds
        conn.execute(update(delivery).where(delivery.c.id == 15).values(status="lost"))
    with engine.begin() as conn:  # the unique key still holds too
        ledger._insert_new(conn, {**history_row(None, status="pending", recipient="0@bolgen.example"), "id": 99})
    assert [r["id"] for r in rows_now()] == [3, 8, 9, 15, 40]
    if engine.dialect.name == "sqlite":  # and a new row's id follows the old ones
        with engine.begin() as conn:
            conn.execute(insert(delivery).values(**history_row(None, status="pending", recipient="new@bolgen.example")))
        assert [r["id"] for r in rows_now()][-1] == 41
    # The one new step: a sent delivery may become bounced.
    with engine.begin() as conn:
        conn.execute(update(delivery).where(delivery.c.id == 3)
                     .values(status="bounced", reason="hard_bounce", detail="5.1.1 user unknown", bounced_at=STAMP))
    assert ledger.all_deliveries(engine, delivery.c.id == 3)[0]["status"] == "bounced"


def test_revision_0007_adds_the_mailbox_memory_to_a_0006_ledger_and_changes_nothing_else(backend):
    """0007 (issue 31, finding 3): the messages the bounce reader left for good are remembered, so each is
    parsed once. A ledger at the previous release's revision keeps its rows and gets the new table."""
    from sqlalchemy import inspect

    engine = backend["engines"][1]
    migrations.upgrade(engine, "0006")
    with engine.begin() as conn:
        conn.execute(insert(delivery), [{**history_row(None, status="sent"), "id": 5, "sent_at": STAMP}])
    before = ledger.all_deliveries(engine)
    objects = schema_objects(engine)
    assert "mailbox_message" not in inspect(engine).get_table_names()

    assert migrations.upgrade(engine) == migrations.head() == "0007"

    assert ledger.all_deliveries(engine) == before
    assert schema_objects(engine) == objects  # delivery's triggers and indexes, as they were
    ledger.remember_mailbox_message(engine, "bounce mailbox mailing_bounces (b@h:143) INBOX", 1701, 7, "other", "x")
    ledger.remember_mailbox_message(engine, "bounce mailbox mailing_bounces (b@h:143) INBOX", 1701, 7, "other", "x")
    assert ledger.mailbox_messages_read(engine, "bounce mailbox mailing_bounces (b@h:143) INBOX", 1701) == {7}
    assert ledger.mailbox_messages_read(engine, "bounce mailbox mailing_bounces (b@h:143) INBOX", 1702) == set()
