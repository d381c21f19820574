"""What real ERPs and relays do that a happy path never shows, through the pipeline, on SQLite and
PostgreSQL, with a real aiosmtpd server whose EHLO and answers are shaped on purpose.

Each test asserts the ledger's rows, what arrived at the server, and that no row is left ``sending``:
templates that fail at run time, unknown template values, runaway templates, internationalised
addresses, unusual EHLO keywords, a relay that refuses the account, recipients accepted before a
later failure, documents that change in the ERP under a running night, repeated previews, and a
locale the project has no labels for.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from datetime import UTC, datetime

import pytest
from sqlalchemy import select, update

from dev.smtp_sink import SmtpSink
from include.invoice_mailing import i18n, ledger, pipeline, source
from include.invoice_mailing.deliver import SmtpSender
from include.invoice_mailing.render import Budget, Renderer
from tests.conftest import smtp_connection
from tests.erp import TinyErp

NIGHT = datetime(2026, 11, 24, 1, 0, tzinfo=UTC)


class Night:
    """A tiny ERP, a ledger and an SMTP server; ``run()`` is one night's extract and its task tries."""

    def __init__(self, backend, sink, monkeypatch):
        self.erp_engine, self.ledger_db = backend["engines"]
        self.erp = TinyErp(self.erp_engine)
        self.sink, self.monkeypatch = sink, monkeypatch
        self.renderer = Renderer()
        self.relay(sink.port)

    def relay(self, port: int, **connection) -> None:
        value = json.loads(smtp_connection(port, timeout=2))
        value.update(connection)
        self.monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps(value))

    def run(self, run_id: str = "scheduled__2026-11-24", conf: dict | None = None, *, tries: int = 3,
            settings: pipeline.BatchSettings | None = None, before_mail=None, between_tries=None) -> int:
        """Extract once, then run the one batch's task until it succeeds, as Airflow's retries would
        (on the same extracted batch); returns the tries it took."""
        ctx = pipeline.RunContext.from_airflow(run_id, NIGHT, NIGHT, conf or {})
        batches = pipeline.extract(self.erp_engine, self.ledger_db, ctx, max_batches=1)
        if before_mail:
            before_mail()
        for attempt in range(1, tries + 1):
            try:
                for batch in batches:
                    with SmtpSender(backoff=0.0) as sender:
                        pipeline.mail_batch(self.erp_engine, self.ledger_db, ctx, batch, renderer=self.renderer,
                                            sender=sender, settings=settings)
                return attempt
            except pipeline.DeliveriesPending:
                if between_tries:
                    between_tries()
                continue
        return tries + 1

    def rows(self, **where) -> list[dict]:
        found = ledger.all_deliveries(self.ledger_db)
        return [r for r in found if all(r[k] == v for k, v in where.items())]

    def status(self) -> dict[tuple[str, str], tuple]:
        """(document, recipient) -> (status, reason); and no row may be left 'sending'."""
        rows = self.rows()
        assert not [r for r in rows if r["status"] == "sending"], "a row was left sending"
        return {(r["ref_nbr"], r["recipient"]): (r["status"], r["reason"]) for r in rows}

    def arrived(self) -> Counter:
        """(document, envelope recipient) -> how often it arrived."""
        return Counter((m.message["X-Invoice-Document"].split()[-1], rcpt)
                       for m in self.sink.received for rcpt in m.envelope_to)


@pytest.fixture
def night(backend, sink, monkeypatch) -> Night:
    return Night(backend, sink, monkeypatch)


def customer_with_template(night: Night, customer_id: str, email: str, template_id: str | None = None,
                           **customer) -> None:
    night.erp.customer(customer_id, invoice_email=email, **customer)
    setting = night.erp.setting(customer_id=customer_id, **({"template_id": template_id} if template_id else {}))
    night.erp.recipient(setting, "Invoicing")


def kari_and_post(night: Night) -> None:
    """Customer 10001 with its invoicing contact in To and its main address in Cc, and one invoice."""
    night.erp.customer("10001", invoice_email="kari@bolgen.example", email="post@bolgen.example")
    setting = night.erp.setting(customer_id="10001")
    night.erp.recipient(setting, "Invoicing", "To")
    night.erp.recipient(setting, "Customer", "Cc")
    night.erp.invoice("INV000101", "10001")


# --- Templates ----------------------------------------------------------------------------------

def test_templates_that_fail_at_run_time_fail_their_document_and_the_rest_of_the_batch_goes_out(night):
    night.erp.template("DivideByZero", "", "Invoice {{ document.number }}", "<p>{{ 100 / 0 }}</p>")
    night.erp.template("ShortFormat", "nb_NO", "{{ '%s of %s' % document.number }}", "<p>x</p>")
    customer_with_template(night, "10001", "a@bolgen.example", "DivideByZero")  # first in the batch
    customer_with_template(night, "10002", "b@havet.example", "ShortFormat")
    customer_with_template(night, "10003", "c@fjellet.example")
    for ref, customer in (("INV000101", "10001"), ("INV000102", "10002"), ("INV000103", "10003")):
        night.erp.invoice(ref, customer)

    assert night.run() == 1

    assert night.arrived() == {("INV000103", "c@fjellet.example"): 1}
    status = night.status()
    assert status[("INV000101", "a@bolgen.example")] == ("failed", "config_error")
    assert status[("INV000102", "b@havet.example")] == ("failed", "config_error")
    [first] = night.rows(ref_nbr="INV000101")
    assert "'DivideByZero' (default)" in first["detail"] and "ZeroDivisionError" in first["detail"]
    [second] = night.rows(ref_nbr="INV000102")
    assert "'ShortFormat' (nb_NO)" in second["detail"] and "TypeError" in second["detail"]


def test_a_template_value_that_does_not_exist_is_named_and_the_erp_column_names_work(night):
    night.erp.template("ErpNames", "", "{{ document.doc_type }} {{ document.ref_nbr }} of {{ document.doc_date }} "
                       "from {{ sender.display_name }}", "<p>{{ customer.customer_id }}: {{ document.amount }}</p>")
    night.erp.template("Typo", "", "Invoice {{ document.refnr }} from {{ sender.name }}", "<p>x</p>")
    customer_with_template(night, "10001", "a@bolgen.example", "ErpNames")
    customer_with_template(night, "10002", "b@havet.example", "Typo")
    night.erp.invoice("INV000101", "10001")
    night.erp.invoice("INV000102", "10002")

    night.run()

    [message] = [m.message for m in night.sink.received]
    assert message["Subject"] == "INV INV000101 of 22.11.2026 from Fjordlys Faktura"
    assert "10001: 458,85" in message.get_body(("plain",)).get_content()
    assert night.status()[("INV000102", "b@havet.example")] == ("failed", "config_error")
    [typo] = night.rows(ref_nbr="INV000102")
    assert "document.refnr is undefined" in typo["detail"] and "'Typo'" in typo["detail"]


@pytest.mark.parametrize("body, complaint", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "ran for more than 0.5 s"),
    ("{{ 'invoice ' * 10000000 }}", "larger than 100000 bytes"),
    ("{% for i in range(1000) %}{{ document.lines }}{{ document.lines }}{% endfor %}", "more than 100000 bytes"),
])
def test_a_template_that_runs_away_is_a_config_error_within_its_budget(night, body, complaint):
    night.renderer = Renderer(notification_budget=Budget(seconds=0.5, max_bytes=100_000))
    night.erp.template("Runaway", "", "Invoice {{ document.number }}", body)
    customer_with_template(night, "10001", "a@bolgen.example", "Runaway")
    customer_with_template(night, "10002", "b@havet.example")
    night.erp.invoice("INV000101", "10001")
    night.erp.invoice("INV000102", "10002")

    night.run()

    assert night.arrived() == {("INV000102", "b@havet.example"): 1}
    [runaway] = night.rows(ref_nbr="INV000101")
    assert (runaway["status"], runaway["reason"]) == ("failed", "config_error")
    assert complaint in runaway["detail"]
    night.status()


# --- Addresses ----------------------------------------------------------------------------------

def test_an_internationalised_domain_goes_out_in_ascii_and_only_a_unicode_local_part_needs_smtputf8(night):
    night.sink.faults.ehlo_drop = {"SMTPUTF8"}
    night.erp.customer("10001", invoice_email="ordre@sjømat.no", email="ORDRE@xn--sjmat-wua.no")
    lise = night.erp.contact("10001", "åse@sjømat.no", "Åse Fiskum")
    setting = night.erp.setting(customer_id="10001")
    night.erp.recipient(setting, "Invoicing", "To")
    night.erp.recipient(setting, "Customer", "Cc")  # the same mailbox, written in its A-label form
    night.erp.recipient(setting, "Contact", "Cc", contact_id=lise)
    night.erp.invoice("INV000101", "10001")

    night.run()

    [message] = night.sink.received
    assert message.envelope_to == ["ordre@xn--sjmat-wua.no"]  # once, in ASCII, without SMTPUTF8
    assert message.data.split(b"\r\n\r\n")[0].isascii()  # every header in ASCII
    assert message.message["To"].addresses[0].addr_spec == "ordre@xn--sjmat-wua.no"
    assert message.message["Cc"] is None  # the relay cannot carry åse@ tonight
    assert night.status() == {
        ("INV000101", "ordre@sjømat.no"): ("sent", None),  # the ledger shows the address as the ERP wrote it
        ("INV000101", "åse@sjømat.no"): ("failed", "smtputf8_unsupported"),
    }

    night.sink.faults.ehlo_drop = set()  # the relay is fixed: the next night re-decides and sends
    night.run("scheduled__2026-11-25")

    assert night.arrived()[("INV000101", "åse@sjømat.no")] == 1
    assert night.status()[("INV000101", "åse@sjømat.no")] == ("sent", None)
    assert len(night.sink.received) == 2


def test_a_sender_at_an_internationalised_domain_gets_a_message_id_in_ascii(night):
    """Issue 31, finding 6: the Message-ID took the account's domain as the ERP writes it (``bølgen.no``); a
    message whose other headers are ASCII then failed to serialize after its rows were claimed."""
    with night.erp_engine.begin() as conn:
        conn.execute(update(source.erp.tables["email_account"]).values(address="faktura@bølgen.no"))
    kari_and_post(night)

    night.run()

    [message] = night.sink.received
    assert message.message["Message-ID"].endswith("@xn--blgen-vua.no>")
    assert message.message["From"].addresses[0].addr_spec == "faktura@xn--blgen-vua.no"
    assert message.data.split(b"\r\n\r\n")[0].isascii()
    assert set(night.status().values()) == {("sent", None)}


def test_control_characters_from_the_erp_reach_no_header(night):
    """Issue 31, finding 6: every header built from ERP data keeps to what RFC 5322 allows. A name's or a
    document number's CR, LF, ESC, BEL or DEL is folded or left out, and the message goes out."""
    night.erp.template("Named", "", "Faktura {{ document.number }} til {{ customer.name }}", "<p>x</p>")
    night.erp.customer("10001", "Bølgen\x07 Kafé\x1b[31m AS\x7f")
    kari = night.erp.contact("10001", "kari@bolgen.example", "Kari\r\nBcc: eve@evil.example\x1b Nordmann")
    setting = night.erp.setting(customer_id="10001", template_id="Named")
    night.erp.recipient(setting, "Contact", "To", contact_id=kari)
    night.erp.invoice("INV\r\n101>\x1b", "10001")

    night.run()

    [message] = night.sink.received
    assert message.envelope_to == ["kari@bolgen.example"]
    headers = message.message.items()
    assert [(name, value) for name, value in headers if any(unicodedata.category(c) == "Cc" for c in value)] == []
    assert message.message["To"].addresses[0].display_name == "Kari Bcc: eve@evil.example Nordmann"
    assert message.message["Subject"].endswith("til Bølgen Kafé[31m AS")
    assert message.message["X-Invoice-Document"] == "INV INV 101>"
    assert message.message["Message-ID"].startswith("<INV-101.pdf.")
    assert [r["status"] for r in night.rows()] == ["sent"]


def test_a_message_that_cannot_be_built_fails_its_document_and_the_batch_goes_on(night, monkeypatch):
    """Issue 31, finding 6: a header error raised after the claim left the row ``sending`` and stopped the
    batch. Whatever building the message raises is now that document's ``config_error``."""
    from include.invoice_mailing import sending

    def build(**values):
        if values["document_ref"].endswith("INV000101"):
            raise ValueError("Header values may not contain linefeed or carriage return characters")
        return build_message(**values)

    build_message = sending.build_message
    monkeypatch.setattr(sending, "build_message", build)
    customer_with_template(night, "10001", "a@bolgen.example")
    customer_with_template(night, "10002", "b@havet.example")
    night.erp.invoice("INV000101", "10001")
    night.erp.invoice("INV000102", "10002")

    assert night.run() == 1

    assert night.arrived() == {("INV000102", "b@havet.example"): 1}
    assert night.status()[("INV000101", "a@bolgen.example")] == ("failed", "config_error")
    [unbuilt] = night.rows(ref_nbr="INV000101")
    assert unbuilt["detail"] == ("the message could not be built from the ERP's data: ValueError: Header values "
                                 "may not contain linefeed or carriage return characters")


# --- Relays -------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [
    {"ehlo_replace": {"SIZE": "SIZE"}},          # RFC 1870: SIZE without a number
    {"ehlo_replace": {"SIZE": "SIZE 0"}},        # Postfix with message_size_limit = 0
    {"ehlo_add": ["X-EXPS GSSAPI NTLM", "XFORWARD NAME ADDR", "PIPELINING"]},
])
def test_unusual_ehlo_keywords_do_not_stop_the_mail(night, shape):
    for key, value in shape.items():
        setattr(night.sink.faults, key, value)
    customer_with_template(night, "10001", "a@bolgen.example")
    night.erp.invoice("INV000101", "10001")

    assert night.run() == 1
    assert night.arrived() == {("INV000101", "a@bolgen.example"): 1}
    assert night.status() == {("INV000101", "a@bolgen.example"): ("sent", None)}


def test_a_relay_that_refuses_the_sender_fails_the_account_not_the_recipients_for_good(night):
    night.sink.faults.mail_replies = ["550 5.7.1 faktura@fjordlys.example: Sender address rejected"]
    customer_with_template(night, "10001", "a@bolgen.example")
    night.erp.invoice("INV000101", "10001")

    assert night.run() == 1
    [row] = night.rows()
    assert (row["status"], row["reason"]) == ("failed", "sender_rejected")
    assert "email account 1 <faktura@fjordlys.example>" in row["detail"]
    assert "SMTP connection 'smtp_default'" in row["detail"] and "550 5.7.1" in row["detail"]
    assert night.sink.received == []

    night.run("scheduled__2026-11-25")  # the postmaster allowed the sender: the next night sends
    assert night.arrived() == {("INV000101", "a@bolgen.example"): 1}
    night.status()


def test_a_refused_login_and_a_missing_login_are_auth_failed_and_re_decided(night, monkeypatch):
    customer_with_template(night, "10001", "a@bolgen.example")
    night.erp.invoice("INV000101", "10001")
    with SmtpSink(logins={"faktura": "s3cret"}) as relay:
        night.sink = relay
        night.relay(relay.port, login="faktura", password="wrong")  # 535 to AUTH
        night.run()
        [row] = night.rows()
        assert (row["status"], row["reason"]) == ("failed", "auth_failed")
        assert "535" in row["detail"] and "SMTP connection 'smtp_default'" in row["detail"]

        night.relay(relay.port)  # no login at all: the relay answers MAIL FROM with 530
        night.run("scheduled__2026-11-25")
        [row] = night.rows()
        assert (row["status"], row["reason"]) == ("failed", "auth_failed")
        assert "530" in row["detail"]
        assert relay.received == []

        night.relay(relay.port, login="faktura", password="s3cret")  # credentials rotated
        night.run("scheduled__2026-11-26")
        assert night.arrived() == {("INV000101", "a@bolgen.example"): 1}
        assert night.status() == {("INV000101", "a@bolgen.example"): ("sent", None)}


def test_recipients_accepted_by_an_earlier_attempt_stay_sent_when_a_later_attempt_fails(night):
    faults = night.sink.faults
    faults.rcpt_queue = {"post@bolgen.example": ["451 4.2.0 Mailbox busy"]}
    faults.mail_replies = [None, "550 5.7.1 Sender address rejected"]  # the in-task retry for the Cc is refused
    kari_and_post(night)

    night.run()

    assert night.arrived() == {("INV000101", "kari@bolgen.example"): 1}
    assert night.status() == {("INV000101", "kari@bolgen.example"): ("sent", None),
                              ("INV000101", "post@bolgen.example"): ("failed", "sender_rejected")}


# --- The ERP changes under a running night ------------------------------------------------------

def test_a_document_voided_or_marked_dont_email_after_extract_is_not_sent(night):
    customer_with_template(night, "10001", "a@bolgen.example")
    for ref in ("INV000101", "INV000102", "INV000103"):
        night.erp.invoice(ref, "10001")

    def clerk_edits_the_erp():
        with night.erp_engine.begin() as conn:
            conn.execute(update(source.invoice).where(source.invoice.c.ref_nbr == "INV000101").values(status="Voided"))
            conn.execute(update(source.invoice).where(source.invoice.c.ref_nbr == "INV000102").values(dont_email=True))

    night.run(before_mail=clerk_edits_the_erp)

    assert night.arrived() == {("INV000103", "a@bolgen.example"): 1}
    status = night.status()
    assert status[("INV000101", "")] == ("skipped", "no_longer_due")
    assert status[("INV000102", "")] == ("skipped", "no_longer_due")
    assert "Voided" in night.rows(ref_nbr="INV000101")[0]["detail"]


def test_a_retry_after_the_document_was_emailed_by_hand_skips_what_is_still_pending(night):
    night.sink.faults.rcpt_queue = {"post@bolgen.example": ["451 4.2.0 Mailbox busy"] * 3}
    kari_and_post(night)

    def clerk_mails_it_by_hand():  # while the task waits for its retry
        with night.erp_engine.begin() as conn:
            conn.execute(update(source.invoice).values(emailed=True))

    assert night.run(between_tries=clerk_mails_it_by_hand) == 2  # the Cc was deferred; the retry ends it

    assert night.arrived() == {("INV000101", "kari@bolgen.example"): 1}
    assert night.status()[("INV000101", "post@bolgen.example")] == ("skipped", "no_longer_due")


def test_write_back_waits_until_every_delivery_of_the_document_is_settled(night):
    night.sink.faults.rcpt_queue = {"post@bolgen.example": ["451 4.2.0 Mailbox busy"] * 3}
    kari_and_post(night)
    write_back = pipeline.BatchSettings(write_back=True)

    def emailed() -> bool:
        with night.erp_engine.connect() as conn:
            return conn.execute(select(source.invoice.c.emailed)).scalar_one()

    assert night.run(tries=1, settings=write_back) == 2
    assert emailed() is False  # the Cc is still to be sent: the ERP must not think it is done
    assert night.run(settings=write_back) == 1
    assert emailed() is True
    assert night.arrived() == {("INV000101", "kari@bolgen.example"): 1, ("INV000101", "post@bolgen.example"): 1}


# --- Previews and locales -----------------------------------------------------------------------

def test_a_second_redirected_preview_previews_again(night):
    customer_with_template(night, "10001", "a@bolgen.example")
    night.erp.invoice("INV000101", "10001")
    preview = {"redirect_to": "test@fjordlys.example"}

    night.run("manual__preview-1", preview)
    night.run("manual__preview-2", preview)

    assert [m.envelope_to for m in night.sink.received] == [["test@fjordlys.example"]] * 2
    assert len({m.message["Message-ID"] for m in night.sink.received}) == 2
    rows = night.rows(mode="redirect")
    assert [(r["generation"], r["status"], r["run_id"]) for r in rows] == [
        (0, "sent", "manual__preview-1"), (1, "sent", "manual__preview-2")]
    assert night.rows(mode="live") == []  # the customer has still not been mailed


def test_a_locale_without_a_catalog_gets_its_own_numbers_and_english_labels(night, caplog):
    i18n.catalog_locale.cache_clear()  # it warns once per worker process
    night.erp.template("Totals", "", "{{ document.type_label }} {{ document.number }}",
                       "<p>{{ document.total }} / {{ document.date }}</p>")
    customer_with_template(night, "10001", "a@bolgen.example", "Totals", locale="de_DE")
    night.erp.invoice("INV000101", "10001", lines=((1, "Kaffeemaschine", "1", "1234.50", "0"),))

    with caplog.at_level("WARNING"):
        night.run()

    [message] = [m.message for m in night.sink.received]
    assert message["Subject"] == "Invoice INV000101"
    assert "1.234,50" in message.get_body(("plain",)).get_content()
    assert "22.11.26" in message.get_body(("plain",)).get_content()
    assert "No catalog for locale 'de_DE'" in caplog.text
    night.status()
