"""Microsoft 365 in the real topology: a night's sessions log in with the app's tokens, and no secret reaches what
operators and auditors read.

A real Airflow (api-server, scheduler, dag-processor, triggerer; LocalExecutor; PostgreSQL metadata and ledger),
the authorization server of dev/token_server.py, Dovecot checking each token on its SMTP submission and IMAP (the
bounce mailbox), and nothing but the REST API and the plugin's pages. One email account's app is revoked: its
customer's invoice fails ``token_refused``, the night is red and mailed to the operators. The client secrets and
every access token the server gave out are then looked for in every task log (as the UI fetches them), the
failure recorded for the alert, the alert itself and the audit pages: they must not be there, while the
refusal they would accompany is. (Airflow's task logger also hides whatever looks like a JWT, as Entra ID's tokens
do; the project registers every token with Airflow's masker too, for opaque ones such as Google's:
tests/test_oauth_mail.py.) About a minute and a half, most of it Airflow starting.
"""

from __future__ import annotations

import json

import httpx

from dev.airflow_stack import AirflowStack
from dev.smtp_sink import SmtpSink
from include.invoice_mailing.bounces import BOUNCE_KEY_VARIABLE
from tests.conftest import oauth_connection, smtp_connection, sqlite_connection
from tests.erp import TinyErp
from tests.test_operators_e2e import MIDDAY

DAG = "invoice_mailing"
TENANT = "fjordlys-tenant"
OPS = "ops@fjordlys.example"
SECRETS = {"faktura": "Zq8~faktura-app-secret-value", "ar": "Zq8~ar-app-secret-value",
           "bounces": "Zq8~bounce-mailbox-app-secret"}


def test_a_microsoft_365_night_logs_in_with_tokens_and_no_secret_reaches_logs_alert_or_pages(
        tmp_path, postgres_databases, faked_clock, identity, exchange, internet):
    from sqlalchemy import create_engine

    internet.received.clear()
    erp = TinyErp(create_engine(f"sqlite:///{tmp_path / 'erp.db'}"))
    erp.add("email_account", account_id=2, address="ar@fjordlys.example", display_name="Fjordlys AR",
            smtp_conn_id="smtp_ar")
    erp.customer("10001", invoice_email="kari@bolgen.example")
    erp.recipient(erp.setting(customer_id="10001"), "Invoicing")
    erp.customer("10002", invoice_email="ola@havet.example")
    erp.recipient(erp.setting(customer_id="10002", email_account_id=2), "Invoicing")
    erp.invoice("INV010001", "10001")
    erp.invoice("INV010002", "10002")
    apps = {name: identity.microsoft_app(TENANT, f"{name}@fjordlys.example", secret=secret)
            for name, secret in SECRETS.items()}
    identity.revoke(apps["ar"])

    def microsoft(server, name: str) -> dict:
        return json.loads(oauth_connection(server, f"{name}@fjordlys.example", password=SECRETS[name],
                                           tenant_id=TENANT, client_id=apps[name], authority=identity.url))

    bounces = {**microsoft(exchange, "bounces"), "conn_type": "imap", "port": exchange.port}
    bounces["extra"] = {**bounces["extra"], "use_ssl": False}
    with SmtpSink() as operators:
        env = {
            "AIRFLOW_CONN_ERP_DB": sqlite_connection(tmp_path / "erp.db"),
            "AIRFLOW_CONN_MAILING_LEDGER": postgres_databases["connections"][1],
            "AIRFLOW_CONN_SMTP_DEFAULT": json.dumps(microsoft(exchange, "faktura")),
            "AIRFLOW_CONN_SMTP_AR": json.dumps(microsoft(exchange, "ar")),
            "AIRFLOW_CONN_MAILING_BOUNCES": json.dumps(bounces),
            "AIRFLOW_CONN_MAILING_ALERTS": smtp_connection(operators.port, to=OPS, from_email="airflow@fjordlys.example"),
            BOUNCE_KEY_VARIABLE: "a-bounce-key-of-this-test-only-32-bytes-or-more",
            "REQUESTS_CA_BUNDLE": str(identity.ca.bundle),  # the test CA, as a deployment trusts its IdP's
            "INVOICE_MAILING_RETRIES": "0",
        }
        with AirflowStack(extra_env=env, fake_time=MIDDAY) as stack:
            api = stack.client()
            api.wait_for_dag(DAG)
            api.unpause(DAG)
            run_id = api.trigger(DAG, logical_date="2026-11-24T01:00:00Z")["dag_run_id"]
            assert api.wait_for_run(DAG, run_id, {"success", "failed"}, timeout=300)["state"] == "failed"

            instances = api.task_instances(DAG, run_id)
            logs = {(ti["task_id"], ti["map_index"]): api.log(DAG, run_id, ti["task_id"], max(ti["try_number"], 1),
                                                              ti["map_index"])
                    for ti in instances if ti["state"] in ("success", "failed")}
            failed = next(ti for ti in instances if ti["task_id"] == "mail_customers" and ti["state"] == "failed")
            recorded = api.request("GET", f"/dags/{DAG}/dagRuns/{run_id}/taskInstances/mail_customers/xcomEntries/"
                                          "failure", params={"map_index": failed["map_index"]})["value"]
            alert = stack.wait_until("the red night's alert", lambda: next(
                (m.message for m in operators.received if m.envelope_to == [OPS]), None), timeout=60)
            with httpx.Client(base_url=f"{stack.url}/invoice-mailing", timeout=60,
                              headers={"Authorization": f"Bearer {stack.token()}"}) as pages:
                shown = {path: pages.get(path, params={"status": "failed"}).text
                         for path in ("/api/deliveries", "/deliveries", "/deliveries.csv")}

    # The night: 10001 through the faktura app's token, 10002 refused by Entra ID; the bounce mailbox read with its own.
    assert [m.envelope_to for m in internet.received] == [["kari@bolgen.example"]]
    assert ("faktura@fjordlys.example", "XOAUTH2") in exchange.logins()
    assert ("bounces@fjordlys.example", "XOAUTH2") in exchange.logins("imap")
    assert failed["rendered_map_index"] == "customer 10002"
    refusal = "Microsoft Entra ID refused the token request of connection 'smtp_ar': invalid_client: AADSTS7000222"
    assert refusal in logs[("mail_customers", failed["map_index"])]
    assert "AADSTS7000222" in json.dumps(recorded) and "AADSTS7000222" in alert.get_body(("html",)).get_content()
    for path, text in shown.items():
        assert "AADSTS7000222" in text and "token_refused" in text, path

    # ...and nowhere a client secret or an access token.
    secrets = [*SECRETS.values(), *identity.issued]
    assert len(identity.issued) >= 2  # the faktura app's and the bounce mailbox's tokens, at least
    read = {**{f"log {key}": text for key, text in logs.items()}, "failure": json.dumps(recorded),
            "alert": alert.as_string(), **shown}
    for where, text in read.items():
        for secret in secrets:
            assert secret not in text, f"a secret ({secret[:12]}...) in the {where}"
