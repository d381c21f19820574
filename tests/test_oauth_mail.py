"""Microsoft 365 and Google Workspace without passwords: nights sent through SMTP AUTH XOAUTH2 with tokens msal and
google-auth got from a real authorization server (dev/token_server.py), to a real mail server that checks each
token itself (Dovecot's submission and IMAP, standing for smtp.office365.com and smtp.gmail.com), on SQLite and
PostgreSQL: one token per account reused, a token that expires mid-batch, the token endpoint down, a revoked
client, a mailbox the app was not granted, and a server that offers only OAUTHBEARER.
"""

from __future__ import annotations

import imaplib
import json
import smtplib
import time

import pytest

from dev.smtp_sink import SmtpSink
from dev.token_server import GOOGLE_SCOPE, MICROSOFT_RESOURCE, new_key
from include.invoice_mailing import oauth
from tests.conftest import oauth_connection, token_checking_dovecot
from tests.test_quirks import Night, kari_and_post

TENANT = "fjordlys-tenant"
MAILBOX = "faktura@fjordlys.example"  # the email account of tests/erp.py sends as this address
SECRET = "Zq8~app-secret-value-of-the-registration"
ACCOUNT = "email account 1 <faktura@fjordlys.example>, SMTP connection 'smtp_default'"
KARI, POST = ("INV000101", "kari@bolgen.example"), ("INV000101", "post@bolgen.example")


@pytest.fixture
def night(backend, internet, monkeypatch) -> Night:
    internet.received.clear()
    oauth.forget_sources()
    yield Night(backend, internet, monkeypatch)
    internet.faults.data_delay = 0.0


def microsoft(identity, server, monkeypatch, *, granted: str = MAILBOX, secret: str = SECRET, **extra) -> str:
    """An app registration allowed to use ``granted``, and the SMTP connection logging in as MAILBOX with it."""
    client_id = identity.microsoft_app(TENANT, granted, secret=SECRET)
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", oauth_connection(
        server, MAILBOX, password=secret, tenant_id=TENANT, client_id=client_id, authority=identity.url, **extra))
    return client_id


def customers(night: Night, count: int) -> set[tuple[str, str]]:
    """``count`` customers with one invoice each to their invoicing contact: (document, recipient) of each."""
    expected = set()
    for n in range(1, count + 1):
        customer, ref, address = f"200{n:02d}", f"INV0002{n:02d}", f"ap{n}@kunde{n}.example"
        night.erp.customer(customer, invoice_email=address)
        night.erp.recipient(night.erp.setting(customer_id=customer), "Invoicing")
        night.erp.invoice(ref, customer)
        expected.add((ref, address))
    return expected


def test_a_night_goes_out_through_xoauth2_with_one_token_msal_got_for_the_app(night, identity, exchange, monkeypatch):
    client_id = microsoft(identity, exchange, monkeypatch)
    kari_and_post(night)
    expected = customers(night, 3) | {KARI, POST}

    assert night.run() == 1

    assert night.arrived() == {key: 1 for key in expected}
    assert {status for status in night.status().values()} == {("sent", None)}
    assert [r.status for r in identity.token_requests(client_id)] == [200]  # one token for the whole batch
    assert exchange.logins()[-1] == (MAILBOX, "XOAUTH2")


def test_a_night_from_google_workspace_goes_out_with_the_service_accounts_token(night, identity, gmail, monkeypatch):
    key = identity.google_service_account(MAILBOX)
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", oauth_connection(gmail, MAILBOX, password=json.dumps(key)))
    kari_and_post(night)

    assert night.run() == 1

    assert night.arrived() == {KARI: 1, POST: 1}
    assert [r.status for r in identity.token_requests(key["client_email"])] == [200]
    assert gmail.logins()[-1] == (MAILBOX, "XOAUTH2")


def test_a_batch_that_outlives_its_token_logs_in_again_and_sends_every_message_once(night, identity, exchange,
                                                                                  monkeypatch):
    client_id = microsoft(identity, exchange, monkeypatch)
    expected = customers(night, 6)
    identity.lifetime = 4           # seconds; the session renews its login a second before the end
    night.sink.faults.data_delay = 0.7  # the customers' servers are slow: the batch takes longer than the token
    logins_before = len(exchange.logins())
    try:
        assert night.run() == 1
    finally:
        identity.lifetime = 3600

    assert night.arrived() == {key: 1 for key in expected}
    assert len(identity.token_requests(client_id)) >= 2
    assert len(exchange.logins()) - logins_before >= 2  # a new session with the new token, each time
    assert {status for status in night.status().values()} == {("sent", None)}


@pytest.mark.parametrize("answer", ["down", 503])
def test_the_token_endpoint_down_keeps_the_deliveries_pending_and_the_retry_sends_them(night, identity, exchange,
                                                                                      monkeypatch, answer):
    client_id = microsoft(identity, exchange, monkeypatch)
    kari_and_post(night)
    expected = customers(night, 2) | {KARI, POST}
    if answer == "down":
        identity.stop()
    else:
        identity.failures[:] = [answer] * 20
    try:
        assert night.run(tries=1) == 2  # the try ended with its deliveries pending: Airflow retries it
        rows = night.rows()
        assert {r["status"] for r in rows} == {"pending"}
        assert all("Microsoft Entra ID did not answer the token request of connection 'smtp_default'"
                   in r["last_error"] for r in rows)
        assert night.sink.received == []
        assert len(identity.token_requests(client_id)) <= 3  # one message's attempts: the others waited
    finally:
        identity.failures.clear()
        if answer == "down":
            identity.start()
        else:
            time.sleep(1.2)  # the endpoint's Retry-After, which msal honours (Airflow's retry waits minutes)

    assert night.run() == 1
    assert night.arrived() == {key: 1 for key in expected}
    assert {status for status in night.status().values()} == {("sent", None)}


@pytest.mark.parametrize("case, reason, says", [
    ("no credentials", "config_error", "has auth_type oauth2 but neither an access_token nor client credentials"),
    ("unknown tenant", "token_refused", "AADSTS90002: Tenant 'fjordlys-typo' not found"),
    ("certificate not its key's", "config_error", "has a certificate that does not match its private_key"),
    ("key file not JSON", "config_error", "the service account key in the password is not JSON"),
])
def test_a_connection_that_cannot_log_in_fails_its_deliveries_in_one_line_and_they_go_once_mended(
        night, identity, exchange, monkeypatch, case, reason, says):
    from tests.test_oauth_tokens import certificate_pair

    client_id = identity.microsoft_app(TENANT, MAILBOX, secret=SECRET)
    extra = {"no credentials": {},
             "unknown tenant": {"tenant_id": "fjordlys-typo", "client_id": client_id, "authority": identity.url},
             "key file not JSON": {"oauth_provider": "google"}}.get(case)
    if case.startswith("certificate"):
        cert_pem, other_key = certificate_pair()[1], certificate_pair("another")[2]
        extra = {"tenant_id": TENANT, "client_id": client_id, "authority": identity.url, "certificate": cert_pem,
                 "private_key": other_key}
    password = "{not json" if case == "key file not JSON" else SECRET
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", oauth_connection(exchange, MAILBOX, password=password, **extra))
    kari_and_post(night)

    assert night.run() == 1  # the night's first send says it; nothing to retry

    rows = night.rows()
    assert {(r["status"], r["reason"]) for r in rows} == {("failed", reason)}
    [detail] = {r["detail"] for r in rows}
    assert says in detail and "'smtp_default'" in detail and "\n" not in detail
    assert SECRET not in detail and "PRIVATE KEY" not in detail and "not json" not in detail
    assert night.sink.received == []

    oauth.forget_sources()
    microsoft(identity, exchange, monkeypatch)  # the deployer mends the connection
    night.run("scheduled__2026-11-25")
    assert night.arrived() == {KARI: 1, POST: 1}


@pytest.mark.parametrize("provider", ["Microsoft Entra ID", "Google"])
def test_a_revoked_client_fails_the_account_once_and_sends_once_it_is_mended(night, identity, exchange, gmail,
                                                                            monkeypatch, provider):
    if provider == "Google":
        key = identity.google_service_account(MAILBOX)
        client_id, words = key["client_email"], "invalid_grant: Invalid JWT Signature."
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", oauth_connection(gmail, MAILBOX, password=json.dumps(key)))
    else:
        client_id, words = microsoft(identity, exchange, monkeypatch), "AADSTS7000222"
    kari_and_post(night)
    customers(night, 2)
    identity.revoke(client_id)

    assert night.run() == 1  # nothing to retry: an administrator must act

    rows = night.rows()
    assert {(r["status"], r["reason"]) for r in rows} == {("failed", "token_refused")}
    for row in rows:
        assert f"{provider} refused the token request of connection 'smtp_default'" in row["detail"]
        assert words in row["detail"] and ACCOUNT in row["detail"]
        assert SECRET not in json.dumps(row, default=str) and "PRIVATE KEY" not in json.dumps(row, default=str)
    assert len(identity.token_requests(client_id)) == 1  # the batch asked once, not once per message
    assert night.sink.received == []

    identity.clients[client_id].revoked = False  # the administrator renews the credentials
    oauth.forget_sources()  # the next night's task runs in a process of its own
    night.run("scheduled__2026-11-25")
    assert set(night.arrived()) == {(r["ref_nbr"], r["recipient"]) for r in rows}


def test_a_mailbox_the_app_was_not_granted_is_refused_by_the_mail_server(night, identity, exchange, monkeypatch):
    microsoft(identity, exchange, monkeypatch, granted="ar@fjordlys.example")  # the token is for another mailbox
    kari_and_post(night)

    assert night.run() == 1

    assert night.status() == {KARI: ("failed", "auth_failed"), POST: ("failed", "auth_failed")}
    [detail] = {r["detail"] for r in night.rows()}
    assert detail.startswith("login refused: 535 5.7.8 Authentication failed.")
    assert "the token must be for the login's mailbox" in detail and ACCOUNT in detail
    assert night.sink.received == []


def test_a_server_that_offers_only_oauthbearer_gets_oauthbearer(night, identity, internet, monkeypatch):
    server = token_checking_dovecot(identity, internet.port, MICROSOFT_RESOURCE, mechanisms="oauthbearer")
    try:
        microsoft(identity, server, monkeypatch)
        kari_and_post(night)
        assert night.run() == 1
        assert night.arrived() == {KARI: 1, POST: 1}
        assert server.logins() == [(MAILBOX, "OAUTHBEARER")]
    finally:
        server.stop()


def test_a_password_login_is_exactly_what_it_was(night, monkeypatch):
    kari_and_post(night)
    with SmtpSink(logins={"faktura": "s3cret"}) as relay:
        night.sink = relay
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps({
            "conn_type": "smtp", "host": "127.0.0.1", "port": relay.port, "login": "faktura", "password": "s3cret",
            "extra": {"disable_ssl": True, "disable_tls": True, "timeout": 5}}))
        assert night.run() == 1
        assert night.arrived() == {KARI: 1, POST: 1}
        assert relay.faults.auth_seen == 1


def test_every_token_is_registered_with_airflows_masker(monkeypatch):
    from airflow.sdk._shared.secrets_masker import redact

    from include.invoice_mailing.smtp_login import SmtpAccount

    opaque = "ya29.a0AfB_opaque-google-style-access-token"  # Google's tokens are not JWTs: only the masker hides them
    monkeypatch.setenv("AIRFLOW_CONN_SMTP_DEFAULT", json.dumps({
        "conn_type": "smtp", "host": "smtp.gmail.com", "login": MAILBOX,
        "extra": {"auth_type": "oauth2", "access_token": opaque}}))
    assert redact(f"a log line with {opaque} in it") == f"a log line with {opaque} in it"

    assert SmtpAccount.from_connection("smtp_default").token().value == opaque

    assert redact(f"a log line with {opaque} in it") == "a log line with *** in it"


# --- The mail server checks the token, not our code ---------------------------------------------------------

def xoauth2(user: str, token: str) -> str:
    return f"user={user}\x01auth=Bearer {token}\x01\x01"


@pytest.mark.parametrize("kind", ["expired", "forged", "wrong issuer", "wrong audience", "another mailbox"])
@pytest.mark.parametrize("protocol", ["smtp", "imap"])
def test_the_mail_server_refuses_a_token_that_is_not_good_for_the_mailbox(identity, exchange, kind, protocol):
    good = identity.mint(MAILBOX, MICROSOFT_RESOURCE)
    bad = {"expired": identity.mint(MAILBOX, MICROSOFT_RESOURCE, lifetime=-60),
           "forged": identity.mint(MAILBOX, MICROSOFT_RESOURCE, key=new_key()),
           "wrong issuer": identity.mint(MAILBOX, MICROSOFT_RESOURCE, issuer="https://login.example/"),
           "wrong audience": identity.mint(MAILBOX, GOOGLE_SCOPE),
           "another mailbox": identity.mint("ar@fjordlys.example", MICROSOFT_RESOURCE)}[kind]

    def log_in(token: str):
        if protocol == "smtp":
            with smtplib.SMTP("127.0.0.1", exchange.submission_port, timeout=5) as client:
                client.ehlo()
                return client.auth("XOAUTH2", lambda challenge=None: "" if challenge else xoauth2(MAILBOX, token))[0]
        client = imaplib.IMAP4("127.0.0.1", exchange.port, timeout=5)
        try:
            return client.authenticate("XOAUTH2", lambda challenge: b"" if challenge else
                                       xoauth2(MAILBOX, token).encode())[0]
        finally:
            client.shutdown()

    assert log_in(good) in (235, "OK")
    with pytest.raises((smtplib.SMTPAuthenticationError, imaplib.IMAP4.error)):
        log_in(bad)
