"""The deployer's check before the first night (``make check-mail-accounts``): every email account of the ERP
gets its token, opens its SMTP session and logs in, then the bounce mailbox; one line each; nothing is sent.

Run as the deployer runs it, ``python -m include.invoice_mailing.mail_accounts`` in a process of its own with
the deployment's connections in the environment, against the real authorization server and the token-checking
Dovecot of tests/test_oauth_mail.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, oauth_connection, sqlite_connection

TENANT = "fjordlys-tenant"
MAILBOX = "faktura@fjordlys.example"
SECRET = "Zq8~app-secret-value-of-the-registration"


@pytest.fixture
def deployment(erp, erp_path, identity, exchange, gmail, internet):
    """The ERP's three email accounts and the connections they name, as environment variables."""
    internet.received.clear()
    erp.add("email_account", account_id=2, address="ar@fjordlys.example", display_name="Fjordlys AR",
            smtp_conn_id="smtp_o365")
    erp.add("email_account", account_id=3, address="purring@fjordlys.example", display_name="Fjordlys Purring",
            smtp_conn_id="smtp_gmail")
    app = identity.microsoft_app(TENANT, MAILBOX, secret=SECRET)
    key = identity.google_service_account("purring@fjordlys.example")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AIRFLOW_CONN_ERP_DB": sqlite_connection(erp_path),
           "AIRFLOW_CONN_SMTP_DEFAULT": oauth_connection(exchange, MAILBOX, password=SECRET, tenant_id=TENANT,
                                                         client_id=app, authority=identity.url),
           "AIRFLOW_CONN_SMTP_O365": oauth_connection(exchange, MAILBOX, password=SECRET, tenant_id=TENANT,
                                                      client_id=app, authority=identity.url),
           "AIRFLOW_CONN_SMTP_GMAIL": oauth_connection(gmail, "purring@fjordlys.example", password=json.dumps(key))}
    return {"env": env, "app": app, "key": key}


def check(env: dict) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, "-m", "include.invoice_mailing.mail_accounts"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    return done.returncode, [line for line in done.stdout.splitlines() if line]


def test_every_account_logs_in_and_nothing_is_sent(deployment, exchange, gmail, internet):
    code, lines = check(deployment["env"])

    assert code == 0, lines
    assert lines[0].startswith("SMTP connection 'smtp_default' (email account 1 <faktura@fjordlys.example>): ok: "
                               f"logged in at 127.0.0.1:{exchange.submission_port}, OAuth 2.0 (Microsoft Entra ID) "
                               "as faktura@fjordlys.example")
    assert lines[1].startswith("SMTP connection 'smtp_gmail' (email account 3 <purring@fjordlys.example>): ok: "
                               "logged in at 127.0.0.1")
    assert lines[2].startswith("SMTP connection 'smtp_o365' (email account 2 <ar@fjordlys.example>): ok:")
    assert len(lines) == 3 and "envelope sender" not in lines[0]  # no bounce mailbox: the account's own address
    assert internet.received == []  # logged in, and quit before any MAIL FROM
    assert ("purring@fjordlys.example", "XOAUTH2") in gmail.logins()


def test_each_account_that_cannot_send_says_why_in_one_line_without_its_secret(deployment, identity, exchange,
                                                                               ):
    env = dict(deployment["env"])
    identity.revoke(deployment["key"]["client_email"])
    env["AIRFLOW_CONN_SMTP_O365"] = json.dumps({"conn_type": "smtp", "host": "127.0.0.1", "port": exchange.port,
                                                "login": MAILBOX, "password": SECRET,
                                                "extra": {"auth_type": "oauth2", "disable_tls": True,
                                                          "disable_ssl": True}})
    env["AIRFLOW_CONN_MAILING_BOUNCES"] = json.dumps({"conn_type": "imap", "host": "127.0.0.1", "port": exchange.port,
                                                      "login": "ar@fjordlys.example", "password": SECRET,
                                                      "extra": {"use_ssl": False, "auth_type": "oauth2",
                                                                "tenant_id": "fjordlys-typo",
                                                                "client_id": deployment["app"],
                                                                "authority": identity.url}})

    code, lines = check(env)

    assert code == 1
    by_connection = {line.split(":")[0]: line for line in lines}
    assert "ok: logged in" in lines[0]
    gmail = next(line for line in lines if line.startswith("SMTP connection 'smtp_gmail'"))
    assert ": FAILED: token_refused: Google refused the token request of connection 'smtp_gmail': invalid_grant" in gmail
    o365 = next(line for line in lines if line.startswith("SMTP connection 'smtp_o365'"))
    assert ": FAILED: config_error: the connection 'smtp_o365' has auth_type oauth2 but neither an access_token nor " \
           "client credentials" in o365
    bounces = lines[-1]
    assert bounces.startswith("bounce mailbox mailing_bounces (ar@fjordlys.example@127.0.0.1:")
    assert ": FAILED: Microsoft Entra ID refused the token request of connection 'mailing_bounces'" in bounces
    assert "envelope sender: VERP" in lines[0]  # with the bounce mailbox set, the relay's MAIL FROM is VERP and "AADSTS90002: Tenant 'fjordlys-typo' not found" in bounces
    assert len(by_connection) == len(lines) == 4
    for line in lines:
        assert SECRET not in line and "PRIVATE KEY" not in line


@pytest.mark.parametrize("case, says", [
    ("certificate not its key's", "FAILED: config_error: the connection 'smtp_default' has a certificate that does "
                                  "not match its private_key"),
    ("key file not JSON", "FAILED: config_error: the connection 'smtp_default': the service account key in the "
                          "password is not JSON"),
    ("mailbox not granted", "FAILED: auth_failed: login refused: 535 5.7.8 Authentication failed."),
])
def test_a_connection_that_cannot_log_in_is_one_line_saying_why(deployment, identity, exchange, case, says):
    from tests.test_oauth_tokens import certificate_pair

    env = {k: v for k, v in deployment["env"].items() if k not in ("AIRFLOW_CONN_SMTP_O365", "AIRFLOW_CONN_SMTP_GMAIL")}
    if case.startswith("certificate"):
        cert, cert_pem, _ = certificate_pair()
        app = identity.microsoft_app(TENANT, MAILBOX, certificate=cert)
        connection = oauth_connection(exchange, MAILBOX, tenant_id=TENANT, client_id=app, authority=identity.url,
                                      certificate=cert_pem, private_key=certificate_pair("another")[2])
    elif case == "key file not JSON":
        connection = oauth_connection(exchange, MAILBOX, password="{not json", oauth_provider="google")
    else:
        app = identity.microsoft_app(TENANT, "ar@fjordlys.example", secret=SECRET)  # granted another mailbox
        connection = oauth_connection(exchange, MAILBOX, password=SECRET, tenant_id=TENANT, client_id=app,
                                      authority=identity.url)
    env["AIRFLOW_CONN_SMTP_DEFAULT"] = connection

    code, lines = check(env)

    assert code == 1
    [line] = [line for line in lines if line.startswith("SMTP connection 'smtp_default'")]
    assert says in line, line
    assert SECRET not in line and "PRIVATE KEY" not in line and "not json" not in line
