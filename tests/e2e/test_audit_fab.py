"""The auditors' pages under the FAB auth manager, the one docker-compose.yaml runs: its roles get what the
simple auth manager's get.

A real api-server with this repository's plugin and FAB's auth manager (``dev/airflow_stack.py``, nothing
else: no DAG run is needed), a ledger seeded directly (``tests/audit_seed.py``), FAB users made by ``airflow
users create`` with FAB's default roles, each with a token from FAB's ``POST /auth/token``; the checks are
``tests/audit_access.py``'s, the same that ``tests/test_audit_api.py`` runs with the simple auth manager.
About a minute (51 to 81 s), most of it Airflow starting and one ``airflow users create`` (5 to 10 s) per user.
"""

from __future__ import annotations

import httpx
from sqlalchemy import create_engine

from dev.airflow_stack import ADMIN, AirflowStack
from tests.audit_access import EDITS_THE_DAG, ROUTES, assert_read_access_is_needed, assert_sees_as_edit_access_allows
from tests.audit_seed import archived_delivery, seed
from tests.conftest import sqlite_connection

OUTSIDER = "outsider"  # FAB's Public role: a user who may log in and read nothing


# postgres_admin: the stack's metadata database is PostgreSQL (skips without it, fails under CI=true).
def test_fab_roles_get_from_the_audit_pages_what_the_simple_auth_managers_roles_get(tmp_path, postgres_admin):
    ledger_path = tmp_path / "ledger.db"
    engine = create_engine(f"sqlite:///{ledger_path}")
    seed(engine)
    archived, _ = archived_delivery(engine, tmp_path / "archive")
    engine.dispose()

    env = {"AIRFLOW_CONN_MAILING_LEDGER": sqlite_connection(ledger_path)}
    with AirflowStack(components=("api-server",), auth_manager="fab", extra_env=env) as stack:
        roles = {OUTSIDER: "Public", **{name: name.capitalize() for name in EDITS_THE_DAG if name != ADMIN}}
        passwords = {name: stack.create_user(name, role) for name, role in roles.items()}
        passwords[ADMIN] = stack.password  # made with the stack, as airflow-init makes it
        headers = {name: {"Authorization": f"Bearer {stack.token(name, password)}"}
                   for name, password in passwords.items()}

        with httpx.Client(base_url=f"{stack.url}/invoice-mailing", timeout=60) as client:
            for route in ROUTES:
                assert_read_access_is_needed(client, route, outsider=headers[OUTSIDER], reader=headers["viewer"])
            for name, edits in EDITS_THE_DAG.items():
                try:
                    assert_sees_as_edit_access_allows(client, headers[name], edits, archived)
                except AssertionError as failure:
                    raise AssertionError(f"FAB role {roles.get(name, 'Admin')} ({name}): {failure}") from failure
