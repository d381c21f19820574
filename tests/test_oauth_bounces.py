"""The bounce mailbox on Microsoft 365 and Google Workspace: read over IMAP AUTHENTICATE XOAUTH2 with the app's
token, from a real IMAP server that checks the token itself (Dovecot standing for outlook.office365.com and
imap.gmail.com). With the mailbox as the envelope sender (what Exchange Online allows), the report comes back to
the sending mailbox and is matched by the returned Message-ID and recipient; on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import update

from include.invoice_mailing import oauth, pipeline, source
from include.invoice_mailing.bounce_collect import collect
from include.invoice_mailing.bounce_mailbox import BounceMailbox, MailboxUnavailable
from include.invoice_mailing.bounces import BOUNCE_KEY_VARIABLE
from tests.conftest import oauth_connection
from tests.test_bounce_reports import fixture
from tests.test_quirks import Night, kari_and_post

TENANT = "fjordlys-tenant"
SECRET = "Zq8~app-secret-value-of-the-registration"
KEY = "a-bounce-key-of-this-test-only-32-bytes-or-more"


@pytest.fixture
def mailbox() -> str:
    """The sending mailbox of this test: the email account's address, the SMTP login and the bounce mailbox."""
    oauth.forget_sources()
    return f"faktura-{uuid.uuid4().hex[:6]}@fjordlys.example"


def imap_connection(server, login: str, **extra) -> str:
    return json.dumps({"conn_type": "imap", "host": "127.0.0.1", "port": server.port, "login": login,
                       "extra": {"use_ssl": False, "auth_type": "oauth2", **extra}})


def microsoft_mailbox(identity, exchange, monkeypatch, login: str, granted: str | None = None) -> str:
    client_id = identity.microsoft_app(TENANT, granted or login, secret=SECRET)
    connection = json.loads(imap_connection(exchange, login, tenant_id=TENANT, client_id=client_id,
                                            authority=identity.url))
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_BOUNCES", json.dumps({**connection, "password": SECRET}))
    monkeypatch.setenv(BOUNCE_KEY_VARIABLE, KEY)
    return client_id


def exchange_ndr(mailbox: str, row: dict) -> bytes:
    """Exchange Online's non-delivery report of the fixture, about this delivery, to the sending mailbox."""
    raw = fixture("office365-5.1.10-hard.eml")
    raw = raw.replace(b"bounces+106-oqn7cb262oyiqhn3@fjordlys.example", mailbox.encode())
    raw = raw.replace(b"okonomi@strand-maritim.example", row["recipient"].encode())
    return raw.replace(b"<10047.pdf.7e6d5c4b3a2918070f1e2d3c@fjordlys.example>", row["message_id"].encode())


def test_a_bounce_to_the_sending_mailbox_is_read_over_xoauth2_and_applied_by_message_id(backend, identity, exchange,
                                                                                      internet, mailbox, monkeypatch):
    internet.received.clear()
    night = Night(backend, internet, monkeypatch)
    with night.erp_engine.begin() as conn:  # the ERP's email account is the mailbox the app may use
        conn.execute(update(source.email_account).values(address=mailbox))
    kari_and_post(night)
    smtp_app = identity.microsoft_app(TENANT, mailbox, secret=SECRET)
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", oauth_connection(
        exchange, mailbox, password=SECRET, tenant_id=TENANT, client_id=smtp_app, authority=identity.url,
        envelope_sender="mailbox"))
    imap_app = microsoft_mailbox(identity, exchange, monkeypatch, mailbox)

    night.run(settings=pipeline.BatchSettings(verp=pipeline.Verp.from_deployment()))

    assert {m.envelope_from for m in internet.received} == {mailbox}  # the mailbox, not a VERP address
    kari = next(r for r in night.rows() if r["recipient"] == "kari@bolgen.example")
    exchange.append(mailbox, exchange_ndr(mailbox, kari))

    with BounceMailbox.from_connection() as reader:
        done = collect(night.ledger_db, reader, key=KEY.encode(), run_id="scheduled__2026-11-25")

    assert (done.bounced, done.moved, done.left) == (1, 1, 0)
    assert night.status() == {("INV000101", "kari@bolgen.example"): ("bounced", "hard_bounce"),
                              ("INV000101", "post@bolgen.example"): ("sent", None)}
    assert len(exchange.messages(mailbox, "Processed")) == 1 and exchange.messages(mailbox) == []
    assert (mailbox, "XOAUTH2") in exchange.logins("imap")
    assert [r.status for r in identity.token_requests(imap_app)] == [200]


def test_a_google_workspace_bounce_mailbox_is_read_with_the_service_accounts_token(identity, gmail, mailbox,
                                                                                  monkeypatch):
    key = identity.google_service_account(mailbox)
    monkeypatch.setenv("AIRFLOW_CONN_MAILING_BOUNCES", json.dumps({
        **json.loads(imap_connection(gmail, mailbox)), "password": json.dumps(key)}))
    gmail.append(mailbox, b"From: someone@example.com\r\nSubject: hello\r\n\r\nnot a bounce\r\n")

    with BounceMailbox.from_connection() as reader:
        assert reader.count == 1
    assert (mailbox, "XOAUTH2") in gmail.logins("imap")


def test_a_mailbox_the_app_was_not_granted_is_refused_by_the_imap_server_in_one_line(identity, exchange, mailbox,
                                                                                    monkeypatch):
    microsoft_mailbox(identity, exchange, monkeypatch, mailbox, granted="ar@fjordlys.example")

    with pytest.raises(MailboxUnavailable) as refused:
        with BounceMailbox.from_connection():
            pass

    text = str(refused.value)
    assert text.startswith(f"bounce mailbox mailing_bounces ({mailbox}@127.0.0.1:{exchange.port}): the server "
                           f"refused the XOAUTH2 login of {mailbox}: ")
    assert "AUTHENTICATIONFAILED" in text and "\n" not in text and SECRET not in text


def test_a_revoked_app_says_what_entra_id_answered(identity, exchange, mailbox, monkeypatch):
    client_id = microsoft_mailbox(identity, exchange, monkeypatch, mailbox)
    identity.revoke(client_id)

    with pytest.raises(MailboxUnavailable, match=r"mailing_bounces .*: Microsoft Entra ID refused the token request "
                                                 r"of connection 'mailing_bounces': invalid_client: AADSTS7000222"):
        with BounceMailbox.from_connection():
            pass
    assert (mailbox, "XOAUTH2") not in exchange.logins("imap")  # no session was opened without a token


def test_an_imap_server_that_offers_only_oauthbearer_gets_oauthbearer(identity, internet, mailbox, monkeypatch):
    from dev.token_server import MICROSOFT_RESOURCE
    from tests.conftest import token_checking_dovecot

    server = token_checking_dovecot(identity, internet.port, MICROSOFT_RESOURCE, mechanisms="oauthbearer")
    try:
        microsoft_mailbox(identity, server, monkeypatch, mailbox)
        with BounceMailbox.from_connection() as reader:
            assert reader.count == 0
        assert (mailbox, "OAUTHBEARER") in server.logins("imap")
    finally:
        server.stop()
