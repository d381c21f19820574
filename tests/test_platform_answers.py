"""What Microsoft 365 and Google Workspace answer about the account itself: one answer fails the account's batch.

A password login that Exchange Online no longer takes (``5.7.30``), SMTP AUTH switched off for the mailbox
(``5.7.139``), an app without the mailbox's permission (``5.7.3``), a From the mailbox may not send as
(``5.2.252 SendAsDenied``), Google's demand for an app password (``5.7.9``): each is the account's refusal,
with a line saying what the administrator must change, and the batch's other deliveries are refused with it
without another transaction. The sink plays the platforms' answers (tests/test_oauth_mail.py has the real
token-checking server); through the pipeline on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json

import pytest

from dev.smtp_sink import SmtpSink
from include.invoice_mailing import oauth, pipeline
from include.invoice_mailing.platform_answers import GOOGLE, MICROSOFT, account_refusal, platform_of
from include.invoice_mailing.smtp_login import MAILBOX, VERP, SmtpAccount, SmtpConfigError
from tests.conftest import oauth_connection
from tests.test_quirks import Night, kari_and_post

ACCOUNT = "email account 1 <faktura@fjordlys.example>, SMTP connection 'smtp_default'"
BASIC_AUTH_OFF = "550 5.7.30 Basic authentication is not supported for Client Submission."
SEND_AS_DENIED = ("554 5.2.252 SendAsDenied; faktura@fjordlys.example not allowed to send as "
                  "post@fjordlys.example; STOREDRV.Submission.Exception:SendAsDeniedException.MapiExceptionSendAsDenied")


@pytest.mark.parametrize("answer, platform, reason, says", [
    (BASIC_AUTH_OFF, None, "basic_auth_disabled", "give the connection OAuth 2.0"),
    ("535 5.7.139 Authentication unsuccessful, SmtpClientAuthentication is disabled for the Tenant.", MICROSOFT,
     "auth_failed", "-SmtpClientAuthenticationDisabled $false"),
    ("535 5.7.139 Authentication unsuccessful, basic authentication is disabled.", MICROSOFT, "auth_failed",
     "OAuth 2.0 needs none"),
    ("535 5.7.3 Authentication unsuccessful", MICROSOFT, "auth_failed", "SMTP.SendAsApp with admin consent"),
    ("550 5.7.57 Client not authenticated to send anonymous mail during MAIL FROM", MICROSOFT, "auth_failed",
     "takes mail only from a logged-in session"),
    ("550 5.7.1 Client does not have permissions to send as this sender", MICROSOFT, "send_as_denied", "Send As"),
    (SEND_AS_DENIED, MICROSOFT, "send_as_denied", '"envelope_sender": "mailbox"'),
    ("550 5.7.60 SMTP; Client does not have permissions to send as this sender", MICROSOFT, "send_as_denied",
     "Send As"),
    ("534 5.7.9 Application-specific password required. Learn more at https://support.google.com/mail/?p=Invalid",
     GOOGLE, "auth_failed", "service account with domain-wide delegation"),
    ("535 5.7.8 Username and Password not accepted. For more information, go to https://support.google.com/mail/",
     GOOGLE, "auth_failed", "BadCredentials"),
    ("535 5.7.8 Authentication failed.", None, "auth_failed", "the token must be for the login's mailbox"),
    ("550 5.1.1 <kari@bolgen.example>: Recipient address rejected", MICROSOFT, None, None),
    ("554 5.7.1 Message rejected as spam", GOOGLE, None, None),
    ("554 5.2.0 STOREDRV.Submission.Exception:SubmissionQuotaExceededException", MICROSOFT, None, None),
    ("451 4.7.0 Temporary server error. Please try again later.", MICROSOFT, None, None),
])
def test_the_platforms_answers_about_the_account(answer, platform, reason, says):
    code, _, text = answer.partition(" ")
    refusal = account_refusal(int(code), text, platform)
    assert (refusal.reason if refusal else None) == reason
    if says:
        assert says in refusal.what_to_do


@pytest.mark.parametrize("host, platform", [("smtp.office365.com", MICROSOFT), ("SMTP.Office365.com.", MICROSOFT),
                                            ("fjordlys-no.mail.protection.outlook.com", MICROSOFT),
                                            ("smtp.gmail.com", GOOGLE), ("smtp-relay.gmail.com", GOOGLE),
                                            ("smtp.fjordlys.example", None)])
def test_the_platform_is_told_by_the_host(host, platform):
    assert platform_of(host) == platform


@pytest.mark.parametrize("host, extra, expected", [
    ("smtp.office365.com", {}, MAILBOX), ("smtp.gmail.com", {}, MAILBOX), ("smtp.fjordlys.example", {}, VERP),
    ("smtp.office365.com", {"envelope_sender": "verp"}, VERP),
    ("smtp.fjordlys.example", {"envelope_sender": "mailbox"}, MAILBOX),
])
def test_the_envelope_sender_is_the_mailbox_where_the_platform_takes_no_other(monkeypatch, host, extra, expected):
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps({"conn_type": "smtp", "host": host, "port": 587,
                                                                "extra": {"disable_ssl": True, **extra}}))
    assert SmtpAccount.from_connection("smtp_default").envelope_sender == expected


def test_an_envelope_sender_setting_that_is_neither_is_a_configuration_error(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps({"conn_type": "smtp", "host": "smtp.office365.com",
                                                                "extra": {"envelope_sender": "bounces"}}))
    with pytest.raises(SmtpConfigError, match="has envelope_sender 'bounces'; it may be 'verp' or 'mailbox'"):
        SmtpAccount.from_connection("smtp_default")


# --- Through the pipeline: one answer refuses the account's batch ----------------------------------------------

@pytest.fixture
def relay():
    """A relay that takes the password login faktura / s3cret, as Exchange Online did until this month (AUTH LOGIN)."""
    with SmtpSink(logins={"faktura": "s3cret"}, auth_mechanisms=("LOGIN",)) as server:
        yield server


@pytest.fixture
def night(backend, relay, monkeypatch) -> Night:
    night = Night(backend, relay, monkeypatch)
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps({
        "conn_type": "smtp", "host": "127.0.0.1", "port": relay.port, "login": "faktura", "password": "s3cret",
        "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 5, "retry_limit": 0}}))
    kari_and_post(night)
    for n, customer in enumerate(("10002", "10003"), start=2):
        night.erp.customer(customer, invoice_email=f"ap@kunde{n}.example")
        night.erp.recipient(night.erp.setting(customer_id=customer), "Invoicing")
        night.erp.invoice(f"INV00010{n}", customer)
    return night


def refused_with(night: Night, reason: str) -> str:
    """Every delivery failed for the account's reason, with one detail naming the account; that detail."""
    rows = night.rows()
    assert len(rows) == 4 and {(r["status"], r["reason"]) for r in rows} == {("failed", reason)}
    [detail] = {r["detail"] for r in rows}
    assert ACCOUNT in detail
    return detail


@pytest.mark.parametrize("where", ["AUTH", "MAIL FROM"])
def test_basic_auth_switched_off_fails_the_account_at_its_first_answer_and_says_to_switch_to_oauth(night, relay,
                                                                                                  where):
    if where == "AUTH":
        relay.faults.auth_replies = [BASIC_AUTH_OFF]
    else:
        relay.faults.mail_replies = [BASIC_AUTH_OFF]

    assert night.run() == 1  # nothing to retry: the connection must change

    detail = refused_with(night, "basic_auth_disabled")
    assert "5.7.30 Basic authentication is not supported for Client Submission" in detail
    assert "give the connection OAuth 2.0 (auth_type oauth2" in detail
    assert relay.faults.auth_seen == 1 and len(relay.waiting_at_mail) == (0 if where == "AUTH" else 1)
    assert relay.received == []


def test_the_relay_that_refused_basic_auth_sends_the_next_night_once_the_connection_has_oauth(night, relay, identity,
                                                                                            exchange, internet,
                                                                                            monkeypatch):
    relay.faults.mail_replies = [BASIC_AUTH_OFF]
    night.run()
    refused_with(night, "basic_auth_disabled")

    oauth.forget_sources()
    client_id = identity.microsoft_app("fjordlys-tenant", "faktura@fjordlys.example", secret="Zq8~secret")
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", oauth_connection(
        exchange, "faktura@fjordlys.example", password="Zq8~secret", tenant_id="fjordlys-tenant", client_id=client_id,
        authority=identity.url))
    internet.received.clear()
    night.sink = internet
    night.run("scheduled__2026-11-25")

    assert len(night.arrived()) == 4 and set(night.arrived().values()) == {1}


def test_send_as_denied_after_data_fails_the_account_not_each_message(night, relay):
    relay.faults.data_replies = [SEND_AS_DENIED]

    assert night.run() == 1

    detail = refused_with(night, "send_as_denied")
    assert detail.startswith("the message refused: 554 5.2.252 SendAsDenied")
    assert "Add-RecipientPermission" in detail
    assert relay.faults.data_seen == 1  # one message told: the other two were not tried


@pytest.mark.parametrize("answer, says", [
    ("534 5.7.9 Application-specific password required.", "Google takes no account password here"),
    ("535 5.7.139 Authentication unsuccessful, the user credentials were incorrect.", "Set-CASMailbox"),
])
def test_a_refused_login_is_asked_once_per_batch_and_says_what_to_change(night, relay, answer, says):
    relay.faults.auth_replies = [answer] * 5

    assert night.run() == 1

    detail = refused_with(night, "auth_failed")
    assert detail.startswith(f"login refused: {answer}") and says in detail
    assert relay.faults.auth_seen == 1


def test_the_mailbox_as_envelope_sender_sends_each_message_once_from_the_accounts_address(night, relay, monkeypatch):
    connection = json.loads(json.dumps({
        "conn_type": "smtp", "host": "127.0.0.1", "port": relay.port, "login": "faktura", "password": "s3cret",
        "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 5, "envelope_sender": "mailbox"}}))
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps(connection))
    settings = pipeline.BatchSettings(verp=pipeline.Verp("bounces@fjordlys.example", b"k" * 32))

    assert night.run(settings=settings) == 1

    assert {m.envelope_from for m in relay.received} == {"faktura@fjordlys.example"}
    assert sorted(m.envelope_to for m in relay.received)[0] == ["ap@kunde2.example"]
    assert ["kari@bolgen.example", "post@bolgen.example"] in [m.envelope_to for m in relay.received]
    assert {(r["status"], r["reason"]) for r in night.rows()} == {("sent", None)}
