"""VERP sending (spec section 9): with the connection ``mailing_bounces``, each delivery in its own SMTP
transaction with an envelope sender of its own, DSN asked for where the relay offers it.

Through the pipeline, on SQLite and PostgreSQL, against the real aiosmtpd sink, which records each
transaction's envelope and its MAIL FROM and RCPT TO parameters.
"""

from __future__ import annotations

import json

import pytest

from dev.smtp_sink import SmtpSink
from include.invoice_mailing import pipeline
from include.invoice_mailing.bounces import BOUNCE_KEY_VARIABLE, delivery_of
from tests.test_quirks import Night, kari_and_post

BOUNCES = "bounces@fjordlys.example"
KEY = b"k" * 32
KARI, POST = ("INV000101", "kari@bolgen.example"), ("INV000101", "post@bolgen.example")


@pytest.fixture
def dsn_sink():
    with SmtpSink(dsn=True) as server:
        yield server


@pytest.fixture(params=["waits", "pipelines"])
def relay(request):
    """A relay without PIPELINING (each command waits for its answer), then one offering it (and DSN)."""
    with SmtpSink(dsn=request.param == "pipelines") as server:
        yield server


def verp_night(backend, sink, monkeypatch) -> tuple[Night, pipeline.BatchSettings]:
    night = Night(backend, sink, monkeypatch)
    kari_and_post(night)
    return night, pipeline.BatchSettings(verp=pipeline.Verp(BOUNCES, KEY))


def addresses(message, header: str) -> list[str]:
    return [a.addr_spec for a in message[header].addresses]


def ids_by_recipient(night: Night) -> dict[str, int]:
    return {r["recipient"]: r["id"] for r in night.rows()}


def test_each_delivery_goes_out_in_its_own_transaction_with_its_own_signed_sender(backend, sink, monkeypatch):
    night, settings = verp_night(backend, sink, monkeypatch)

    night.run(settings=settings)

    assert night.status() == {KARI: ("sent", None), POST: ("sent", None)}
    assert [m.envelope_to for m in sink.received] == [["kari@bolgen.example"], ["post@bolgen.example"]]
    ids = ids_by_recipient(night)
    for received in sink.received:
        assert delivery_of(received.envelope_from, BOUNCES, KEY) == ids[received.envelope_to[0]]
    assert sink.received[0].envelope_from != sink.received[1].envelope_from
    # One message: the same bytes and Message-ID, To and Cc both named, From the account's own address.
    assert sink.received[0].data == sink.received[1].data
    message = sink.received[0].message
    assert (addresses(message, "To"), addresses(message, "Cc")) == (["kari@bolgen.example"], ["post@bolgen.example"])
    assert addresses(message, "From") == ["faktura@fjordlys.example"]
    assert {r["message_id"] for r in night.rows()} == {message["Message-ID"]}


def test_a_relay_offering_dsn_is_asked_for_failure_and_delay_notices_with_headers_only(backend, dsn_sink,
                                                                                      monkeypatch):
    night, settings = verp_night(backend, dsn_sink, monkeypatch)

    night.run(settings=settings)

    assert len(dsn_sink.received) == 2
    for received in dsn_sink.received:
        token = received.envelope_from.partition("+")[2].partition("@")[0]
        assert "RET=HDRS" in received.mail_options
        assert f"ENVID={token}".upper() in received.mail_options  # aiosmtpd hands parameters over upper-cased
        assert received.rcpt_options == [["NOTIFY=FAILURE,DELAY"]]


def test_a_relay_without_dsn_gets_no_dsn_parameters(backend, sink, monkeypatch):
    night, settings = verp_night(backend, sink, monkeypatch)

    night.run(settings=settings)

    assert len(sink.received) == 2
    for received in sink.received:
        assert not [o for o in received.mail_options if o.startswith(("RET=", "ENVID="))]
        assert received.rcpt_options == [[]]


def test_without_mailing_bounces_one_transaction_from_the_account_and_no_dsn(backend, dsn_sink, monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_MAILING_BOUNCES", raising=False)
    night = Night(backend, dsn_sink, monkeypatch)
    kari_and_post(night)

    night.run(settings=pipeline.BatchSettings(verp=pipeline.Verp.from_deployment()))

    assert night.status() == {KARI: ("sent", None), POST: ("sent", None)}
    [received] = dsn_sink.received
    assert received.envelope_from == "faktura@fjordlys.example"
    assert received.envelope_to == ["kari@bolgen.example", "post@bolgen.example"]
    assert not [o for o in received.mail_options if o.startswith(("RET=", "ENVID="))]
    assert received.rcpt_options == [[], []]


def test_a_recipient_refused_in_its_transaction_leaves_the_other_delivery_sent(backend, relay, monkeypatch):
    sink = relay
    night, settings = verp_night(backend, sink, monkeypatch)
    sink.faults.rcpt_replies = {"kari@bolgen.example": "550 5.1.1 <kari@bolgen.example>: User unknown"}

    night.run(settings=settings)

    assert night.status() == {KARI: ("failed", "recipient_rejected"), POST: ("sent", None)}
    assert [m.envelope_to for m in sink.received] == [["post@bolgen.example"]]
    assert delivery_of(sink.received[0].envelope_from, BOUNCES, KEY) == ids_by_recipient(night)["post@bolgen.example"]
    message = sink.received[0].message
    assert (addresses(message, "To"), addresses(message, "Cc")) == (["kari@bolgen.example"], ["post@bolgen.example"])


def test_a_deferred_recipient_is_retried_alone_and_the_other_is_not_sent_twice(backend, relay, monkeypatch):
    sink = relay
    night, settings = verp_night(backend, sink, monkeypatch)
    sink.faults.rcpt_queue = {"kari@bolgen.example": ["451 4.2.0 try later"] * 3}  # the first try's attempts

    assert night.run(settings=settings) == 2

    assert night.status() == {KARI: ("sent", None), POST: ("sent", None)}
    assert night.arrived() == {KARI: 1, POST: 1}
    ids = ids_by_recipient(night)
    assert {delivery_of(m.envelope_from, BOUNCES, KEY): m.envelope_to for m in sink.received} == {
        ids["kari@bolgen.example"]: ["kari@bolgen.example"], ids["post@bolgen.example"]: ["post@bolgen.example"]}


def test_a_relay_offering_pipelining_gets_mail_and_rcpt_in_one_write_and_others_one_command_at_a_time(
        backend, relay, monkeypatch):
    """RFC 2920: with PIPELINING, a transaction's RCPT TO is already at the relay when it answers MAIL FROM
    (one round trip, not two); without it the client waits for each answer."""
    night, settings = verp_night(backend, relay, monkeypatch)
    relay.faults.mail_delays = [0.3, 0.3]  # time enough for whatever the client sent at once to arrive

    night.run(settings=settings)

    assert night.status() == {KARI: ("sent", None), POST: ("sent", None)}
    pipelines = "PIPELINING" in relay.faults.ehlo_add
    for waiting, received in zip(relay.waiting_at_mail, relay.received, strict=True):
        rcpt = f"RCPT TO:<{received.envelope_to[0]}>".upper().encode()
        assert (rcpt in waiting.upper()) == pipelines, waiting
        assert b"DATA" not in waiting.upper()  # DATA waits for its recipients' answers


def test_a_sender_refused_in_a_pipelined_transaction_fails_that_delivery_and_the_session_goes_on(
        backend, dsn_sink, monkeypatch):
    night, settings = verp_night(backend, dsn_sink, monkeypatch)
    dsn_sink.faults.mail_replies = ["553 5.7.1 <bounces@fjordlys.example>: Sender address rejected"]

    night.run(settings=settings)

    statuses = night.status()
    assert sorted(statuses.values()) == [("failed", "sender_rejected"), ("sent", None)], statuses
    assert len(dsn_sink.received) == 1 and dsn_sink.peak_sessions == 1


def test_mailing_bounces_without_a_key_is_a_config_error_and_nothing_is_sent(backend, sink, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_BOUNCES", json.dumps(
        {"conn_type": "imap", "host": "127.0.0.1", "login": "bounces", "extra": {"address": BOUNCES}}))
    monkeypatch.delenv(BOUNCE_KEY_VARIABLE, raising=False)
    night = Night(backend, sink, monkeypatch)
    kari_and_post(night)

    night.run(settings=pipeline.BatchSettings(verp=pipeline.Verp.from_deployment()))

    assert night.status() == {KARI: ("failed", "config_error"), POST: ("failed", "config_error")}
    assert sink.received == []
    assert all(BOUNCE_KEY_VARIABLE in r["detail"] for r in night.rows())

    monkeypatch.setenv(BOUNCE_KEY_VARIABLE, KEY.decode())  # the operator sets the secret and clears the run
    night.run(settings=pipeline.BatchSettings(verp=pipeline.Verp.from_deployment()))

    assert night.status() == {KARI: ("sent", None), POST: ("sent", None)}
    assert {delivery_of(m.envelope_from, BOUNCES, KEY) for m in sink.received} == set(ids_by_recipient(night).values())


def test_a_relay_without_smtputf8_still_takes_the_ascii_delivery_in_ascii(backend, sink, monkeypatch):
    night = Night(backend, sink, monkeypatch)
    sink.faults.ehlo_drop = {"SMTPUTF8"}
    night.erp.customer("10001", invoice_email="ordre@fjordlys.example")
    ase = night.erp.contact("10001", "åse@sjømat.no", "Åse Fiskum")
    setting = night.erp.setting(customer_id="10001")
    night.erp.recipient(setting, "Invoicing", "To")
    night.erp.recipient(setting, "Contact", "Cc", contact_id=ase)
    night.erp.invoice("INV000101", "10001")

    night.run(settings=pipeline.BatchSettings(verp=pipeline.Verp(BOUNCES, KEY)))

    assert night.status() == {("INV000101", "ordre@fjordlys.example"): ("sent", None),
                              ("INV000101", "åse@sjømat.no"): ("failed", "smtputf8_unsupported")}
    [received] = sink.received
    assert received.envelope_to == ["ordre@fjordlys.example"]
    assert received.data.split(b"\r\n\r\n")[0].isascii()


def test_the_bounce_key_is_not_in_the_settings_repr():
    """A log line or a traceback's locals print the batch's settings: the raw key was in them."""
    verp = pipeline.Verp("bounces@bounces.fjordlys.example", KEY)
    settings = pipeline.BatchSettings(verp=verp)
    assert KEY.decode() not in repr(verp) and KEY.decode() not in repr(settings)
    assert "bounces@bounces.fjordlys.example" in repr(settings)
